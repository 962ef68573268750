// `dsv3 info` for DeepSeek-V4. The cache figures are what a V4 decode cache holds per sequence (the layout the
// spec and transformers use, one shared 512-wide key/value vector per entry):
//   every layer    a sliding window of sliding_window entries of head_dim values (fixed, not per token);
//   CSA layers     + one compressed entry (head_dim) and one indexer entry (index_head_dim) per m tokens;
//   HCA layers     + one compressed entry (head_dim) per m' tokens.
// Bytes are given for bf16 and fp32 entries, per token per layer type and for a 1M-token context.
#include <cstdio>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "cli/info_v4.h"
#include "model/v4_config.h"
#include "model/v4_loader.h"
#include "model/v4_weights.h"

namespace dsv3::cli {

using json = nlohmann::json;

void print_v4_info(const std::string& dir, bool as_json, const std::string& dtype) {
  const DType matrices = v4_matrix_dtype(dtype);
  const V4Config asked = V4Config::load(dir);
  // Every tensor checked by name, shape and dtype; the MTP blocks when the checkpoint has mtp.* tensors.
  const V4Weights w = load_v4_weights(asked, dir, /*dequantize=*/false, matrices);
  // Resident weights (parameters and selection biases, MTP blocks included) as `logits` / `serve` would hold them.
  const int64_t bytes = v4_weight_bytes(w.layout, matrices), bytes_f32 = v4_weight_bytes(w.layout, DType::F32);
  const bool bf16 = matrices == DType::BF16;
  const V4Config& c = w.cfg;
  const int64_t total = v4_total_params(c), active = v4_active_params(c), mtp_params = v4_mtp_params(c);
  std::string mtp_line = fmt::format("{} MTP block{} ({} params", c.num_nextn_predict_layers,
                                     c.num_nextn_predict_layers == 1 ? "" : "s", human(mtp_params));
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k)
    mtp_line += fmt::format("{} {}", k ? "," : ";", v4_attn_name(c.mtp_layer_types[size_t(k)]));
  mtp_line += ")";
  if (w.mtp_absent)
    mtp_line += fmt::format("; note: config.json has num_nextn_predict_layers = {} but the checkpoint has no mtp.* "
                            "tensors, so MTP is off", asked.num_nextn_predict_layers);
  const int64_t hd = c.head_dim, W = c.sliding_window, ctx = int64_t(1) << 20;
  struct Kind {
    const char* name;
    int64_t layers = 0;
    double per_token = 0;  // values per token (compressed entries)
  } kinds[3] = {{"sliding_attention"}, {"compressed_sparse_attention"}, {"heavily_compressed_attention"}};
  kinds[1].per_token = double(hd + c.index_head_dim) / double(c.compress_rate_csa);
  kinds[2].per_token = double(hd) / double(c.compress_rate_hca);
  for (V4Attn t : c.layer_types) kinds[int(t)].layers++;
  double per_token = 0, fixed = 0;
  json types = json::object();
  for (auto& k : kinds) {
    per_token += k.per_token * double(k.layers);
    fixed += double(W * hd) * double(k.layers);
    types[k.name] = {{"layers", k.layers},
                     {"values_per_token_per_layer", k.per_token},
                     {"bytes_per_token_per_layer_bf16", k.per_token * 2},
                     {"window_values_per_layer", W * hd}};
  }
  const double ctx_values = per_token * double(ctx) + fixed;
  int64_t hash_layers = c.num_hash_layers();
  json j = {{"model_type", "deepseek_v4"},
            {"layers", c.num_hidden_layers},
            {"hidden_size", c.hidden_size},
            {"heads", c.num_attention_heads},
            {"head_dim", c.head_dim},
            {"rope_dims", c.qk_rope_head_dim},
            {"q_lora_rank", c.q_lora_rank},
            {"o_groups", c.o_groups},
            {"o_lora_rank", c.o_lora_rank},
            {"hc_mult", c.hc_mult},
            {"sliding_window", W},
            {"compress_rate_csa", c.compress_rate_csa},
            {"compress_rate_hca", c.compress_rate_hca},
            {"index_n_heads", c.index_n_heads},
            {"index_head_dim", c.index_head_dim},
            {"index_topk", c.index_topk},
            {"routed_experts", c.n_routed_experts},
            {"experts_per_token", c.num_experts_per_tok},
            {"hash_layers", hash_layers},
            {"scoring_func", c.scoring_func},
            {"vocab_size", c.vocab_size},
            {"fp8_checkpoint", c.fp8},
            {"expert_dtype", c.expert_dtype},
            {"mtp_modules", c.num_nextn_predict_layers},
            {"mtp_params", mtp_params},
            {"mtp_absent", w.mtp_absent},
            {"weights_dtype", bf16 ? "bf16" : "f32"},
            {"weight_bytes", bytes},
            {"weight_bytes_f32", bytes_f32},
            {"total_params", total},
            {"active_params_per_token", active},
            {"layer_types", types},
            {"cache_values_per_token", per_token},
            {"cache_bytes_per_token_bf16", per_token * 2},
            {"cache_window_values", fixed},
            {"cache_bytes_1m_context_bf16", ctx_values * 2},
            {"cache_bytes_1m_context_f32", ctx_values * 4}};
  if (bf16) j["bf16_rounded_tensors"] = w.bf16_from_float;  // F32/F16 matrices rounded to bf16 (0: exact)
  if (as_json) {
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("model            %s\n", dir.c_str());
  std::printf("architecture     DeepSeek-V4: %lld layers (%lld sliding, %lld CSA m=%lld, %lld HCA m'=%lld), hidden %lld, "
              "%lld mHC streams, vocab %lld\n",
              (long long)c.num_hidden_layers, (long long)kinds[0].layers, (long long)kinds[1].layers,
              (long long)c.compress_rate_csa, (long long)kinds[2].layers, (long long)c.compress_rate_hca,
              (long long)c.hidden_size, (long long)c.hc_mult, (long long)c.vocab_size);
  std::printf("attention        %lld heads x %lld (rope %lld), one shared K=V head, window %lld, sinks, grouped output "
              "%lld x %lld; indexer %lld heads x %lld, top-%lld entries\n",
              (long long)c.num_attention_heads, (long long)c.head_dim, (long long)c.qk_rope_head_dim, (long long)W,
              (long long)c.o_groups, (long long)c.o_lora_rank, (long long)c.index_n_heads, (long long)c.index_head_dim,
              (long long)c.index_topk);
  std::printf("moe              %lld routed (top-%lld, %s, %lld hash layers) + 1 shared, width %lld, SwiGLU clamp %g\n",
              (long long)c.n_routed_experts, (long long)c.num_experts_per_tok, c.scoring_func.c_str(),
              (long long)hash_layers, (long long)c.moe_intermediate_size, c.swiglu_limit);
  std::printf("parameters       %s total, %s active per token (main model)\n", human(total).c_str(),
              human(active).c_str());
  std::printf("mtp              %s\n", mtp_line.c_str());
  std::printf("checkpoint       %s%s\n", c.fp8 ? "fp8 e4m3 blocks" : "unquantized",
              c.expert_dtype.empty() ? "" : (", experts " + c.expert_dtype).c_str());
  if (bf16)
    std::printf("weights          bf16 matrices (FP8/FP4 weights, embedding, head, compressors, indexer projections), "
                "fp32 norms / mHC / sinks / ape / router / biases: %s bytes in memory (f32: %s)%s\n",
                human(bytes).c_str(), human(bytes_f32).c_str(),
                w.bf16_from_float ? fmt::format("; {} F32/F16 matrices rounded to bf16", w.bf16_from_float).c_str()
                                  : "; the checkpoint's matrices are FP8/FP4/BF16, held exactly (each value checked at load)");
  else
    std::printf("weights          fp32 in memory (every tensor expanded): %s bytes\n", human(bytes).c_str());
  for (auto& k : kinds)
    std::printf("cache %-28s %lld layers: %.2f values (%.2f bytes bf16) per token per layer + window of %lld x %lld\n",
                k.name, (long long)k.layers, k.per_token, k.per_token * 2, (long long)W, (long long)hd);
  std::printf("cache total      %.1f bytes/token in bf16; a 1M-token context: %.2f GiB bf16 (%.2f GiB fp32)\n",
              per_token * 2, ctx_values * 2 / double(1 << 30), ctx_values * 4 / double(1 << 30));
}

}  // namespace dsv3::cli
