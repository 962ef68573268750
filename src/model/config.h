#pragma once
// The hub config.json of a DeepSeek-V3-architecture model, parsed and validated. Field names are the hub's.
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dsv3 {

struct YarnConfig {
  bool enabled = false;
  double factor = 1.0;               // s: frequency interpolation factor
  double rope_factor = 1.0;          // s for frequencies and cos/sin mscale: max_pos / original when original given (transformers)
  int64_t original_max_position = 0; // L0
  double beta_fast = 32, beta_slow = 1, mscale = 1, mscale_all_dim = 0;
};

struct ModelConfig {
  // Architecture: deepseek_v3 (V3/R1) or deepseek_v32 (V3 + DSA: a lightning indexer per layer choosing the
  // top-k cached tokens each query attends to).
  std::string model_type = "deepseek_v3";
  // Shapes.
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, moe_intermediate_size = 0;
  int64_t num_hidden_layers = 0, num_attention_heads = 0;
  int64_t q_lora_rank = 0;  // 0 means null: q_proj instead of q_a_proj/q_b_proj
  int64_t kv_lora_rank = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  // MoE.
  int64_t n_routed_experts = 0, n_shared_experts = 0, num_experts_per_tok = 0, n_group = 1, topk_group = 1;
  int64_t first_k_dense_replace = 0, moe_layer_freq = 1;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  std::string scoring_func = "sigmoid";  // sigmoid | softmax
  std::string topk_method = "noaux_tc";  // noaux_tc | greedy | group_limited_greedy
  // Norms, positions.
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  bool rope_interleave = true;
  int64_t max_position_embeddings = 0;
  YarnConfig yarn;
  // DSA lightning indexer (deepseek_v32): index_n_heads heads of width index_head_dim (rope on the first
  // qk_rope_head_dim columns), top index_topk tokens per query.
  int64_t index_n_heads = 0, index_head_dim = 0, index_topk = 0;
  // Per main layer: 1 = MoE ("sparse"), 0 = dense; from mlp_layer_types when the config lists them
  // (deepseek_v32), else empty and first_k_dense_replace / moe_layer_freq decide.
  std::vector<uint8_t> mlp_layer_types;
  // Misc.
  int64_t num_nextn_predict_layers = 0;
  double initializer_range = 0.02;
  int64_t bos_token_id = 0, eos_token_id = 1;
  bool tie_word_embeddings = false;
  std::string torch_dtype = "bfloat16";
  bool fp8 = false;  // quantization_config.quant_method == fp8 (128x128 weight_scale_inv blocks)
  int64_t fp8_block_n = 128, fp8_block_k = 128;

  // Derived.
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const {
    if (n_routed_experts <= 0) return false;
    if (!mlp_layer_types.empty() && layer < int64_t(mlp_layer_types.size())) return mlp_layer_types[layer] != 0;
    return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  bool has_indexer() const { return model_type == "deepseek_v32"; }
  double softmax_scale() const;  // (dn + dr)^-0.5, times mscale(s, mscale_all_dim)^2 under YaRN
  // Cached values per token per layer: latent c, rotated k_pe and (DSA) the indexer key.
  int64_t cache_values_per_token_per_layer() const {
    return kv_lora_rank + qk_rope_head_dim + (has_indexer() ? index_head_dim : 0);
  }
  int64_t latent_cache_values_per_token() const { return num_hidden_layers * cache_values_per_token_per_layer(); }

  static ModelConfig from_json(const nlohmann::json& j);  // throws InputError naming the field
  static ModelConfig load(const std::string& path_or_dir);
  nlohmann::json to_json() const;  // hub layout, loadable by transformers
  void validate() const;
};

}  // namespace dsv3
