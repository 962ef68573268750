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
  EngineRequest engine;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool chat = false;
  std::string model;
};

// Validates and converts a request body. `default_max_tokens` applies when max_tokens is absent.
ParsedRequest parse_completion_request(const std::string& body, bool chat, const Tokenizer& tok,
                                       const std::string& served_model, int64_t context, int64_t default_max_tokens);

}  // namespace dsv3
