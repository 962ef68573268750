#include "serve/http_server.h"

#include <httplib.h>

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "serve/chat_output.h"
#include "serve/openai_api.h"
#include "tokenizer/utf8.h"

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

// A token as logprobs show it: its text, or "bytes:\xNN..." when it is not whole UTF-8 (a split character).
std::string token_text(const Tokenizer& tok, int32_t id) {
  std::string piece = tok.token_to_piece(id);
  if (utf8::is_valid(piece)) return piece;
  std::string s = "bytes:";
  for (unsigned char c : piece) s += fmt::format("\\x{:02x}", c);
  return s;
}

json bytes_of(const Tokenizer& tok, int32_t id) {
  json b = json::array();
  for (unsigned char c : tok.token_to_piece(id)) b.push_back(int(c));
  return b;
}

// Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}.
json chat_logprobs(const Tokenizer& tok, const std::vector<TokenLogprob>& ts) {
  json content = json::array();
  for (auto& t : ts) {
    json top = json::array();
    for (auto& [id, lp] : t.top) top.push_back({{"token", token_text(tok, id)}, {"logprob", lp}, {"bytes", bytes_of(tok, id)}});
    content.push_back({{"token", token_text(tok, t.id)}, {"logprob", t.logprob}, {"bytes", bytes_of(tok, t.id)}, {"top_logprobs", top}});
  }
  return {{"content", content}};
}

