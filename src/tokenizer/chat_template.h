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

// What tokenizer_config.json says for chat templates: the template text and the special-token strings
// transformers passes to it (bos_token, eos_token, unk_token, pad_token).
struct ChatTemplateConfig {
  std::string source;                    // "" when the config has no chat_template
  nlohmann::ordered_json special_tokens;  // {"bos_token": "<｜begin▁of▁sentence｜>", ...}
  // Reads a parsed tokenizer_config.json; throws InputError naming a malformed field.
  static ChatTemplateConfig from_config(const nlohmann::json& config);
};

// The variables transformers' apply_chat_template gives a template: messages, tools, documents,
// add_generation_prompt, the special-token strings, then the caller's extra keyword arguments.
nlohmann::ordered_json chat_template_variables(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                               const nlohmann::ordered_json& special_tokens,
                                               const nlohmann::ordered_json& extra);

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
