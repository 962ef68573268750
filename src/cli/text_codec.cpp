// TextCodec over the tokenizer: a model directory carries its tokenizer.json; otherwise the bundled
// DeepSeek-V3 tokenizer is used.
#include <filesystem>

#include "cli/common.h"
#include "core/error.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_files.h"

namespace dsv3::cli {

namespace {

class TokStream : public TextStream {
 public:
  explicit TokStream(const Tokenizer& t) : dec_(t) {}
  std::string push(int32_t id) override { return dec_.push(id); }
  std::string flush() override { return dec_.flush(); }

 private:
  StreamDecoder dec_;
};

class TokCodec : public TextCodec {
 public:
  explicit TokCodec(Tokenizer t) : tok_(std::move(t)) {}
  std::vector<int32_t> encode(const std::string& text) override { return tok_.encode_with_bos(text); }
  std::string decode(const std::vector<int32_t>& ids) override { return tok_.decode(ids, true); }
  std::unique_ptr<TextStream> stream() override { return std::make_unique<TokStream>(tok_); }

 private:
  Tokenizer tok_;
};

}  // namespace

std::unique_ptr<TextCodec> open_text_codec(const std::string& path) {
  namespace fs = std::filesystem;
  std::string p = path;
  if (fs::is_directory(p) && !fs::exists(fs::path(p) / "tokenizer.json")) p = kBundledTokenizerName;
  return std::make_unique<TokCodec>(Tokenizer::load(p));
}

}  // namespace dsv3::cli
