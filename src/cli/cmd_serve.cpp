// serve (OpenAI-compatible HTTP server) and chat (interactive terminal chat).
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "dist/parallel.h"
#include "dist/runtime.h"
#include "model/generate.h"
#include "model/loader.h"
#include "model/v4_config.h"
#include "model/v4_generate.h"
#include "model/v4_loader.h"
#include "serve/http_server.h"
#include "tokenizer/model_tokenizer.h"

namespace dsv3::cli {

void add_serve_commands(CLI::App& app) {
  {
    auto* c = app.add_subcommand("serve", "OpenAI-compatible server with continuous batching over the latent cache");
    struct Args {
      std::string dir, host = "127.0.0.1", device = "cpu", dtype = "auto", tokenizer, name;
      int port = 8000;
      EngineConfig ec;
      ServerOptions so;
    };
    auto a = std::make_shared<Args>();
    add_model_options(c, a->dir, a->device, a->dtype);
    c->add_option("--host", a->host, "Address to listen on");
    c->add_option("--port", a->port, "Port")->check(CLI::Range(1, 65535));
    c->add_option("--tokenizer", a->tokenizer, "Tokenizer file or directory (default: the model's, else the bundled one)");
    c->add_option("--served-model-name", a->name, "Model name clients send (default: the directory's name)");
    c->add_option("--max-batch", a->ec.max_batch, "Sequences decoded together");
    c->add_option("--kv-cache-tokens", a->ec.kv_cache_tokens, "Latent KV-cache capacity in tokens (0: max-batch x min(context, 2048))");
    c->add_option("--max-queue", a->ec.max_queue, "Waiting requests beyond this get HTTP 503");
    c->add_option("--prefill-chunk", a->ec.prefill_chunk, "Prompt tokens fed per step (chunked prefill)");
    c->add_option("--default-max-tokens", a->so.default_max_tokens, "max_tokens when a request gives none");
    c->add_option("--api-key", a->so.api_key, "Require 'Authorization: Bearer KEY' (all routes but /health); default: $DSV3_API_KEY");
    c->add_option("--max-body-bytes", a->so.max_body_bytes, "Request bodies beyond this get HTTP 413");
    c->add_option("--max-prompt-tokens", a->so.max_prompt_tokens, "Prompts beyond this get HTTP 400 (0: the context)");
    c->add_option("--max-n", a->so.max_n, "Most choices per request (prompts x n)");
    auto reasoning = std::make_shared<std::string>("none");
    c->add_option("--reasoning-parser", *reasoning, "deepseek-r1: chat output <think>...</think> goes to reasoning_content")
        ->check(CLI::IsMember({"deepseek-r1", "none"}));
    auto spec = std::make_shared<std::string>("none");
    c->add_option("--speculative", *spec, "mtp: greedy requests draft with the MTP module (models with MTP)")
        ->check(CLI::IsMember({"mtp", "none"}));
    c->callback([=] {
      // Under mpirun: every rank loads its slice of the experts; rank 0 serves HTTP and schedules, the others
      // replay each of its forward passes (Model::set_leader / follow).
      Communicator& world = dist::world();
      const bool ranks = world.size() > 1;
      auto server_options = [&] {
        ServerOptions so = a->so;
        so.host = a->host;
        so.port = a->port;
        so.model_name = a->name.empty() ? default_served_name(a->dir) : a->name;
        if (so.api_key.empty())
          if (const char* k = std::getenv("DSV3_API_KEY")) so.api_key = k;
        so.reasoning_parser = *reasoning == "deepseek-r1";
        return so;
      };
      a->ec.speculative_mtp = *spec == "mtp";
      if (config_model_type(a->dir) == "deepseek_v4") {
        // DeepSeek-V4: the same engine and HTTP server over V4Model (CPU, fp32; the sequences of a step run in
        // one forward, each with its own window / compressed-entry cache).
        if (ranks) fail("DeepSeek-V4 models do not run under mpirun with several ranks yet");
        LoadedV4Model lm4 = open_v4_model(a->dir, a->device, a->dtype);
        V4Model& m4 = *lm4.model;
        // --speculative mtp: greedy requests draft with MTP block 0 (the engine's speculative path, as V3).
        if (a->ec.speculative_mtp && m4.mtp_depth() < 1)
          fail("--speculative mtp needs a model with an MTP block (mtp.0.* tensors; this checkpoint has none)");
        const ServingLimits lim = v4_serving_limits(m4.config());
        Tokenizer tok = tokenizer_for_model(a->dir, a->tokenizer, lim.vocab_size);
        ServerOptions so = server_options();
        check_serve_options(lim, a->ec, so);
        Engine engine(
            lim, [&m4](int64_t tokens, int64_t block) { return std::make_unique<V4ServingModel>(m4, tokens, block); },
            tok, a->ec);
        run_server(engine, tok, so);
        return;
      }
      if (ranks)
        check_same_on_all_ranks(world, a->dir + "|" + a->dtype + "|" + std::to_string(a->ec.kv_cache_tokens) + "|" +
                                           std::to_string(a->ec.max_batch) + "|" + *spec,
                                "model or serving options");
      LoadedModel lm = open_model(a->dir, a->device, a->dtype, ranks ? &world : nullptr);
      if (ranks && world.rank() != 0) {
        const ModelConfig& mc = lm.model->config();
        const int64_t tokens = a->ec.kv_cache_tokens > 0 ? a->ec.kv_cache_tokens
                                                         : a->ec.max_batch * std::min<int64_t>(mc.max_position_embeddings, 2048);
        KvCache cache(lm.model->backend(), mc, tokens, a->ec.block_size);
        lm.model->follow(world, cache);
        return;
      }
      if (ranks) lm.model->set_leader(&world);
      struct StopFollowers {  // after the engine's thread has ended (it makes the collectives until then)
        Model& m;
        ~StopFollowers() { m.stop_followers(); }
      } stop_followers{*lm.model};
      Tokenizer tok = tokenizer_for_model(a->dir, a->tokenizer, lm.model->config().vocab_size);
      ServerOptions so = server_options();
      check_serve_options(latent_serving_limits(lm.model->config()), a->ec, so);
      Engine engine(*lm.model, tok, a->ec);
      run_server(engine, tok, so);
    });
  }
  {
    auto* c = app.add_subcommand("chat", "Interactive chat in the terminal (streams tokens, /reset, /system, /exit)");
    struct Args {
      std::string dir, device = "cpu", dtype = "auto", tokenizer, system;
      int64_t max_new = 512;
      SamplingParams sp;
      bool speculative = false;
    };
    auto a = std::make_shared<Args>();
    a->sp.temperature = 0.7;
    a->sp.top_p = 0.95;
    add_model_options(c, a->dir, a->device, a->dtype);
    c->add_option("--tokenizer", a->tokenizer, "Tokenizer file or directory");
    c->add_option("--system", a->system, "System prompt");
    c->add_option("--max-new-tokens,-n", a->max_new, "Longest answer");
    add_sampling_options(c, a->sp);
    c->callback([=] {
      validate_sampling(a->sp);
      // DeepSeek-V4 directories run on V4Model (CPU, one sequence); everything else on Model.
      const bool v4 = config_model_type(a->dir) == "deepseek_v4";
      LoadedModel lm;
      LoadedV4Model lm4;
      if (v4) lm4 = open_v4_model(a->dir, a->device, a->dtype);
      else lm = open_model(a->dir, a->device, a->dtype);
      const int64_t vocab = v4 ? lm4.model->config().vocab_size : lm.model->config().vocab_size;
      const int64_t context = v4 ? lm4.model->config().max_position_embeddings : lm.model->config().max_position_embeddings;
      const int32_t eos = int32_t(v4 ? lm4.model->config().eos_token_id : lm.model->config().eos_token_id);
      Tokenizer tok = tokenizer_for_model(a->dir, a->tokenizer, vocab);
      nlohmann::json messages = nlohmann::json::array();
      if (!a->system.empty()) messages.push_back({{"role", "system"}, {"content", a->system}});
      const bool tty = isatty(0);
      std::fprintf(stderr, "dsv3 chat: %s. Commands: /reset, /system TEXT, /exit\n", a->dir.c_str());
      std::string line;
      uint64_t turn = 0;
      for (;;) {
        if (tty) std::fprintf(stderr, "\n> ");
        if (!std::getline(std::cin, line)) break;
        if (line == "/exit" || line == "/quit") break;
        if (line == "/reset") {
          messages = nlohmann::json::array();
          if (!a->system.empty()) messages.push_back({{"role", "system"}, {"content", a->system}});
          std::fprintf(stderr, "(history cleared)\n");
          continue;
        }
        if (line.rfind("/system ", 0) == 0) {
          a->system = line.substr(8);
          messages = nlohmann::json::array({{{"role", "system"}, {"content", a->system}}});
          std::fprintf(stderr, "(system prompt set; history cleared)\n");
          continue;
        }
        if (line.empty()) continue;
        messages.push_back({{"role", "user"}, {"content", line}});
        std::vector<int32_t> ids;
        try {
          ids = tok.encode(tok.apply_chat_template(messages, true));
          if (int64_t(ids.size()) >= context)
            fail("the conversation ({} tokens) no longer fits the context ({}); /reset to start over", ids.size(),
                 context);
        } catch (const Error& e) {
          std::fprintf(stderr, "error: %s\n", e.what());
          messages.erase(messages.end() - 1);
          continue;
        }
        GenerateOptions go;
        go.max_new_tokens = std::min<int64_t>(a->max_new, context - int64_t(ids.size()));
        go.sampling = a->sp;
        go.sampling.seed = a->sp.seed + turn++;
        go.stop_ids = {eos};
        StreamDecoder dec(tok);
        std::string reply;
        GenerateStats st;
        auto on_token = [&](int32_t t) {
          std::string piece = dec.push(t);
          reply += piece;
          std::fputs(piece.c_str(), stdout);
          std::fflush(stdout);
          return true;
        };
        if (v4) v4_generate(*lm4.model, ids, go, &st, on_token);
        else generate(*lm.model, ids, go, &st, on_token);
        std::string rest = dec.flush();
        reply += rest;
        std::printf("%s\n", rest.c_str());
        std::fflush(stdout);
        std::fprintf(stderr, "[%lld tokens, %.1f tokens/s]\n", (long long)st.new_tokens,
                     st.decode_s > 0 && st.new_tokens > 1 ? (st.new_tokens - 1) / st.decode_s : 0.0);
        messages.push_back({{"role", "assistant"}, {"content", reply}});
      }
    });
  }
}

}  // namespace dsv3::cli
