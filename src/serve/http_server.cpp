#include "serve/http_server.h"

#include <httplib.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "serve/openai_api.h"

namespace dsv3 {

using json = nlohmann::json;

namespace {

std::atomic<httplib::Server*> g_server{nullptr};

void on_signal(int) {
  if (auto* s = g_server.load()) s->stop();
}

std::string new_id(const char* prefix) {
  static std::atomic<uint64_t> n{0};
  return fmt::format("{}-{:x}{:06x}", prefix, uint64_t(std::time(nullptr)), n.fetch_add(1));
}

void send_error(httplib::Response& res, int status, const std::string& type, const std::string& msg,
                const std::string& param = "") {
  res.status = status;
  res.set_content(error_body(msg, type, param).dump(), "application/json");
}

json usage_of(const RequestStream& s) {
  const int64_t c = s.completion_tokens;
  return {{"prompt_tokens", s.prompt_tokens}, {"completion_tokens", c}, {"total_tokens", s.prompt_tokens + c}};
}

// One streamed chunk (chat or completion flavour) in OpenAI's shape.
json chunk(const ParsedRequest& pr, const std::string& id, int64_t created, const std::string& text,
           const json& finish, bool first) {
  json choice;
  if (pr.chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || first) delta["content"] = text;
    choice = {{"index", 0}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", finish}};
  } else {
    choice = {{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", finish}};
  }
  return {{"id", id}, {"object", pr.chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
          {"model", pr.model}, {"choices", json::array({choice})}};
}

void handle_completion(Engine& engine, const Tokenizer& tok, const ServerOptions& opt, bool chat,
                       const httplib::Request& req, httplib::Response& res) {
  ParsedRequest pr;
  std::shared_ptr<RequestStream> stream;
  try {
    pr = parse_completion_request(req.body, chat, tok, opt.model_name, engine.model_config().max_position_embeddings,
                                  opt.default_max_tokens);
    stream = engine.submit(pr.engine);
  } catch (const ApiError& e) {
    return send_error(res, e.status, e.type, e.what(), e.param);
  } catch (const OverloadedError& e) {
    return send_error(res, 503, "server_overloaded", e.what());
  } catch (const InputError& e) {
    return send_error(res, 400, "invalid_request_error", e.what());
  } catch (const std::exception& e) {
    return send_error(res, 500, "server_error", e.what());
  }
  const std::string id = new_id(chat ? "chatcmpl" : "cmpl");
  const int64_t created = int64_t(std::time(nullptr));
  if (!pr.stream) {
    std::string text, finish;
    EngineEvent ev;
    for (;;) {
      if (!stream->next(&ev, std::chrono::milliseconds(1000))) continue;
      text += ev.text;
      if (ev.done) {
        finish = ev.finish_reason;
        if (!ev.error.empty()) return send_error(res, 500, "server_error", ev.error);
        break;
      }
    }
    json choice = chat ? json{{"index", 0}, {"message", {{"role", "assistant"}, {"content", text}}}, {"logprobs", nullptr}, {"finish_reason", finish}}
                       : json{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", finish}};
    json body = {{"id", id}, {"object", chat ? "chat.completion" : "text_completion"}, {"created", created},
                 {"model", pr.model}, {"choices", json::array({choice})}, {"usage", usage_of(*stream)}};
    res.set_content(body.dump(), "application/json");
    return;
  }
  // Server-sent events. A failed write or an unwritable sink means the client left: cancel the sequence so
  // its cache blocks return to the pool.
  auto first = std::make_shared<bool>(true);
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [stream, pr, id, created, first](size_t, httplib::DataSink& sink) {
        auto send = [&](const std::string& payload) {
          std::string line = "data: " + payload + "\n\n";
          return sink.write(line.data(), line.size());
        };
        EngineEvent ev;
        if (!stream->next(&ev, std::chrono::milliseconds(200))) {
          if (sink.is_writable && !sink.is_writable()) {
            stream->cancel();
            return false;
          }
          return true;  // called again
        }
        if (!ev.error.empty()) {
          send(error_body(ev.error, "server_error").dump());
          sink.done();
          return true;
        }
        if (!ev.text.empty() || *first) {
          if (!send(chunk(pr, id, created, ev.text, nullptr, *first).dump())) {
            stream->cancel();
            return false;
          }
          *first = false;
        }
        if (ev.done) {
          send(chunk(pr, id, created, "", ev.finish_reason, false).dump());
          if (pr.include_usage) {
            json u = {{"id", id}, {"object", pr.chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
                      {"model", pr.model}, {"choices", json::array()}, {"usage", usage_of(*stream)}};
            send(u.dump());
          }
          send("[DONE]");
          sink.done();
        }
        return true;
      },
      [stream](bool success) {
        if (!success) stream->cancel();
      });
}

std::string prometheus(const EngineMetrics& m) {
  std::string s;
  auto metric = [&](const char* name, const char* type, const char* help, double v) {
    s += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, v);
  };
  metric("dsv3_requests_total", "counter", "Requests accepted.", double(m.requests_total));
  metric("dsv3_requests_rejected_total", "counter", "Requests refused because the queue was full.", double(m.requests_rejected));
  metric("dsv3_requests_finished_total", "counter", "Requests finished (stop or length).", double(m.requests_finished));
  metric("dsv3_requests_cancelled_total", "counter", "Requests cancelled (client disconnected).", double(m.requests_cancelled));
  metric("dsv3_prompt_tokens_total", "counter", "Prompt tokens accepted.", double(m.prompt_tokens_total));
  metric("dsv3_generation_tokens_total", "counter", "Tokens generated.", double(m.generation_tokens_total));
  metric("dsv3_steps_total", "counter", "Forward steps run.", double(m.steps_total));
  metric("dsv3_batch_sequences_sum", "counter", "Sum over steps of sequences per step.", double(m.batch_seqs_sum));
  metric("dsv3_batch_tokens_sum", "counter", "Sum over steps of tokens per step.", double(m.batch_tokens_sum));
  metric("dsv3_batch_sequences_max", "gauge", "Most sequences in one step.", double(m.batch_seqs_max));
  metric("dsv3_step_seconds_sum", "counter", "Time in forward steps.", m.step_seconds_sum);
  metric("dsv3_request_seconds_sum", "counter", "Sum of request latencies (submit to finish).", m.request_seconds_sum);
  metric("dsv3_time_to_first_token_seconds_sum", "counter", "Sum of times to first token.", m.ttft_seconds_sum);
  metric("dsv3_requests_running", "gauge", "Sequences in the running batch.", double(m.running));
  metric("dsv3_requests_waiting", "gauge", "Requests waiting for admission.", double(m.waiting));
  metric("dsv3_kv_cache_blocks_used", "gauge", "Latent KV-cache blocks in use.", double(m.kv_blocks_used));
  metric("dsv3_kv_cache_blocks_total", "gauge", "Latent KV-cache blocks in the pool.", double(m.kv_blocks_total));
  metric("dsv3_kv_cache_block_tokens", "gauge", "Tokens per KV-cache block.", double(m.kv_block_size));
  metric("dsv3_spec_drafts_total", "counter", "MTP draft tokens verified (speculative decoding).", double(m.spec_drafted));
  metric("dsv3_spec_accepted_total", "counter", "MTP draft tokens accepted.", double(m.spec_accepted));
  metric("dsv3_spec_acceptance_rate", "gauge", "Accepted / verified MTP drafts.",
         m.spec_drafted ? double(m.spec_accepted) / double(m.spec_drafted) : 0.0);
  return s;
}

}  // namespace

std::string default_served_name(const std::string& model_dir) {
  namespace fs = std::filesystem;
  std::string name = fs::path(model_dir).lexically_normal().filename().string();
  if (name.empty()) name = fs::absolute(model_dir).parent_path().filename().string();
  return name;
}

void check_serve_options(const ModelConfig& mc, const EngineConfig& ec, const ServerOptions& so) {
  if (ec.max_batch < 1) fail("--max-batch must be >= 1, got {}", ec.max_batch);
  if (ec.kv_cache_tokens < 0) fail("--kv-cache-tokens must be >= 0, got {}", ec.kv_cache_tokens);
  if (ec.prefill_chunk < 1) fail("--prefill-chunk must be >= 1");
  if (ec.max_queue < 0) fail("--max-queue must be >= 0");
  if (ec.speculative_mtp && mc.num_nextn_predict_layers < 1)
    fail("--speculative mtp needs a model with MTP modules (num_nextn_predict_layers >= 1)");
  if (so.default_max_tokens < 1) fail("--default-max-tokens must be >= 1");
  if (so.port < 0 || so.port > 65535) fail("--port must be in [0, 65535], got {}", so.port);
}

bool run_server_attach(ServerControl& c, void* server, int port) {
  std::lock_guard<std::mutex> g(c.mu_);
  c.server_ = server;
  c.port_ = port;
  return !c.stop_requested_;
}

void run_server_detach(ServerControl& c) {
  std::lock_guard<std::mutex> g(c.mu_);
  c.server_ = nullptr;
}

void ServerControl::stop() {
  std::lock_guard<std::mutex> g(mu_);
  stop_requested_ = true;
  // httplib's stop() is a no-op until listen() runs: callers repeat it until run_server returns.
  if (server_) static_cast<httplib::Server*>(server_)->stop();
}

int ServerControl::port() const {
  std::lock_guard<std::mutex> g(mu_);
  return port_;
}

bool ServerControl::listening() const {
  std::lock_guard<std::mutex> g(mu_);
  return server_ && !stop_requested_;
}

void run_server(Engine& engine, const Tokenizer& tok, const ServerOptions& opt) {
  httplib::Server svr;
  const int threads = opt.http_threads;
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  svr.set_payload_max_length(size_t(16) << 20);
  svr.Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("{\"status\":\"ok\"}", "application/json");
  });
  svr.Get("/v1/models", [&](const httplib::Request&, httplib::Response& res) {
    json m = {{"object", "list"},
              {"data", json::array({{{"id", opt.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "dsv3"},
                                      {"max_model_len", engine.model_config().max_position_embeddings}}})}};
    res.set_content(m.dump(), "application/json");
  });
  svr.Post("/v1/completions", [&](const httplib::Request& req, httplib::Response& res) {
    handle_completion(engine, tok, opt, false, req, res);
  });
  svr.Post("/v1/chat/completions", [&](const httplib::Request& req, httplib::Response& res) {
    handle_completion(engine, tok, opt, true, req, res);
  });
  svr.Get("/metrics", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(prometheus(engine.metrics()), "text/plain; version=0.0.4");
  });
  svr.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (res.body.empty()) {
      const char* type = res.status == 404 ? "not_found" : "invalid_request_error";
      res.set_content(error_body(fmt::format("HTTP {}", res.status), type).dump(), "application/json");
    }
  });
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string msg = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      msg = e.what();
    } catch (...) {
    }
    send_error(res, 500, "server_error", msg);
  });
  int port = opt.port;
  if (port == 0) port = svr.bind_to_any_port(opt.host);
  else if (!svr.bind_to_port(opt.host, port)) port = -1;
  if (port <= 0) fail("cannot listen on {}:{} (in use, or not an address of this machine)", opt.host, opt.port);
  if (opt.handle_signals) {
    g_server = &svr;
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
  }
  std::signal(SIGPIPE, SIG_IGN);
  const bool go = !opt.control || run_server_attach(*opt.control, &svr, port);
  std::fprintf(stderr, "dsv3 serve: model '%s' on http://%s:%d (latent KV cache: %lld tokens)\n", opt.model_name.c_str(),
               opt.host.c_str(), port, (long long)engine.capacity_tokens());
  if (go) svr.listen_after_bind();
  if (opt.control) run_server_detach(*opt.control);
  if (opt.handle_signals) g_server = nullptr;
}

}  // namespace dsv3
