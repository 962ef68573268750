#pragma once
// Where a tokenizer's files are: a tokenizer.json path, a directory (a model directory carries its own
// tokenizer.json and tokenizer_config.json), or the name "deepseek-v3" for the copy bundled with dsv3.
#include <string>

namespace dsv3 {

struct TokenizerFiles {
  std::string tokenizer_json;  // path of tokenizer.json
  std::string config_json;     // path of tokenizer_config.json, "" when there is none
};

// Throws InputError naming the path when nothing usable is there.
TokenizerFiles locate_tokenizer(const std::string& path_or_name);

// The directory of the bundled DeepSeek-V3 tokenizer, searched at <exe_dir>/../data/tokenizers/deepseek-v3,
// <exe_dir>/../../data/tokenizers/deepseek-v3, then the source tree dsv3 was built from. Throws InputError
// listing the places searched when none has it. A directory set with set_bundled_tokenizer_dir is searched
// first (the Python package ships the tokenizer next to its extension, where no executable path leads).
std::string bundled_tokenizer_dir();
void set_bundled_tokenizer_dir(const std::string& dir);

// The name that means the bundled tokenizer.
inline constexpr const char* kBundledTokenizerName = "deepseek-v3";

// Whole file as a string; throws InputError naming the file when it cannot be read.
std::string read_text_file(const std::string& path);

}  // namespace dsv3
