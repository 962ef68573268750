#pragma once
// DeepSeek-V4 parameters: the hub checkpoint layout (release names, e.g. layers.3.attn.wq_a.weight), one flat
// fp32 buffer in that order, and the loader that dequantizes the released formats exactly:
//  - FP8 e4m3 block weights [N, K] with scales [ceil(N/128), ceil(K/128)] (UE8M0 power-of-two bytes or floats);
//  - FP4 e2m1 routed experts: int8 [N, K/2] holding two codes per byte (low nibble = even column) with one
//    UE8M0 scale per row per 32 columns, [N, K/32].
// Both products are exact in fp32 (a small-mantissa value times a power of two). Checkpoints written by
// transformers' save_pretrained (model.* prefixes, model.embed_tokens, model.hc_head.hc_fn, attn.norm for
// kv_norm) are read too. The MTP blocks (mtp.k.*, cfg.num_nextn_predict_layers of them) follow the main model in
// the flat layout; a checkpoint without mtp.* tensors loads with cfg.num_nextn_predict_layers = 0.
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/v4_config.h"
#include "model/weights.h"

namespace dsv3 {

// How a parameter may be stored in a quantized release: fp8 blocks, the experts' storage, or plain floats.
enum class V4Store : uint8_t { Plain, Fp8, Expert };

struct V4Weights {
  V4Config cfg;
  ParamLayout layout;             // release names; selection biases (ffn.gate.bias) in bias_flat
  std::vector<V4Store> store;     // per layout spec
  Tensor flat;                    // [num_params] fp32, host
  Tensor bias_flat;               // [num_bias] fp32
  std::vector<std::vector<int32_t>> tid2eid;  // per layer: [V * K] expert ids of hash_moe layers (empty otherwise)
  bool mtp_absent = false;        // config.json asks for MTP blocks, the checkpoint has no mtp.* tensors: MTP off
  Tensor view(const std::string& name) const;
};

// The parameter layout of a config, and how each tensor may be stored.
ParamLayout make_v4_param_layout(const V4Config& c, std::vector<V4Store>* store = nullptr);
// Reads every expected tensor by name (release or transformers spelling), checks shapes and dtypes against the
// config, and dequantizes (dequantize false: every check, no buffers; what `dsv3 info` runs on a large
// checkpoint). Fails with one line naming the tensor.
V4Weights load_v4_weights(const V4Config& c, const std::string& dir, bool dequantize = true);

// Parameter counts: all (main model, as transformers counts), active per token (routed experts: the top-k only;
// embedding: one row), and the MTP blocks' own (their embedding and head are the main model's).
int64_t v4_total_params(const V4Config& c);
int64_t v4_mtp_params(const V4Config& c);
int64_t v4_active_params(const V4Config& c);

// The dequantization kernels (host): fp4 pairs [N, K/2] x per-32 scales [N, K/32] (fp32 values of the UE8M0
// bytes) into out [N, K].
void dequant_fp4_e2m1(float* out, const uint8_t* packed, const float* scale, int64_t N, int64_t K, int64_t block = 32);

}  // namespace dsv3
