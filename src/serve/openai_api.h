#pragma once
// The OpenAI-compatible request parsing and response shapes for /v1/completions and /v1/chat/completions.
#include <nlohmann/json.hpp>
#include <string>

#include "serve/engine.h"

namespace dsv3 {

// An error to send back: HTTP status plus an OpenAI-style body {"error": {message, type, param, code}}.
struct ApiError : Error {
  ApiError(int status, std::string type, const std::string& msg, std::string param = "")
      : Error(msg), status(status), type(std::move(type)), param(std::move(param)) {}
  int status;
  std::string type, param;
};
nlohmann::json error_body(const std::string& message, const std::string& type, const std::string& param = "");

struct ParsedRequest {
  std::vector<EngineRequest> prompts;      // one per prompt (completions take a list); each runs `n` times
  std::vector<std::string> prompt_texts;   // the prompts as text (what `echo` puts before the output)
  int64_t n = 1;                           // choices per prompt (seeds seed, seed + 1, ...)
  bool echo = false;                       // completions: the prompt (and its logprobs) before the output
  int64_t logprobs = -1;                   // -1 off; else top alternatives per token (chat: top_logprobs)
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool chat = false;
  std::string model;
  // Chat output parsing: DeepSeek-V3 tool calls into `tool_calls` (tools given and tool_choice != none), and
  // R1 thinking into `reasoning_content`. `assistant_prefix` is output the prompt already holds (the start of
  // a tool call that tool_choice "required" or a named function forces); the parser sees it before the output.
  bool parse_tools = false;
  bool parse_reasoning = false;
  std::string assistant_prefix;
};

struct RequestLimits {
  int64_t context = 0;             // the model's context (prompt + max_tokens)
  int64_t default_max_tokens = 256;
  int64_t max_prompt_tokens = 0;   // 0: context - 1
  int64_t max_n = 16;              // n per prompt
  int64_t max_prompts = 256;       // choices per request: prompts x n
  bool reasoning_parser = false;   // --reasoning-parser deepseek-r1
};

// Validates and converts a request body (ApiError with an OpenAI-style status, type and param).
ParsedRequest parse_completion_request(const std::string& body, bool chat, const Tokenizer& tok,
                                       const std::string& served_model, const RequestLimits& lim);

// The system text that describes `tools` to a model whose chat template does not render them itself
// (DeepSeek-V3's own template does not): the call format the tool parser reads, then each tool as JSON.
std::string tools_system_text(const nlohmann::json& tools);

}  // namespace dsv3
