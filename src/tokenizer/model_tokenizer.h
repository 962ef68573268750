#pragma once
// The tokenizer that goes with a model directory: an explicit path when given, else the directory's own
// tokenizer.json, else the bundled DeepSeek-V3 tokenizer. Used by serve, chat and the Python package.
#include <cstdint>
#include <string>

#include "tokenizer/tokenizer.h"

namespace dsv3 {

// vocab > 0: InputError when the tokenizer has more tokens than the model's vocab_size (its ids would be
// out of range), with a hint to pass the model's own tokenizer.
Tokenizer tokenizer_for_model(const std::string& model_dir, const std::string& explicit_path, int64_t vocab);

}  // namespace dsv3
