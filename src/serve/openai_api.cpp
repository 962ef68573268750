#include "serve/openai_api.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <random>

namespace dsv3 {

using json = nlohmann::json;

json error_body(const std::string& message, const std::string& type, const std::string& param) {
  return {{"error", {{"message", message}, {"type", type}, {"param", param.empty() ? json(nullptr) : json(param)}, {"code", nullptr}}}};
}

namespace {

[[noreturn]] void bad(const std::string& msg, const std::string& param = "") {
  throw ApiError(400, "invalid_request_error", msg, param);
}

double number(const json& j, const char* key, double dflt, double lo, double hi) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_number()) bad(fmt::format("'{}' must be a number", key), key);
  double v = j[key].get<double>();
  if (!(v >= lo && v <= hi)) bad(fmt::format("'{}' must be in [{}, {}], got {}", key, lo, hi, v), key);
  return v;
}

int64_t integer(const json& j, const char* key, int64_t dflt, int64_t lo, int64_t hi) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_number_integer()) bad(fmt::format("'{}' must be an integer", key), key);
  int64_t v = j[key].get<int64_t>();
  if (v < lo || v > hi) bad(fmt::format("'{}' must be in [{}, {}], got {}", key, lo, hi, v), key);
  return v;
}

// Content may be a string, null, or a list of {type: text, text} parts (flattened to a string).
json normalize_messages(const json& msgs) {
  if (!msgs.is_array() || msgs.empty()) bad("'messages' must be a non-empty array", "messages");
  json out = json::array();
  for (size_t i = 0; i < msgs.size(); ++i) {
    const json& m = msgs[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!m.is_object()) bad(where + " must be an object", "messages");
    if (!m.contains("role") || !m["role"].is_string()) bad(where + ".role must be a string", "messages");
    const std::string role = m["role"];
    if (role != "system" && role != "user" && role != "assistant" && role != "tool" && role != "developer")
      bad(fmt::format("{}.role '{}' is not one of system, user, assistant, tool", where, role), "messages");
    json n = m;
    if (role == "developer") n["role"] = "system";
    if (m.contains("content") && m["content"].is_array()) {
      std::string text;
      for (auto& part : m["content"]) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
          bad(where + ".content parts must be {\"type\": \"text\", \"text\": ...}", "messages");
        text += part["text"].get<std::string>();
      }
      n["content"] = text;
    } else if (m.contains("content") && !m["content"].is_string() && !m["content"].is_null()) {
      bad(where + ".content must be a string, null or a list of text parts", "messages");
    }
    if (!n.contains("content")) n["content"] = nullptr;
    if (role != "assistant" && n["content"].is_null()) bad(where + ".content is missing", "messages");
    out.push_back(n);
  }
  return out;
}

// tools: [{type: "function", function: {name, description?, parameters?}}] as OpenAI defines them.
void validate_tools(const json& tools) {
  if (!tools.is_array()) bad("'tools' must be an array", "tools");
  if (tools.size() > 128) bad("'tools' holds at most 128 functions", "tools");
  for (size_t i = 0; i < tools.size(); ++i) {
    const json& t = tools[i];
    const std::string where = fmt::format("tools[{}]", i);
    if (!t.is_object() || t.value("type", "") != "function") bad(where + ".type must be \"function\"", "tools");
    if (!t.contains("function") || !t["function"].is_object()) bad(where + ".function must be an object", "tools");
    const json& f = t["function"];
    if (!f.contains("name") || !f["name"].is_string()) bad(where + ".function.name must be a string", "tools");
    const std::string name = f["name"];
    bool ok = !name.empty() && name.size() <= 64;
    for (char c : name) ok = ok && (std::isalnum(uint8_t(c)) || c == '_' || c == '-');
    if (!ok) bad(where + ".function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -", "tools");
    if (f.contains("description") && !f["description"].is_string() && !f["description"].is_null())
      bad(where + ".function.description must be a string", "tools");
    if (f.contains("parameters") && !f["parameters"].is_object() && !f["parameters"].is_null())
      bad(where + ".function.parameters must be a JSON Schema object", "tools");
  }
}

