#include "tokenizer/model_tokenizer.h"

#include <filesystem>

#include "core/error.h"
#include "tokenizer/tokenizer_files.h"

namespace dsv3 {

Tokenizer tokenizer_for_model(const std::string& model_dir, const std::string& explicit_path, int64_t vocab) {
  std::string path = explicit_path;
  if (path.empty())
    path = std::filesystem::exists(std::filesystem::path(model_dir) / "tokenizer.json") ? model_dir : kBundledTokenizerName;
  Tokenizer tok = Tokenizer::load(path);
  if (vocab > 0 && int64_t(tok.vocab_size()) > vocab)
    fail("tokenizer {} has {} tokens but the model's vocab_size is {}; pass the model's own tokenizer with --tokenizer",
         tok.source(), tok.vocab_size(), vocab);
  return tok;
}

}  // namespace dsv3
