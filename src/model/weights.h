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
  // FP8 layout only (--dtype fp8): a block-quantized matrix. offset then counts bytes into flat8 and
  // scale_offset fp32 elements into scale_flat (its [tiles(N), tiles(K)] grid of 128x128 block scales).
  bool fp8 = false;
  int64_t scale_offset = 0;
  bool is_matrix() const { return shape.size() >= 2; }
};

struct ParamLayout {
  std::vector<ParamSpec> specs;
  std::map<std::string, size_t> index;  // name -> specs position
  int64_t num_params = 0;               // elements of the parameter buffer
  int64_t num_bias = 0;                 // elements of the bias buffer
  bool fp8 = false;                     // FP8 layout: quantized matrices in flat8/scale_flat, not in flat
  int64_t num_fp8 = 0;                  // bytes of flat8 (FP8 layout)
  int64_t num_scales = 0;               // fp32 elements of scale_flat (FP8 layout)
  // Routed experts present in this layout: [expert_lo, expert_lo + expert_n) of every MoE layer (an
  // expert-parallel rank holds a slice, dist/expert_shard.h); the full model has 0 and n_routed_experts.
  int64_t expert_lo = 0, expert_n = 0;
  const ParamSpec& at(const std::string& name) const;
};

// expert_n < 0: all routed experts; otherwise only experts [expert_lo, expert_lo + expert_n) of each MoE layer
// (hub names keep their global expert index). fp8: the FP8 inference layout (fp8_inference_quantized() matrices
// get the flat8/scale_flat places); make_fp8_param_layout says so by name.
ParamLayout make_param_layout(const ModelConfig& cfg, int64_t expert_lo = 0, int64_t expert_n = -1, bool fp8 = false);
inline ParamLayout make_fp8_param_layout(const ModelConfig& cfg) { return make_param_layout(cfg, 0, -1, true); }

// The DSA lightning indexer of a deepseek_v32 layer (hub: self_attn.indexer.*).
struct IndexerWeights {
  Tensor wq_b;                    // [nI*dI, qr]: index queries from the q LoRA latent
  Tensor wk;                      // [dI, H]
  Tensor k_norm_w, k_norm_b;      // [dI] LayerNorm on the index key
  Tensor weights_proj;            // [nI, H]: per-head weights of the index score
};

// Whether a parameter is kept as FP8 in the FP8 inference layout: every Linear the DeepSeek-V3 release quantizes
// except kv_b_proj (the absorbed decode reads per-head slices of it, which do not align with 128x128 blocks),
// i.e. attention q/q_a/q_b/kv_a/o, dense MLP, shared and routed experts, MTP eh_proj. Not: embed_tokens,
// lm_head, the router (mlp.gate), norms, biases.
bool fp8_inference_quantized(const std::string& name, const Shape& shape);
// Whether the release checkpoint stores a parameter as FP8 (dsv3 quantize): the above plus kv_b_proj.
bool fp8_release_quantized(const std::string& name, const Shape& shape);

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
  Tensor flat8;                   // FP8 layout: [num_fp8] F8E4M3 codes of the quantized matrices
  Tensor scale_flat;              // FP8 layout: [num_scales] F32 block scales (views point into it)
  Tensor bias_flat;               // [num_bias] F32
  Tensor embed, final_norm, lm_head;  // [V, H], [H], [V, H]
  std::vector<LayerWeights> layers;
  std::vector<MtpWeights> mtp;

  Tensor view(const std::string& name);  // any parameter or bias by hub name
  void bind();  // (re)build every view from flat/bias_flat (after allocation or upload)
};

struct LoadOptions {
  // auto (bf16 if every float tensor is bf16, else f32) | f32 | bf16 | fp8 (quantized matrices as F8E4M3 +
  // 128x128 block scales: fp8 checkpoints keep their codes and scales, others are quantized at load; the rest bf16)
  std::string dtype = "auto";
  // Routed experts to load (an expert-parallel rank's slice, make_param_layout); -1: all of them.
  int64_t expert_lo = 0, expert_n = -1;
};

// Reads config.json + safetensors of a hub directory, checks every expected tensor by name and shape,
// dequantizes fp8 (x weight_scale_inv per 128x128 block) and fills the flat buffers: in host memory, or, with a
// device backend as target, straight in its memory (each tensor converted there from the mmap'd file).
ModelWeights load_weights(const ModelConfig& cfg, const std::string& dir, const LoadOptions& opt = {},
                          Backend* target = nullptr);
// The --dtype fp8 form of load_weights (model/weights_fp8.cpp): the FP8 layout, buffers allocated by target (a
// CPU backend when null) and filled through it (write_raw for codes and scales).
ModelWeights load_weights_fp8(const ModelConfig& cfg, const std::string& dir, Backend* target);
// The same from F32/BF16 weights in host memory (bench --config --dtype fp8).
ModelWeights quantize_weights_fp8(ModelWeights& host, Backend* target);
// Random weights: normal(0, initializer_range) for matrices and embeddings, ones for norms, zero biases.
ModelWeights init_weights(const ModelConfig& cfg, uint64_t seed, DType dtype);
// Allocates zeroed flat buffers of a dtype for a config (used for gradients and optimizer state too).
// allocate_flat false leaves flat empty for the caller to place (the loader's device path).
// expert_lo/expert_n as make_param_layout (an expert-parallel slice).
ModelWeights alloc_weights(const ModelConfig& cfg, DType dtype, bool allocate_flat = true, int64_t expert_lo = 0,
                           int64_t expert_n = -1);
// Bytes of weights in memory (flat + flat8 + scale_flat).
size_t weight_bytes(const ModelWeights& w);
// Writes a hub directory: config.json and model.safetensors with hub names (experts split, MTP copies of
// embed_tokens and shared_head.head included), in dtype. Atomic per file.
void save_weights(const ModelConfig& cfg, const ModelWeights& w, const std::string& dir, DType dtype);

}  // namespace dsv3