// Completions logprobs: parallel lists tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset
// (byte offsets into the returned text). The first prompt token (echo) has null logprob and top.
json completion_logprobs(const Tokenizer& tok, const std::vector<TokenLogprob>& ts, int64_t offset0) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  int64_t off = offset0;
  for (auto& t : ts) {
    const std::string text = token_text(tok, t.id);
    tokens.push_back(text);
    offs.push_back(off);
    off += int64_t(tok.token_to_piece(t.id).size());
    if (std::isnan(t.logprob)) {
      lps.push_back(nullptr);
      tops.push_back(nullptr);
      continue;
    }
    lps.push_back(t.logprob);
    json top = json::object();
    for (auto& [id, lp] : t.top) top[token_text(tok, id)] = lp;
    tops.push_back(top);
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

json tool_calls_json(const std::vector<ToolCall>& calls, int64_t first_index) {
  json a = json::array();
  for (size_t i = 0; i < calls.size(); ++i)
    a.push_back({{"index", first_index + int64_t(i)}, {"id", calls[i].id}, {"type", "function"},
                 {"function", {{"name", calls[i].name}, {"arguments", calls[i].arguments}}}});
  return a;
}

// One choice of a request: a running engine sequence and what has been read from it.
struct Choice {
  int64_t index = 0;
  size_t prompt = 0;               // which prompt of the request
  std::shared_ptr<RequestStream> stream;
  std::unique_ptr<ChatOutputParser> parser;
  std::string text;                // completions: the output text
  ChatDelta message;               // chat: the parsed message so far
  std::vector<TokenLogprob> tokens, prompt_tokens;
  std::string finish;
  bool done = false, started = false;
};

std::string finish_reason(const Choice& c) {
  if (c.finish == "stop" && c.parser && c.parser->tool_calls_seen() > 0) return "tool_calls";
  return c.finish;
}

void merge(ChatDelta& into, ChatDelta d) {
  into.reasoning += d.reasoning;
  into.content += d.content;
  for (auto& t : d.tool_calls) into.tool_calls.push_back(std::move(t));
}

json usage_of(const std::vector<std::unique_ptr<Choice>>& cs) {
  int64_t p = 0, c = 0;
  std::vector<bool> counted;
  for (auto& ch : cs) {
    if (counted.size() <= ch->prompt) counted.resize(ch->prompt + 1, false);
    if (!counted[ch->prompt]) p += ch->stream->prompt_tokens, counted[ch->prompt] = true;  // a prompt once
    c += ch->stream->completion_tokens;
  }
  return {{"prompt_tokens", p}, {"completion_tokens", c}, {"total_tokens", p + c}};
}

// The delta of one streamed chat chunk.
json chat_delta(const ChatDelta& d, bool first, int64_t first_tool_index) {
  json delta = json::object();
  if (first) delta["role"] = "assistant";
  if (!d.reasoning.empty()) delta["reasoning_content"] = d.reasoning;
  if (!d.content.empty() || (first && d.reasoning.empty() && d.tool_calls.empty())) delta["content"] = d.content;
  if (!d.tool_calls.empty()) delta["tool_calls"] = tool_calls_json(d.tool_calls, first_tool_index);
  return delta;
}

void handle_completion(Engine& engine, const Tokenizer& tok, const ServerOptions& opt, bool chat,
                       const httplib::Request& req, httplib::Response& res) {
  ParsedRequest pr;
  auto choices = std::make_shared<std::vector<std::unique_ptr<Choice>>>();
  auto cancel_all = [choices] {
    for (auto& c : *choices) c->stream->cancel();
  };
  try {
    RequestLimits lim;
    lim.context = engine.limits().max_positions;
    lim.default_max_tokens = opt.default_max_tokens;
    lim.max_prompt_tokens = opt.max_prompt_tokens;
    lim.max_n = opt.max_n;
    lim.max_prompts = std::max<int64_t>(opt.max_n, 256);  // choices per request (prompts x n)
    lim.reasoning_parser = opt.reasoning_parser;
    pr = parse_completion_request(req.body, chat, tok, opt.model_name, lim);
    // Choice index = prompt * n + j; sample j of a prompt uses seed + j.
    for (size_t p = 0; p < pr.prompts.size(); ++p)
      for (int64_t j = 0; j < pr.n; ++j) {
        auto c = std::make_unique<Choice>();
        c->index = int64_t(p) * pr.n + j;
        c->prompt = p;
        EngineRequest er = pr.prompts[p];
        er.sampling.seed += uint64_t(j);
        if (chat && (pr.parse_tools || pr.parse_reasoning)) {
          c->parser = std::make_unique<ChatOutputParser>(pr.parse_tools, pr.parse_reasoning);
          if (!pr.assistant_prefix.empty()) merge(c->message, c->parser->feed(pr.assistant_prefix));
        }
        c->stream = engine.submit(std::move(er));
        choices->push_back(std::move(c));
      }
  } catch (const ApiError& e) {
    cancel_all();
    return send_error(res, e.status, e.type, e.what(), e.param);
  } catch (const OverloadedError& e) {
    cancel_all();
    return send_error(res, 503, "server_overloaded", e.what());
  } catch (const InputError& e) {
    cancel_all();
    return send_error(res, 400, "invalid_request_error", e.what());
  } catch (const std::exception& e) {
    cancel_all();
    return send_error(res, 500, "server_error", e.what());
  }
  const std::string id = new_id(chat ? "chatcmpl" : "cmpl");
  const int64_t created = int64_t(std::time(nullptr));
  if (!pr.stream) {
    for (auto& cp : *choices) {
      Choice& c = *cp;
      EngineEvent ev;
      while (!c.done) {
        if (!c.stream->next(&ev, std::chrono::milliseconds(1000))) continue;
        c.text += ev.text;
        for (auto& t : ev.tokens) c.tokens.push_back(std::move(t));
        for (auto& t : ev.prompt_tokens) c.prompt_tokens.push_back(std::move(t));
        if (ev.done) {
          c.done = true;
          c.finish = ev.finish_reason;
          if (!ev.error.empty()) {
            cancel_all();
            return send_error(res, 500, "server_error", ev.error);
          }
        }
      }
    }
    json out = json::array();
    for (auto& cp : *choices) {
      Choice& c = *cp;
      json choice = {{"index", c.index}, {"logprobs", nullptr}};
      if (chat) {
        json msg = {{"role", "assistant"}};
        if (c.parser) {
          merge(c.message, c.parser->feed(c.text));
          merge(c.message, c.parser->finish());
          msg["content"] = c.message.content.empty() && !c.message.tool_calls.empty() ? json(nullptr) : json(c.message.content);
          if (pr.parse_reasoning) msg["reasoning_content"] = c.message.reasoning;
          if (!c.message.tool_calls.empty()) {
            json tc = tool_calls_json(c.message.tool_calls, 0);
            for (auto& t : tc) t.erase("index");
            msg["tool_calls"] = tc;
          }
        } else {
          msg["content"] = c.text;
        }
        choice["message"] = msg;
        if (pr.logprobs >= 0) choice["logprobs"] = chat_logprobs(tok, c.tokens);
      } else {
        std::string text = c.text;
        int64_t off0 = 0;
        std::vector<TokenLogprob> all;
        if (pr.echo) {
          text = pr.prompt_texts[c.prompt] + text;
          all = c.prompt_tokens;
        }
        if (pr.logprobs >= 0) {
          all.insert(all.end(), c.tokens.begin(), c.tokens.end());
          choice["logprobs"] = completion_logprobs(tok, all, off0);
        }
        choice["text"] = text;
      }
      choice["finish_reason"] = finish_reason(c);
      out.push_back(choice);
    }
    json body = {{"id", id}, {"object", chat ? "chat.completion" : "text_completion"}, {"created", created},
                 {"model", pr.model}, {"choices", out}, {"usage", usage_of(*choices)}};
    res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
    return;
  }
  // Server-sent events, one chunk per event of any choice (each chunk names its choice's index). A failed
  // write or an unwritable sink means the client left: cancel every sequence so its cache blocks return.
  res.set_header("Cache-Control", "no-cache");
  const bool include_usage = pr.include_usage;
  const std::string model = pr.model;
  const int64_t logprobs = pr.logprobs;
  res.set_chunked_content_provider(
      "text/event-stream",
      [choices, chat, id, created, model, include_usage, logprobs, &tok](size_t, httplib::DataSink& sink) {
        auto send = [&](const json& payload) {
          std::string line = "data: " + payload.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
          return sink.write(line.data(), line.size());
        };
        auto wrap = [&](json choice) {
          return json{{"id", id}, {"object", chat ? "chat.completion.chunk" : "text_completion"}, {"created", created},
                      {"model", model}, {"choices", json::array({std::move(choice)})}};
        };
        Choice* c = nullptr;
        for (auto& cp : *choices)
          if (!cp->done) {
            c = cp.get();
            break;
          }
        if (!c) {  // every choice has finished (not called again after done(); defensive)
          sink.done();
          return true;
        }
        EngineEvent ev;
        bool got = false;
        // Poll every unfinished choice; wait a little on the first when none has anything.
        for (auto& cp : *choices)
          if (!cp->done && cp->stream->next(&ev, std::chrono::milliseconds(0))) {
            c = cp.get();
            got = true;
            break;
          }
        if (!got && c && !(got = c->stream->next(&ev, std::chrono::milliseconds(100)))) {
          if (sink.is_writable && !sink.is_writable()) {
            for (auto& cp : *choices) cp->stream->cancel();
            return false;
          }
          return true;  // called again
        }
        if (!ev.error.empty()) {
          send(error_body(ev.error, "server_error"));
          for (auto& cp : *choices) cp->stream->cancel();
          sink.done();
          return true;
        }
        ChatDelta d;
        if (chat && c->parser) {
          d = c->parser->feed(ev.text);
          if (ev.done) merge(d, c->parser->finish());
        } else {
          d.content = ev.text;
        }
        const bool has_tokens = logprobs >= 0 && !ev.tokens.empty();
        if (!d.empty() || !c->started || has_tokens) {
          json choice;
          if (chat) {
            choice = {{"index", c->index}, {"delta", chat_delta(d, !c->started, int64_t(c->message.tool_calls.size()))},
                      {"logprobs", has_tokens ? chat_logprobs(tok, ev.tokens) : json(nullptr)}, {"finish_reason", nullptr}};
            merge(c->message, d);
          } else {
            choice = {{"index", c->index}, {"text", d.content},
                      {"logprobs", has_tokens ? completion_logprobs(tok, ev.tokens, int64_t(c->text.size())) : json(nullptr)},
                      {"finish_reason", nullptr}};
            c->text += d.content;
          }
          if (!send(wrap(choice))) {
            for (auto& cp : *choices) cp->stream->cancel();
            return false;
          }
          c->started = true;
        }
        if (ev.done) {
          c->done = true;
          c->finish = ev.finish_reason;
          json choice = chat ? json{{"index", c->index}, {"delta", json::object()}, {"logprobs", nullptr}, {"finish_reason", finish_reason(*c)}}
                             : json{{"index", c->index}, {"text", ""}, {"logprobs", nullptr}, {"finish_reason", finish_reason(*c)}};
          send(wrap(choice));
          bool all_done = true;
          for (auto& cp : *choices) all_done = all_done && cp->done;
          if (all_done) {
            if (include_usage) {
              json u = wrap(json());
              u["choices"] = json::array();
              u["usage"] = usage_of(*choices);
              send(u);
            }
            sink.write("data: [DONE]\n\n", 14);
            sink.done();
          }
        }
        return true;
      },
      [choices](bool success) {
        if (!success)
          for (auto& cp : *choices) cp->stream->cancel();
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

void check_serve_options(const ServingLimits& lim, const EngineConfig& ec, const ServerOptions& so) {
  if (ec.max_batch < 1) fail("--max-batch must be >= 1, got {}", ec.max_batch);
  if (ec.kv_cache_tokens < 0) fail("--kv-cache-tokens must be >= 0, got {}", ec.kv_cache_tokens);
  if (ec.prefill_chunk < 1) fail("--prefill-chunk must be >= 1");
  if (ec.max_queue < 0) fail("--max-queue must be >= 0");
  if (ec.speculative_mtp && !lim.has_mtp)
    fail("--speculative mtp needs a model with MTP modules (num_nextn_predict_layers >= 1)");
  if (so.default_max_tokens < 1) fail("--default-max-tokens must be >= 1");
  if (so.port < 0 || so.port > 65535) fail("--port must be in [0, 65535], got {}", so.port);
  if (so.max_body_bytes < 1024) fail("--max-body-bytes must be >= 1024");
  if (so.max_prompt_tokens < 0) fail("--max-prompt-tokens must be >= 0");
  if (so.max_n < 1 || so.max_n > 1024) fail("--max-n must be in [1, 1024]");
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
  svr.set_payload_max_length(size_t(opt.max_body_bytes));
  if (!opt.api_key.empty()) {
    // Checked before the body is read; /health stays open for load balancers.
    svr.set_pre_routing_handler([&opt](const httplib::Request& req, httplib::Response& res) {
      if (req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
      const std::string auth = req.get_header_value("Authorization");
      const std::string want = "Bearer " + opt.api_key;
      bool ok = auth.size() == want.size();
      unsigned char diff = 0;  // constant-time comparison
      for (size_t i = 0; ok && i < want.size(); ++i) diff |= uint8_t(auth[i] ^ want[i]);
      if (ok && diff == 0) return httplib::Server::HandlerResponse::Unhandled;
      res.status = 401;
      json e = error_body(auth.empty() ? "Missing API key: send 'Authorization: Bearer <key>'" : "Incorrect API key provided",
                          "invalid_request_error");
      e["error"]["code"] = "invalid_api_key";
      res.set_content(e.dump(), "application/json");
      return httplib::Server::HandlerResponse::Handled;
    });
  }
  svr.Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("{\"status\":\"ok\"}", "application/json");
  });
  svr.Get("/v1/models", [&](const httplib::Request&, httplib::Response& res) {
    json m = {{"object", "list"},
              {"data", json::array({{{"id", opt.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "dsv3"},
                                      {"max_model_len", engine.limits().max_positions}}})}};
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
      std::string msg = fmt::format("HTTP {}", res.status);
      if (res.status == 413) msg = "The request body is larger than the server's limit";
      res.set_content(error_body(msg, type).dump(), "application/json");
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
