#pragma once
// `dsv3 info` for a DeepSeek-V4 model directory: config, parameters, the cache per token per layer type.
#include <string>

namespace dsv3::cli {

// dtype: the --dtype the model would load with (auto | f32 | bf16): the resident weight bytes reported.
void print_v4_info(const std::string& dir, bool as_json, const std::string& dtype = "auto");

}  // namespace dsv3::cli
