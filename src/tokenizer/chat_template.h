#pragma once
// A model's chat template (tokenizer_config.json "chat_template"), compiled once and rendered per request
// by the Jinja-subset interpreter, so any model's template runs as written.
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

namespace dsv3 {

namespace jinja {
class Template;
}

class ChatTemplate {
 public:
  // Throws InputError "chat template: line N: ..." when the template does not parse.
  explicit ChatTemplate(const std::string& source);
  ~ChatTemplate();
  // variables: messages, add_generation_prompt, bos_token, ... Throws InputError "chat template: line N:
  // ..." when rendering fails.
  std::string render(const nlohmann::ordered_json& variables) const;

 private:
  std::unique_ptr<jinja::Template> template_;
};

}  // namespace dsv3
