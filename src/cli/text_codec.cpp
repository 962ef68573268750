#include "cli/common.h"
#include "core/error.h"

namespace dsv3::cli {

std::unique_ptr<TextCodec> open_text_codec(const std::string& path) {
  fail("text prompts need the tokenizer, which is not built into this dsv3 yet ({}); use --prompt-ids", path);
}

}  // namespace dsv3::cli
