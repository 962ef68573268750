#pragma once
// `dsv3 info` for a DeepSeek-V4 model directory: config, parameters, the cache per token per layer type.
#include <string>

namespace dsv3::cli {

void print_v4_info(const std::string& dir, bool as_json);

}  // namespace dsv3::cli
