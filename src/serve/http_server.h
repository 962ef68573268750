#pragma once
// `dsv3 serve`: an OpenAI-compatible HTTP server (cpp-httplib) over the continuous-batching engine.
// GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with stream: true as
// server-sent events), GET /metrics (Prometheus text).
#include <mutex>
#include <string>

#include "serve/engine.h"

namespace dsv3 {

// Lets another thread learn the bound port of a running server and stop it (the Python package runs the
// server in-process on its own thread). stop() may be called before, during or after run_server.
class ServerControl {
 public:
  void stop();
  int port() const;        // 0 until the server has bound its port
  bool listening() const;  // bound and not yet stopped

 private:
  friend bool run_server_attach(ServerControl&, void*, int);
  friend void run_server_detach(ServerControl&);
  mutable std::mutex mu_;
  void* server_ = nullptr;  // httplib::Server while running
  bool stop_requested_ = false;
  int port_ = 0;
};

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
  bool handle_signals = true;      // SIGINT/SIGTERM stop the server (the CLI); off for an embedding process
  ServerControl* control = nullptr;
};

// The name a model directory is served under by default: its last path component.
std::string default_served_name(const std::string& model_dir);
// InputError on options the engine or server cannot run with (named by their `dsv3 serve` flags).
void check_serve_options(const ServingLimits& lim, const EngineConfig& ec, const ServerOptions& so);

// Blocks until SIGINT/SIGTERM (handle_signals) or control->stop(). port 0 binds a free port (see
// ServerControl::port). Throws InputError when the port cannot be bound.
void run_server(Engine& engine, const Tokenizer& tok, const ServerOptions& opt);

}  // namespace dsv3
