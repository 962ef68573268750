// Text <-> ids for the CLI over the project's tokenizer (tokenizer/tokenizer.h): a model directory holding
// tokenizer.json, a tokenizer file, or the bundled "deepseek-v3".
#include "cli/common.h"
#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::cli {

namespace {

class Stream final : public TextStream {
 public:
  explicit Stream(const Tokenizer& t) : d_(t) {}
  std::string push(int32_t id) override { return d_.push(id); }
  std::string flush() override { return d_.flush(); }

 private:
  StreamDecoder d_;
};

class Codec final : public TextCodec {
 public:
  explicit Codec(Tokenizer t) : tok_(std::move(t)) {}
  std::vector<int32_t> encode(const std::string& text) override { return tok_.encode_with_bos(text); }
  std::string decode(const std::vector<int32_t>& ids) override { return tok_.decode(ids, true); }
  std::unique_ptr<TextStream> stream() override { return std::make_unique<Stream>(tok_); }

 private:
  Tokenizer tok_;
};

}  // namespace

std::unique_ptr<TextCodec> open_text_codec(const std::string& path) {
  return std::make_unique<Codec>(Tokenizer::load(path));
}

}  // namespace dsv3::cli
