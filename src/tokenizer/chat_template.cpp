#include "tokenizer/chat_template.h"

#include "core/error.h"
#include "tokenizer/jinja.h"

namespace dsv3 {

namespace {

std::string config_token(const nlohmann::json& cfg, const char* key) {
  if (!cfg.contains(key) || cfg[key].is_null()) return "";
  const auto& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  fail("tokenizer_config.json: {} must be a string or an object with \"content\"", key);
}

}  // namespace

ChatTemplateConfig ChatTemplateConfig::from_config(const nlohmann::json& cfg) {
  if (!cfg.is_object()) fail("tokenizer_config.json must be a JSON object");
  ChatTemplateConfig out;
  out.special_tokens = nlohmann::ordered_json::object();
  for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"}) {
    const std::string s = config_token(cfg, key);
    if (!s.empty()) out.special_tokens[key] = s;
  }
  if (cfg.contains("chat_template") && !cfg["chat_template"].is_null()) {
    const auto& t = cfg["chat_template"];
    if (t.is_string()) {
      out.source = t.get<std::string>();
    } else if (t.is_array()) {  // named templates: transformers uses the one called "default"
      for (const auto& e : t)
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
          out.source = e["template"].get<std::string>();
      if (out.source.empty()) fail("tokenizer_config.json: chat_template is a list without a template named \"default\"");
    } else {
      fail("tokenizer_config.json: chat_template must be a string or a list of {{name, template}}");
    }
  }
  return out;
}

nlohmann::ordered_json chat_template_variables(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                               const nlohmann::ordered_json& special_tokens,
                                               const nlohmann::ordered_json& extra) {
  if (!messages.is_array()) fail("chat template: messages must be a JSON array");
  if (!extra.is_object()) fail("chat template: extra variables must be a JSON object");
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  ctx["messages"] = messages;
  ctx["tools"] = nullptr;
  ctx["documents"] = nullptr;
  ctx["add_generation_prompt"] = add_generation_prompt;
  for (const auto& [k, v] : special_tokens.items()) ctx[k] = v;
  for (const auto& [k, v] : extra.items()) ctx[k] = v;
  return ctx;
}

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
