// Model subcommands: info, init, logits, generate.
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "cli/common.h"
#include "dist/parallel.h"
#include "dist/runtime.h"
#include "cli/info_v4.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/generate.h"
#include "model/loader.h"
#include "model/sequence_logits.h"
#include "model/v4_config.h"
#include "model/v4_generate.h"
#include "model/v4_loader.h"
#include "train/v4_trainer.h"

namespace dsv3::cli {

using json = nlohmann::json;

void add_info(CLI::App& app) {
  auto* c = app.add_subcommand("info", "Summarize a model: config, parameters, KV-cache bytes per token");
  auto dir = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  c->add_option("--model", *dir, "Model directory (config.json + safetensors)")->required();
  auto dtype = std::make_shared<std::string>("auto");
  c->add_flag("--json", *as_json, "Print one JSON object");
  c->add_option("--dtype", *dtype, "weights in memory: auto | f32 | bf16 | fp8 (for the reported weight bytes)");
  c->callback([=] {
    if (config_model_type(*dir) == "deepseek_v4") return print_v4_info(*dir, *as_json, *dtype);
    ModelConfig cfg = ModelConfig::load(*dir);
    LoadOptions lo;
    lo.dtype = *dtype;
    ModelWeights w = load_weights(cfg, *dir, lo);
    auto be = make_cpu_backend();
    Model m(cfg, std::move(w), *be);
    const int64_t lat = cfg.cache_values_per_token_per_layer();  // latent + rope key (+ DSA index key)
    const int64_t full = cfg.num_attention_heads * (cfg.qk_head_dim() + cfg.v_head_dim);
    const bool v32 = cfg.has_indexer();
    json j = {{"model_type", cfg.model_type},
              {"layers", cfg.num_hidden_layers},
              {"hidden_size", cfg.hidden_size},
              {"heads", cfg.num_attention_heads},
              {"q_lora_rank", cfg.q_lora_rank},
              {"kv_lora_rank", cfg.kv_lora_rank},
              {"routed_experts", cfg.n_routed_experts},
              {"shared_experts", cfg.n_shared_experts},
              {"experts_per_token", cfg.num_experts_per_tok},
              {"dense_layers", cfg.first_k_dense_replace},
              {"vocab_size", cfg.vocab_size},
              {"max_position_embeddings", cfg.max_position_embeddings},
              {"yarn", cfg.yarn.enabled},
              {"mtp_modules", cfg.num_nextn_predict_layers},
              {"fp8_checkpoint", cfg.fp8},
              {"weights_dtype", m.weights().layout.fp8 ? std::string("fp8") : std::string(dtype_name(m.weights().flat.dtype))},
              {"weight_bytes", weight_bytes(m.weights())},
              {"total_params", m.total_params()},
              {"active_params_per_token", m.active_params()},
              {"mtp_params", m.mtp_params()},
              {"kv_cache_values_per_token_per_layer", lat},
              {"kv_cache_bytes_per_token_f32", cfg.num_hidden_layers * lat * 4},
              {"kv_cache_bytes_per_token_bf16", cfg.num_hidden_layers * lat * 2},
              {"full_kv_bytes_per_token_bf16", cfg.num_hidden_layers * full * 2}};
    if (v32) {
      j["index_n_heads"] = cfg.index_n_heads;
      j["index_head_dim"] = cfg.index_head_dim;
      j["index_topk"] = cfg.index_topk;
      j["kv_cache_index_values_per_token_per_layer"] = cfg.index_head_dim;
    }
    if (*as_json) {
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    std::printf("model            %s\n", dir->c_str());
    std::printf("architecture     %s: %lld layers (%lld dense), hidden %lld, %lld heads, vocab %lld\n",
                v32 ? "DeepSeek-V3.2 (DSA)" : "DeepSeek-V3", (long long)cfg.num_hidden_layers,
                [&] {
                  long long d = 0;
                  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) d += !cfg.is_moe_layer(l);
                  return d;
                }(),
                (long long)cfg.hidden_size, (long long)cfg.num_attention_heads, (long long)cfg.vocab_size);
    std::printf("attention        MLA: q_lora_rank %s, kv_lora_rank %lld, head dims nope %lld + rope %lld, v %lld%s\n",
                cfg.q_lora_rank ? std::to_string(cfg.q_lora_rank).c_str() : "null (q_proj)",
                (long long)cfg.kv_lora_rank, (long long)cfg.qk_nope_head_dim, (long long)cfg.qk_rope_head_dim,
                (long long)cfg.v_head_dim, cfg.yarn.enabled ? fmt::format(", YaRN x{}", cfg.yarn.factor).c_str() : "");
    if (v32)
      std::printf("dsa indexer      %lld heads x %lld (rope %lld), top-%lld tokens per query\n", (long long)cfg.index_n_heads,
                  (long long)cfg.index_head_dim, (long long)cfg.qk_rope_head_dim, (long long)cfg.index_topk);
    std::printf("moe              %lld routed (top-%lld, %lld groups, top-%lld groups, %s, %s) + %lld shared, width %lld\n",
                (long long)cfg.n_routed_experts, (long long)cfg.num_experts_per_tok, (long long)cfg.n_group,
                (long long)cfg.topk_group, cfg.scoring_func.c_str(), cfg.topk_method.c_str(),
                (long long)cfg.n_shared_experts, (long long)cfg.moe_intermediate_size);
    std::printf("mtp modules      %lld (%s params)\n", (long long)cfg.num_nextn_predict_layers, human(m.mtp_params()).c_str());
    std::printf("parameters       %s total, %s active per token\n", human(m.total_params()).c_str(),
                human(m.active_params()).c_str());
    if (m.weights().layout.fp8)
      std::printf("weights          fp8 in memory: e4m3 matrices with 128x128 scales, others %s; %s bytes%s\n",
                  dtype_name(m.weights().flat.dtype), human(int64_t(weight_bytes(m.weights()))).c_str(),
                  cfg.fp8 ? " (fp8 checkpoint, codes kept)" : " (quantized at load)");
    else
      std::printf("weights          %s in memory, %s bytes%s\n", dtype_name(m.weights().flat.dtype),
                  human(int64_t(weight_bytes(m.weights()))).c_str(), cfg.fp8 ? " (fp8 checkpoint, dequantized)" : "");
    std::printf("kv cache         %lld values per token per layer (latent %lld + rope key %lld%s): %lld bytes/token in bf16,"
                " %lld in fp32 (full per-head K/V would be %lld bytes/token in bf16, %.1fx more)\n",
                (long long)lat, (long long)cfg.kv_lora_rank, (long long)cfg.qk_rope_head_dim,
                v32 ? fmt::format(" + index key {}", cfg.index_head_dim).c_str() : "",
                (long long)(cfg.num_hidden_layers * lat * 2), (long long)(cfg.num_hidden_layers * lat * 4),
                (long long)(cfg.num_hidden_layers * full * 2), double(full) / double(lat));
  });
}

void add_init(CLI::App& app) {
  auto* c = app.add_subcommand("init", "Create a model directory with random weights from a config.json");
  auto cfg_path = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto seed = std::make_shared<uint64_t>(0);
  auto dtype = std::make_shared<std::string>("bf16");
  auto tok = std::make_shared<std::string>();
  c->add_option("--config", *cfg_path, "Hub-style config.json")->required();
  c->add_option("--output", *out, "Output directory")->required();
  c->add_option("--seed", *seed, "Random seed");
  c->add_option("--dtype", *dtype, "bf16 or f32")->check(CLI::IsMember({"bf16", "f32"}));
  c->add_option("--tokenizer", *tok, "Copy tokenizer files (tokenizer.json, tokenizer_config.json) from this directory");
  c->callback([=] {
    if (config_model_type(*cfg_path) == "deepseek_v4") {  // transformers' _init_weights, MTP blocks included; fp32
      V4Weights w = init_v4_weights(V4Config::load(*cfg_path), *seed);
      save_v4_model(*out, w, read_file(std::filesystem::is_directory(*cfg_path) ? *cfg_path + "/config.json" : *cfg_path));
      if (!tok->empty()) copy_tokenizer_files(*tok, *out);
      std::fprintf(stderr, "wrote %s (%s parameters + %s in %lld MTP block(s), f32: DeepSeek-V4 checkpoints are fp32)\n",
                   out->c_str(), human(v4_total_params(w.cfg)).c_str(), human(v4_mtp_params(w.cfg)).c_str(),
                   (long long)w.cfg.num_nextn_predict_layers);
      return;
    }
    ModelConfig cfg = ModelConfig::load(*cfg_path);
    DType dt = *dtype == "f32" ? DType::F32 : DType::BF16;
    ModelWeights w = init_weights(cfg, *seed, dt);
    save_weights(cfg, w, *out, dt);
    if (!tok->empty()) copy_tokenizer_files(*tok, *out);
    std::fprintf(stderr, "wrote %s (%s parameters, %s)\n", out->c_str(), human(w.layout.num_params).c_str(), dtype->c_str());
  });
}

void add_logits(CLI::App& app) {
  auto* c = app.add_subcommand("logits", "Full-sequence logits (and MTP logits) for int32 input_ids [B,T]");
  auto dir = std::make_shared<std::string>();
  auto in = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto device = std::make_shared<std::string>("cpu");
  auto dtype = std::make_shared<std::string>("auto");
  add_model_options(c, *dir, *device, *dtype);
  c->add_option("--input", *in, "safetensors with int32 input_ids [B,T]")->required();
  c->add_option("--output", *out, "safetensors to write: logits [B,T,V] (+ mtp_logits.<k> [B,T-k,V])")->required();
  c->callback([=] {
    SafetensorsFile f(*in);
    Tensor ids = f.get("input_ids");
    if (ids.dtype != DType::I32 && ids.dtype != DType::I64)
      fail("{}: input_ids must be int32 (or int64), got {}", *in, dtype_name(ids.dtype));
    if (ids.ndim() != 2 || ids.dim(0) < 1 || ids.dim(1) < 1)
      fail("{}: input_ids must be [B, T] with B, T >= 1, got {}", *in, shape_str(ids.shape));
    const int64_t B = ids.dim(0), T = ids.dim(1);
    std::vector<int32_t> flat(B * T);
    for (int64_t i = 0; i < B * T; ++i)
      flat[i] = ids.dtype == DType::I32 ? ids.ptr<int32_t>()[i] : int32_t(ids.ptr<int64_t>()[i]);
    if (config_model_type(*dir) == "deepseek_v4") {  // one fresh cache per row; all logits
      LoadedV4Model lm = open_v4_model(*dir, *device, *dtype);
      V4Model& m = *lm.model;
      const int64_t V = m.config().vocab_size, D = std::min<int64_t>(m.mtp_depth(), T - 1);
      std::vector<Tensor> outs = {Tensor::empty(DType::F32, {B, T, V}, "logits")};
      // MTP block k (1-based) row i: the previous stage's streams of row i and token i + k, predicting token i + k + 1.
      for (int64_t k = 1; k <= D; ++k) outs.push_back(Tensor::empty(DType::F32, {B, T - k, V}, "mtp_logits." + std::to_string(k)));
      for (int64_t b = 0; b < B; ++b) {
        V4Cache cache(m.config());
        const std::vector<int32_t> row(flat.begin() + b * T, flat.begin() + (b + 1) * T);
        Tensor X;
        Tensor l = m.forward(row, cache, true, D > 0 ? &X : nullptr);
        std::copy_n(l.f32(), T * V, outs[0].f32() + b * T * V);
        for (int64_t k = 1; k <= D; ++k) {
          const int64_t tk = T - k;
          Tensor Xk = X.rows(0, tk), Xn;
          Tensor ml = m.mtp_forward(k - 1, Xk, std::vector<int32_t>(row.begin() + k, row.end()), cache, &Xn);
          std::copy_n(ml.f32(), tk * V, outs[size_t(k)].f32() + b * tk * V);
          X = Xn;
        }
      }
      write_safetensors(*out, outs);
      return;
    }
    LoadedModel lm = open_model(*dir, *device, *dtype);
    SequenceLogits r = sequence_logits(*lm.model, *lm.backend, flat, B, T);
    std::vector<Tensor> outs = {r.logits};
    outs[0].name = "logits";
    for (size_t k = 0; k < r.mtp.size(); ++k) {
      outs.push_back(r.mtp[k]);
      outs.back().name = "mtp_logits." + std::to_string(k + 1);
    }
    write_safetensors(*out, outs);
  });
}

void add_generate(CLI::App& app) {
  auto* c = app.add_subcommand("generate", "Generate tokens from a prompt (greedy or sampled) over the latent cache");
  struct Args {
    std::string dir, prompt_ids, prompt, device = "cpu", dtype = "auto", tokenizer, speculative;
    int64_t max_new = 32;
    SamplingParams sp;
    bool json = false, no_absorb = false, ignore_eos = false;
  };
  auto a = std::make_shared<Args>();
  add_model_options(c, a->dir, a->device, a->dtype);
  c->add_option("--prompt-ids", a->prompt_ids, "Comma-separated token ids, e.g. 5,6,7");
  c->add_option("--prompt", a->prompt, "Prompt text (needs a tokenizer)");
  c->add_option("--tokenizer", a->tokenizer, "Tokenizer file or directory (default: the model directory's)");
  c->add_option("--max-new-tokens,-n", a->max_new, "Tokens to generate");
  add_sampling_options(c, a->sp);
  c->add_flag("--json", a->json, "Print one JSON object with output_ids and timings");
  c->add_flag("--no-absorb", a->no_absorb, "Decode by decompressing the cache instead of the absorbed path (debug)");
  c->add_flag("--ignore-eos", a->ignore_eos, "Do not stop at the end-of-sequence token");
  c->add_option("--speculative", a->speculative, "mtp: draft with the model's MTP module, verify in one pass (greedy)")
      ->check(CLI::IsMember({"mtp", "none"}));
  c->callback([=] {
    validate_sampling(a->sp);
    if (a->max_new < 0 || a->max_new > (int64_t(1) << 24)) fail("--max-new-tokens must be in [0, 16777216], got {}", a->max_new);
    if (a->prompt_ids.empty() == a->prompt.empty()) fail("give exactly one of --prompt-ids or --prompt");
    // Under mpirun: every rank runs the same generation with its slice of the experts; rank 0 prints.
    Communicator& world = dist::world();
    if (world.size() > 1) {
      check_same_on_all_ranks(world, a->dir + "|" + a->prompt_ids + "|" + a->prompt + "|" + std::to_string(a->max_new) +
                                         "|" + std::to_string(a->sp.temperature) + "|" + std::to_string(a->sp.seed) +
                                         "|" + a->speculative + "|" + a->dtype,
                              "model or generation options");
      if (world.rank() != 0 && !std::freopen("/dev/null", "w", stdout)) fail("cannot silence stdout on rank {}", world.rank());
    }
    const bool v4 = config_model_type(a->dir) == "deepseek_v4";
    if (v4 && world.size() > 1) fail("DeepSeek-V4 models do not run under mpirun with several ranks yet");
    if (v4 && a->no_absorb) fail("--no-absorb applies to MLA models; DeepSeek-V4 has no latent cache to decompress");
    LoadedModel lm;
    LoadedV4Model lm4;
    if (v4) lm4 = open_v4_model(a->dir, a->device, a->dtype);
    else lm = open_model(a->dir, a->device, a->dtype, world.size() > 1 ? &world : nullptr);
    const int32_t eos = int32_t(v4 ? lm4.model->config().eos_token_id : lm.model->config().eos_token_id);
    std::vector<int32_t> prompt;
    std::unique_ptr<TextCodec> codec;
    if (!a->prompt.empty()) {
      codec = open_text_codec(a->tokenizer.empty() ? a->dir : a->tokenizer);
      prompt = codec->encode(a->prompt);
    } else {
      prompt = parse_id_list(a->prompt_ids);
    }
    GenerateOptions go;
    go.max_new_tokens = a->max_new;
    go.sampling = a->sp;
    go.absorb_decode = !a->no_absorb;
    go.speculative_mtp = a->speculative == "mtp";
    if (!a->ignore_eos && !a->json) go.stop_ids = {eos};
    if (!a->ignore_eos && !a->prompt.empty()) go.stop_ids = {eos};
    GenerateStats st;
    bool stream = !a->json && codec;
    std::unique_ptr<TextStream> ts = stream ? codec->stream() : nullptr;
    if (stream) std::printf("%s", a->prompt.c_str());
    auto on_token = [&](int32_t t) {
      if (ts) {
        std::printf("%s", ts->push(t).c_str());
        std::fflush(stdout);
      }
      return true;
    };
    auto ids = v4 ? v4_generate(*lm4.model, prompt, go, &st, on_token) : generate(*lm.model, prompt, go, &st, on_token);
    if (a->json) {
      json j = {{"output_ids", ids},
                {"prompt_tokens", st.prompt_tokens},
                {"new_tokens", st.new_tokens},
                {"finish_reason", st.finish_reason},
                {"prefill_tokens_per_s", st.prefill_s > 0 ? st.prompt_tokens / st.prefill_s : 0.0},
                {"decode_tokens_per_s", st.decode_s > 0 && st.new_tokens > 1 ? (st.new_tokens - 1) / st.decode_s : 0.0}};
      if (codec) j["text"] = codec->decode(ids);
      if (go.speculative_mtp) {
        j["drafted"] = st.drafted;
        j["accepted"] = st.accepted;
        j["acceptance_rate"] = st.drafted ? double(st.accepted) / double(st.drafted) : 0.0;
      }
      std::printf("%s\n", j.dump().c_str());
    } else if (stream) {
      std::printf("%s\n", ts->flush().c_str());
      if (go.speculative_mtp)
        std::fprintf(stderr, "[speculative mtp: %lld of %lld drafts accepted (%.0f%%)]\n", (long long)st.accepted,
                     (long long)st.drafted, st.drafted ? 100.0 * st.accepted / st.drafted : 0.0);
      std::fprintf(stderr, "[%lld prompt tokens, %lld new; prefill %.1f tok/s, decode %.1f tok/s]\n",
                   (long long)st.prompt_tokens, (long long)st.new_tokens,
                   st.prefill_s > 0 ? st.prompt_tokens / st.prefill_s : 0.0,
                   st.decode_s > 0 && st.new_tokens > 1 ? (st.new_tokens - 1) / st.decode_s : 0.0);
    } else {
      std::string s;
      for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
      std::printf("%s\n", s.c_str());
    }
  });
}

}  // namespace dsv3::cli