// Assistant messages that carry tool_calls: each {id?, type: function, function: {name, arguments: string}}.
void validate_tool_calls(const json& m, const std::string& where) {
  if (!m.contains("tool_calls") || m["tool_calls"].is_null()) return;
  if (!m["tool_calls"].is_array()) bad(where + ".tool_calls must be an array", "messages");
  for (auto& c : m["tool_calls"]) {
    if (!c.is_object() || !c.contains("function") || !c["function"].is_object() || !c["function"].contains("name") ||
        !c["function"]["name"].is_string() || !c["function"].contains("arguments") || !c["function"]["arguments"].is_string())
      bad(where + ".tool_calls entries must be {type, function: {name, arguments (a JSON string)}}", "messages");
  }
}

}  // namespace

std::string tools_system_text(const json& tools) {
  std::string s =
      "You can call functions. To call one, answer with exactly this format (the arguments are JSON):\n"
      "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>FUNCTION_NAME\n```json\n"
      "{\"param\": \"value\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n\n## Tools\n";
  for (auto& t : tools) s += "\n```json\n" + t["function"].dump() + "\n```\n";
  return s;
}

ParsedRequest parse_completion_request(const std::string& body, bool chat, const Tokenizer& tok,
                                       const std::string& served_model, const RequestLimits& lim) {
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded()) bad("the request body is not valid JSON");
  if (!j.is_object()) bad("the request body must be a JSON object");
  ParsedRequest r;
  r.chat = chat;
  if (!j.contains("model") || !j["model"].is_string()) bad("'model' is required and must be a string", "model");
  r.model = j["model"];
  if (r.model != served_model)
    throw ApiError(404, "invalid_request_error", fmt::format("The model '{}' does not exist (this server serves '{}')", r.model, served_model), "model");
  if (j.contains("stream") && !j["stream"].is_null() && !j["stream"].is_boolean()) bad("'stream' must be a boolean", "stream");
  r.stream = j.value("stream", false);
  if (j.contains("stream_options") && j["stream_options"].is_object())
    r.include_usage = j["stream_options"].value("include_usage", false);
  r.n = integer(j, "n", 1, 1, lim.max_n);
  EngineRequest e;
  e.sampling.temperature = number(j, "temperature", 1.0, 0.0, 2.0);
  e.sampling.top_p = number(j, "top_p", 1.0, 1e-9, 1.0);
  e.sampling.top_k = integer(j, "top_k", 0, 0, int64_t(1) << 30);
  if (j.contains("seed") && !j["seed"].is_null()) {
    if (!j["seed"].is_number_integer()) bad("'seed' must be an integer", "seed");
    e.sampling.seed = uint64_t(j["seed"].get<int64_t>());
  } else {
    e.sampling.seed = std::random_device{}();
  }
  if (j.contains("ignore_eos") && !j["ignore_eos"].is_boolean() && !j["ignore_eos"].is_null())
    bad("'ignore_eos' must be a boolean", "ignore_eos");
  e.ignore_eos = j.value("ignore_eos", false);
  e.presence_penalty = number(j, "presence_penalty", 0.0, -2.0, 2.0);
  e.frequency_penalty = number(j, "frequency_penalty", 0.0, -2.0, 2.0);
  if (j.contains("logit_bias") && !j["logit_bias"].is_null()) {
    const json& lb = j["logit_bias"];
    if (!lb.is_object()) bad("'logit_bias' must map token ids (as strings) to numbers in [-100, 100]", "logit_bias");
    if (lb.size() > 1024) bad("'logit_bias' holds at most 1024 tokens", "logit_bias");
    for (auto& [k, v] : lb.items()) {
      char* end = nullptr;
      const long long id = std::strtoll(k.c_str(), &end, 10);
      if (k.empty() || *end != 0 || id < 0 || id >= int64_t(tok.vocab_size()))
        bad(fmt::format("logit_bias key '{}' is not a token id of this model", k), "logit_bias");
      if (!v.is_number() || !(v.get<double>() >= -100 && v.get<double>() <= 100))
        bad(fmt::format("logit_bias[{}] must be a number in [-100, 100]", k), "logit_bias");
      e.logit_bias.push_back({int32_t(id), float(v.get<double>())});
    }
  }
  // Logprobs: chat takes logprobs (bool) + top_logprobs (0..20); completions take logprobs (0..20) + echo.
  if (chat) {
    if (j.contains("logprobs") && !j["logprobs"].is_null() && !j["logprobs"].is_boolean())
      bad("'logprobs' must be a boolean", "logprobs");
    const bool want = j.value("logprobs", false);
    const int64_t top = integer(j, "top_logprobs", 0, 0, 20);
    if (j.contains("top_logprobs") && !j["top_logprobs"].is_null() && !want)
      bad("'top_logprobs' needs 'logprobs': true", "top_logprobs");
    r.logprobs = want ? top : -1;
  } else {
    if (j.contains("logprobs") && j["logprobs"].is_boolean()) bad("'logprobs' must be an integer in [0, 20]", "logprobs");
    r.logprobs = integer(j, "logprobs", -1, 0, 20);
    if (j.contains("echo") && !j["echo"].is_null() && !j["echo"].is_boolean()) bad("'echo' must be a boolean", "echo");
    r.echo = j.value("echo", false);
    if (r.echo && r.stream) bad("'echo' is not supported with 'stream'", "echo");
  }
  e.logprobs = r.logprobs;
  e.prompt_logprobs = r.echo && r.logprobs >= 0;
  if (j.contains("stop") && !j["stop"].is_null()) {
    if (j["stop"].is_string()) e.stop.push_back(j["stop"]);
    else if (j["stop"].is_array() && j["stop"].size() <= 4) {
      for (auto& s : j["stop"]) {
        if (!s.is_string()) bad("'stop' must be a string or a list of up to 4 strings", "stop");
        if (!s.get<std::string>().empty()) e.stop.push_back(s);
      }
    } else {
      bad("'stop' must be a string or a list of up to 4 strings", "stop");
    }
  }
  std::vector<std::vector<int32_t>> prompts;
  if (chat) {
    if (!j.contains("messages")) bad("'messages' is required", "messages");
    json msgs = normalize_messages(j["messages"]);
    for (size_t i = 0; i < msgs.size(); ++i) validate_tool_calls(msgs[i], fmt::format("messages[{}]", i));
    // tools / tool_choice: "none" (no tools in the prompt, no parsing), "auto", "required" or a named function
    // (both force the start of a tool call as the beginning of the assistant's answer).
    json tools = j.contains("tools") && !j["tools"].is_null() ? j["tools"] : json();
    if (!tools.is_null()) validate_tools(tools);
    std::string choice = tools.is_null() || tools.empty() ? "none" : "auto";
    std::string forced_name;
    if (j.contains("tool_choice") && !j["tool_choice"].is_null()) {
      const json& tc = j["tool_choice"];
      if (tc.is_string()) {
        choice = tc;
        if (choice != "none" && choice != "auto" && choice != "required")
          bad("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice");
      } else if (tc.is_object() && tc.value("type", "") == "function" && tc.contains("function") &&
                 tc["function"].is_object() && tc["function"].contains("name") && tc["function"]["name"].is_string()) {
        choice = "named";
        forced_name = tc["function"]["name"];
      } else {
        bad("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice");
      }
      if (choice != "none" && (tools.is_null() || tools.empty())) bad("'tool_choice' needs 'tools'", "tool_choice");
      if (choice == "named") {
        bool found = false;
        for (auto& t : tools) found = found || t["function"]["name"] == forced_name;
        if (!found) bad(fmt::format("tool_choice names '{}', which is not in 'tools'", forced_name), "tool_choice");
      }
    }
    json extra = json::object();
    if (choice != "none") {
      r.parse_tools = true;
      extra["tools"] = tools;
      if (tok.chat_template().find("tools") == std::string::npos) {
        // The template ignores `tools`: describe them in the system prompt (appended to the first system message).
        const std::string sys = tools_system_text(tools);
        if (!msgs.empty() && msgs[0]["role"] == "system" && msgs[0]["content"].is_string())
          msgs[0]["content"] = msgs[0]["content"].get<std::string>() + "\n\n" + sys;
        else
          msgs.insert(msgs.begin(), json{{"role", "system"}, {"content", sys}});
      }
      if (choice == "required" || choice == "named")
        r.assistant_prefix = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>";
      if (choice == "named") r.assistant_prefix += forced_name + "\n```json\n";
    }
    r.parse_reasoning = lim.reasoning_parser;
    std::string text;
    try {
      nlohmann::ordered_json om = nlohmann::ordered_json::parse(msgs.dump());
      text = tok.apply_chat_template(om, true, nlohmann::ordered_json::parse(extra.dump()));
    } catch (const InputError& ex) {
      bad(std::string("the chat template failed on these messages: ") + ex.what(), "messages");
    }
    text += r.assistant_prefix;
    prompts.push_back(tok.encode(text));  // the template writes BOS itself; special tokens are matched in the text
    r.prompt_texts.push_back(text);
  } else {
    if (!j.contains("prompt")) bad("'prompt' is required", "prompt");
    const json& p = j["prompt"];
    auto ids_of = [&](const json& a) {
      std::vector<int32_t> ids;
      for (auto& v : a) {
        if (!v.is_number_integer()) bad("'prompt' token arrays must hold integers", "prompt");
        const int64_t id = v.get<int64_t>();
        if (id < 0 || id >= int64_t(tok.vocab_size()) + (int64_t(1) << 20)) bad(fmt::format("token id {} is out of range", id), "prompt");
        ids.push_back(int32_t(id));
      }
      return ids;
    };
    // A string, a list of token ids, or a batch: a list of strings or a list of token-id lists.
    if (p.is_string()) {
      prompts.push_back(tok.encode_with_bos(p.get<std::string>()));
      r.prompt_texts.push_back(p);
    } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
      prompts.push_back(ids_of(p));
      r.prompt_texts.push_back(tok.decode(prompts.back()));
    } else if (p.is_array() && !p.empty()) {
      if (int64_t(p.size()) > lim.max_prompts) bad(fmt::format("at most {} prompts per request", lim.max_prompts), "prompt");
      for (auto& q : p) {
        if (q.is_string()) {
          prompts.push_back(tok.encode_with_bos(q.get<std::string>()));
          r.prompt_texts.push_back(q);
        } else if (q.is_array() && !q.empty()) {
          prompts.push_back(ids_of(q));
          r.prompt_texts.push_back(tok.decode(prompts.back()));
        } else {
          bad("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists", "prompt");
        }
      }
    } else {
      bad("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists", "prompt");
    }
  }
  if (int64_t(prompts.size()) * r.n > lim.max_prompts)
    bad(fmt::format("prompts x n is {}; at most {} choices per request", int64_t(prompts.size()) * r.n, lim.max_prompts), "n");
  const int64_t context = lim.context;
  const int64_t max_prompt = lim.max_prompt_tokens > 0 ? std::min(lim.max_prompt_tokens, context - 1) : context - 1;
  const char* mt_key = j.contains("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  for (auto& ids : prompts) {
    if (ids.empty()) bad("the prompt is empty", chat ? "messages" : "prompt");
    const int64_t plen = int64_t(ids.size());
    if (plen > max_prompt)
      bad(fmt::format("This model's maximum context length is {} tokens and prompts may hold {}, but the prompt has {} tokens",
                      context, max_prompt, plen), chat ? "messages" : "prompt");
    EngineRequest q = e;
    q.prompt = std::move(ids);
    // max_tokens 0 scores the prompt only (echo with logprobs, as lm-evaluation-harness sends).
    q.max_tokens = integer(j, mt_key, std::min(lim.default_max_tokens, context - plen), e.prompt_logprobs ? 0 : 1,
                           int64_t(1) << 31);
    if (plen + q.max_tokens > context)
      bad(fmt::format("This model's maximum context length is {} tokens; the prompt ({}) plus {} ({}) exceeds it",
                      context, plen, mt_key, q.max_tokens), mt_key);
    r.prompts.push_back(std::move(q));
  }
  return r;
}

}  // namespace dsv3
