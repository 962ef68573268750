#pragma once
// The hub config.json of a DeepSeek-V4 model (V4-Flash, V4-Pro; transformers `deepseek_v4`), parsed and
// validated as transformers' DeepseekV4Config reads it: every field with transformers' default, the legacy
// keys the released config.json files use (compress_ratios, compress_rate_csa/hca, num_hash_layers,
// qk_rope_head_dim, top-level expert_dtype, a flat rope_scaling), and the nested main/compress rope
// parameters. Field names are the hub's.
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dsv3 {

enum class V4Attn { Sliding, CSA, HCA };  // sliding_attention, compressed_sparse_attention, heavily_compressed_attention
enum class V4Mlp { Hash, Moe };           // hash_moe (tid2eid routing), moe (learned top-k)

const char* v4_attn_name(V4Attn a);
const char* v4_mlp_name(V4Mlp m);

// One rope table: `main` (sliding layers) or `compress` (CSA/HCA layers, YaRN in the releases).
struct V4Rope {
  std::string type = "default";  // default | yarn
  double theta = 10000.0;
  double factor = 1.0;            // YaRN s
  int64_t original_max_position = 0;
  double beta_fast = 32, beta_slow = 1;
  double attention_factor = 1.0;  // cos/sin scale; transformers forces 1.0 for the compress table
};

struct V4Config {
  int64_t vocab_size = 129280, hidden_size = 4096, moe_intermediate_size = 2048, num_hidden_layers = 43;
  int64_t num_attention_heads = 64, num_key_value_heads = 1, head_dim = 512, q_lora_rank = 1024;
  int64_t num_experts_per_tok = 6, n_routed_experts = 256, n_shared_experts = 1;
  std::string scoring_func = "sqrtsoftplus";  // sqrtsoftplus | sigmoid
  bool norm_topk_prob = true;                  // read but unused: top-k weights are always renormalized
  double routed_scaling_factor = 1.5;
  int64_t max_position_embeddings = 1048576;
  double rope_theta = 10000.0, compress_rope_theta = 160000.0, partial_rotary_factor = 64.0 / 512.0;
  int64_t qk_rope_head_dim = 64;               // head_dim * partial_rotary_factor
  std::vector<V4Attn> layer_types;             // [num_hidden_layers]
  int64_t compress_rate_csa = 4, compress_rate_hca = 128;
  std::vector<V4Mlp> mlp_layer_types;          // [num_hidden_layers]
  int64_t hc_mult = 4, hc_sinkhorn_iters = 20;
  double hc_eps = 1e-6, swiglu_limit = 10.0;
  int64_t sliding_window = 128, o_groups = 8, o_lora_rank = 1024;
  int64_t index_n_heads = 64, index_head_dim = 128, index_topk = 512;
  // MTP blocks (mtp.k.*, k < num_nextn_predict_layers; 0 when a checkpoint has none): block k is a V4 block with
  // layer id num_hidden_layers + k, attention mtp_layer_types[k] (the compress_ratios / layer_types entry past the
  // main layers, sliding when the list has none), a non-hash MoE with a selection bias.
  int64_t num_nextn_predict_layers = 1;
  std::vector<V4Attn> mtp_layer_types;         // [num_nextn_predict_layers]
  double router_aux_loss_coef = 0.001, initializer_range = 0.02, rms_norm_eps = 1e-6;
  int64_t bos_token_id = 0, eos_token_id = 1;
  std::string torch_dtype = "bfloat16";
  V4Rope rope_main, rope_compress;
  // Quantization (quantization_config): fp8 e4m3 block weights with float or UE8M0 (power-of-two) scales, and
  // the routed experts' storage (expert_dtype fp4: e2m1 pairs in int8 with one UE8M0 scale per 32 inputs).
  bool fp8 = false;
  std::string scale_fmt;       // "" (float scales) | ue8m0
  std::string expert_dtype;    // "" (as the other weights) | fp8 | fp4
  int64_t fp8_block_n = 128, fp8_block_k = 128;

  // Blocks are numbered 0 .. num_hidden_layers - 1 (main) then num_hidden_layers + k (MTP block k).
  int64_t num_blocks() const { return num_hidden_layers + num_nextn_predict_layers; }
  V4Attn attn_type(int64_t block) const;
  V4Mlp mlp_type(int64_t block) const;             // MTP blocks: moe
  std::string block_prefix(int64_t block) const;   // "layers.3." or "mtp.0."
  int64_t compress_rate(int64_t block) const;      // 0 for sliding blocks
  int64_t num_hash_layers() const;

  static V4Config from_json(const nlohmann::json& j);  // throws InputError naming the field
  static V4Config load(const std::string& path_or_dir);
  void validate() const;
};

// The model_type field of a config.json (empty when absent or not a string); used to dispatch V3/V3.2 vs V4.
std::string config_model_type(const std::string& path_or_dir);

}  // namespace dsv3
