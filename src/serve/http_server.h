#pragma once
// `dsv3 serve`: an OpenAI-compatible HTTP server (cpp-httplib) over the continuous-batching engine.
// GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with stream: true as
// server-sent events), GET /metrics (Prometheus text).
#include <string>

#include "serve/engine.h"

namespace dsv3 {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;
  std::string model_name;          // what /v1/models lists and requests must name
  int64_t default_max_tokens = 256;
  int http_threads = 64;           // concurrent connections (streams hold one each)
  std::string api_key;             // non-empty: every route but /health needs "Authorization: Bearer KEY" (else 401)
  int64_t max_body_bytes = 16 << 20;  // larger request bodies get 413
  int64_t max_prompt_tokens = 0;   // longer prompts get 400 (0: the context minus one)
  int64_t max_n = 16;              // choices per request (prompts x n)
  bool reasoning_parser = false;   // --reasoning-parser deepseek-r1: <think>...</think> -> reasoning_content
};

// Blocks until SIGINT/SIGTERM. Throws InputError when the port cannot be bound.
void run_server(Engine& engine, const Tokenizer& tok, const ServerOptions& opt);

}  // namespace dsv3
