#pragma once
// Model parameters. Every trainable tensor has a hub name and a place in ONE flat buffer (F32 or BF16), in
// param_specs() order; the per-layer structs below are views into it. Experts of a layer are consecutive in
// the buffer (experts.0.gate_proj, experts.1.gate_proj, ..., then up_proj, then down_proj), so each layer's
// experts are one grouped tensor [E, I, H] without a copy. Selection biases (e_score_correction_bias) are
// buffers, not parameters: they live in a separate fp32 flat buffer.
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace dsv3 {

class Backend;

struct ParamSpec {
  std::string name;  // hub name, e.g. model.layers.3.mlp.experts.7.up_proj.weight
  Shape shape;
  int64_t offset = 0;     // elements into the flat buffer it lives in
  bool is_bias = false;   // selection bias: lives in the fp32 bias buffer, not trained by gradients
  bool is_norm = false;   // RMSNorm weight: initialized to 1, no weight decay
  bool init_zero = false; // initialized to 0 (LayerNorm bias)
  bool is_matrix() const { return shape.size() >= 2; }
};

struct ParamLayout {
  std::vector<ParamSpec> specs;
  std::map<std::string, size_t> index;  // name -> specs position
  int64_t num_params = 0;               // elements of the parameter buffer
  int64_t num_bias = 0;                 // elements of the bias buffer
  // Routed experts present in this layout: [expert_lo, expert_lo + expert_n) of every MoE layer (an
  // expert-parallel rank holds a slice, dist/expert_shard.h); the full model has 0 and n_routed_experts.
  int64_t expert_lo = 0, expert_n = 0;
  const ParamSpec& at(const std::string& name) const;
};

// expert_n < 0: all routed experts; otherwise only experts [expert_lo, expert_lo + expert_n) of each MoE layer
// (hub names keep their global expert index).
ParamLayout make_param_layout(const ModelConfig& cfg, int64_t expert_lo = 0, int64_t expert_n = -1);

// The DSA lightning indexer of a deepseek_v32 layer (hub: self_attn.indexer.*).
struct IndexerWeights {
  Tensor wq_b;                    // [nI*dI, qr]: index queries from the q LoRA latent
  Tensor wk;                      // [dI, H]
  Tensor k_norm_w, k_norm_b;      // [dI] LayerNorm on the index key
  Tensor weights_proj;            // [nI, H]: per-head weights of the index score
};

struct AttnWeights {
  Tensor q_proj;                  // [nh*(dn+dr), H] (q_lora_rank null)
  Tensor q_a_proj, q_a_norm;      // [qr, H], [qr]
  Tensor q_b_proj;                // [nh*(dn+dr), qr]
  Tensor kv_a_proj;               // [r + dr, H]   (hub: kv_a_proj_with_mqa)
  Tensor kv_a_norm;               // [r]
  Tensor kv_b_proj;               // [nh*(dn+dv), r]
  Tensor o_proj;                  // [H, nh*dv]
  bool has_indexer = false;
  IndexerWeights indexer;         // deepseek_v32
};
struct MlpWeights {
  Tensor gate, up, down;          // [I, H], [I, H], [H, I]
};
struct MoeWeights {
  Tensor router;                  // [E, H]  (hub: mlp.gate.weight)
  Tensor bias;                    // [E] fp32 (hub: mlp.gate.e_score_correction_bias)
  Tensor gate, up, down;          // grouped: [E, I, H], [E, I, H], [E, H, I]
  bool has_shared = false;
  MlpWeights shared;              // [I*ns, H] ...
};
struct LayerWeights {
  int64_t index = 0;              // hub layer index
  Tensor input_norm, post_norm;   // [H]
  AttnWeights attn;
  bool is_moe = false;
  MlpWeights mlp;                 // dense layers
  MoeWeights moe;
};
struct MtpWeights {
  Tensor enorm, hnorm;            // [H]
  Tensor eh_proj;                 // [H, 2H]: input concat(enorm(emb), hnorm(h))
  Tensor head_norm;               // [H]  (hub: shared_head.norm)
  LayerWeights layer;
};

struct ModelWeights {
  ModelConfig cfg;
  ParamLayout layout;
  Tensor flat;                    // [num_params] F32 or BF16, on the backend's device
  Tensor bias_flat;               // [num_bias] F32
  Tensor embed, final_norm, lm_head;  // [V, H], [H], [V, H]
  std::vector<LayerWeights> layers;
  std::vector<MtpWeights> mtp;

  Tensor view(const std::string& name);  // any parameter or bias by hub name
  void bind();  // (re)build every view from flat/bias_flat (after allocation or upload)
};

struct LoadOptions {
  std::string dtype = "auto";  // auto (bf16 if every float tensor is bf16, else f32) | f32 | bf16
  // Routed experts to load (an expert-parallel rank's slice, make_param_layout); -1: all of them.
  int64_t expert_lo = 0, expert_n = -1;
};

// Reads config.json + safetensors of a hub directory, checks every expected tensor by name and shape,
// dequantizes fp8 (x weight_scale_inv per 128x128 block) and fills the flat buffers: in host memory, or, with a
// device backend as target, straight in its memory (each tensor converted there from the mmap'd file).
ModelWeights load_weights(const ModelConfig& cfg, const std::string& dir, const LoadOptions& opt = {},
                          Backend* target = nullptr);
// Random weights: normal(0, initializer_range) for matrices and embeddings, ones for norms, zero biases.
ModelWeights init_weights(const ModelConfig& cfg, uint64_t seed, DType dtype);
// Allocates zeroed flat buffers of a dtype for a config (used for gradients and optimizer state too).
// allocate_flat false leaves flat empty for the caller to place (the loader's device path).
// expert_lo/expert_n as make_param_layout (an expert-parallel slice).
ModelWeights alloc_weights(const ModelConfig& cfg, DType dtype, bool allocate_flat = true, int64_t expert_lo = 0,
                           int64_t expert_n = -1);
// Writes a hub directory: config.json and model.safetensors with hub names (experts split, MTP copies of
// embed_tokens and shared_head.head included), in dtype. Atomic per file.
void save_weights(const ModelConfig& cfg, const ModelWeights& w, const std::string& dir, DType dtype);

}  // namespace dsv3
