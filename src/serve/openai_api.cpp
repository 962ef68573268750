#include "serve/openai_api.h"

#include <cmath>
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

}  // namespace

ParsedRequest parse_completion_request(const std::string& body, bool chat, const Tokenizer& tok,
                                       const std::string& served_model, int64_t context, int64_t default_max_tokens) {
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
  if (integer(j, "n", 1, 1, 1) != 1) bad("only n = 1 is supported", "n");
  auto& e = r.engine;
  e.sampling.temperature = number(j, "temperature", 1.0, 0.0, 2.0);
  e.sampling.top_p = number(j, "top_p", 1.0, 1e-9, 1.0);
  e.sampling.top_k = integer(j, "top_k", 0, 0, int64_t(1) << 30);
  if (j.contains("seed") && !j["seed"].is_null()) {
    if (!j["seed"].is_number_integer()) bad("'seed' must be an integer", "seed");
    e.sampling.seed = uint64_t(j["seed"].get<int64_t>());
  } else {
    e.sampling.seed = std::random_device{}();
  }
  e.ignore_eos = j.value("ignore_eos", false);
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
  if (chat) {
    if (!j.contains("messages")) bad("'messages' is required", "messages");
    json msgs = normalize_messages(j["messages"]);
    std::string text;
    try {
      text = tok.apply_chat_template(msgs, true);
    } catch (const InputError& ex) {
      bad(std::string("the chat template failed on these messages: ") + ex.what(), "messages");
    }
    e.prompt = tok.encode(text);  // the template writes BOS itself; special tokens are matched in the text
  } else {
    if (!j.contains("prompt")) bad("'prompt' is required", "prompt");
    const json& p = j["prompt"];
    if (p.is_string()) {
      e.prompt = tok.encode_with_bos(p.get<std::string>());
    } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
      for (auto& v : p) {
        if (!v.is_number_integer()) bad("'prompt' token arrays must hold integers", "prompt");
        e.prompt.push_back(int32_t(v.get<int64_t>()));
      }
    } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
      e.prompt = tok.encode_with_bos(p[0].get<std::string>());
    } else {
      bad("'prompt' must be a string, a one-element list of strings, or a list of token ids", "prompt");
    }
  }
  if (e.prompt.empty()) bad("the prompt is empty", chat ? "messages" : "prompt");
  const int64_t plen = int64_t(e.prompt.size());
  if (plen >= context)
    bad(fmt::format("This model's maximum context length is {} tokens, but the prompt has {} tokens", context, plen),
        chat ? "messages" : "prompt");
  const char* mt_key = j.contains("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  e.max_tokens = integer(j, mt_key, std::min(default_max_tokens, context - plen), 1, int64_t(1) << 31);
  if (plen + e.max_tokens > context)
    bad(fmt::format("This model's maximum context length is {} tokens; the prompt ({}) plus {} ({}) exceeds it",
                    context, plen, mt_key, e.max_tokens), mt_key);
  return r;
}

}  // namespace dsv3
