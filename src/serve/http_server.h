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
};

// Blocks until SIGINT/SIGTERM. Throws InputError when the port cannot be bound.
void run_server(Engine& engine, const Tokenizer& tok, const ServerOptions& opt);

}  // namespace dsv3
