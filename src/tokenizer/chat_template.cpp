#include "tokenizer/chat_template.h"

#include "core/error.h"
#include "tokenizer/jinja.h"

namespace dsv3 {

ChatTemplate::ChatTemplate(const std::string& source) {
  try {
    template_ = std::make_unique<jinja::Template>(source);
  } catch (const InputError& e) {
    fail("chat template does not parse: {}", e.what());
  }
}

ChatTemplate::~ChatTemplate() = default;

std::string ChatTemplate::render(const nlohmann::ordered_json& variables) const {
  try {
    return template_->render(variables);
  } catch (const InputError& e) {
    fail("chat template failed: {}", e.what());
  }
}

}  // namespace dsv3
