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
//
// Resident dtype (--dtype): f32 (auto) expands every parameter to fp32 in `flat`, at its layout offset (what
// the trainer's parameter and gradient buffers use too). bf16 keeps the matrices the products read
// (v4_bf16_resident: every FP8 / FP4 weight, the embedding, the head, the compressors' wkv / wgate and the
// indexer's weights_proj) in `flat16` and the rest in a smaller fp32 `flat`: norms, the mHC fn / base / scale,
// sinks, the compressors' position biases (ape), the router (ffn.gate.weight), selection biases (bias_flat).
// Those stay fp32 because the release stores the mHC tensors, sinks and ape in F32 (bf16 would round them) and
// the host loops read them as fp32; together they are ~0.1% of V4-Flash's parameters.
// Exactness: an FP8 value is an e4m3 code (a multiple of 2^-9 with at most 4 significant bits, |x| <= 448)
// times a UE8M0 scale 2^(b-127), b in [0, 254]; an FP4 value is an e2m1 code (a multiple of 2^-1 with at most
// 2 significant bits, |x| <= 6) times such a scale. bf16 has fp32's 8-bit exponent (the same largest finite
// value and overflow; normals down to 2^-126, subnormals = the multiples of 2^-133 below that) and 8
// significant bits, so a product is exact in bf16 when it is a multiple of 2^-133: every FP4 value (a
// multiple of 2^-128) and every FP8 value whose block scale byte is >= 3 (a multiple of 2^(b-136)); only FP8
// blocks with a scale under 2^-124, which no trained weight has, could hold values that fp32 holds and bf16
// does not. The loader checks every converted value anyway (a float scale that is not a power of two, or a
// tiny one, gives values bf16 cannot hold) and fails naming the tensor. BF16 tensors are copied, so on
// the released layout a bf16-resident model holds exactly the fp32 path's values. F32 / F16 matrices (e.g.
// a transformers save_pretrained checkpoint) are rounded to nearest bf16, as the V3 path's --dtype bf16 does;
// bf16_from_float counts them (0: exact).
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/v4_config.h"
#include "model/weights.h"

namespace dsv3 {

// How a parameter may be stored in a quantized release: fp8 blocks, the experts' storage, or plain floats.
enum class V4Store : uint8_t { Plain, Fp8, Expert };

// Where one parameter lives under --dtype bf16: flat16 (bf16) or flat (fp32), at offset elements.
struct V4Place {
  bool bf16 = false;
  int64_t offset = 0;
};

struct V4Weights {
  V4Config cfg;
  ParamLayout layout;             // release names; selection biases (ffn.gate.bias) in bias_flat
  std::vector<V4Store> store;     // per layout spec
  Tensor flat;                    // fp32, host: [num_params] (f32), or the parameters kept fp32 (bf16)
  Tensor flat16;                  // bf16 only: the v4_bf16_resident matrices, host
  std::vector<V4Place> place;     // bf16 only: per layout spec; empty: every parameter in flat at its layout offset
  int64_t bf16_from_float = 0;    // bf16 only: resident matrices read from F32 / F16 tensors (rounded to bf16)
  Tensor bias_flat;               // [num_bias] fp32
  std::vector<std::vector<int32_t>> tid2eid;  // per layer: [V * K] expert ids of hash_moe layers (empty otherwise)
  bool mtp_absent = false;        // config.json asks for MTP blocks, the checkpoint has no mtp.* tensors: MTP off
  Tensor view(const std::string& name) const;
  DType matrix_dtype() const { return place.empty() ? DType::F32 : DType::BF16; }
};

// Whether a parameter is kept in bf16 under --dtype bf16 (see above): a 2-D matrix other than the mHC
// fn (hc_*), the compressors' ape and the router.
bool v4_bf16_resident(const ParamSpec& s);
// Resident bytes of the weights (parameters and selection biases) of a layout in matrices = F32 or BF16.
int64_t v4_weight_bytes(const ParamLayout& L, DType matrices);

// The parameter layout of a config, and how each tensor may be stored.
ParamLayout make_v4_param_layout(const V4Config& c, std::vector<V4Store>* store = nullptr);
// Reads every expected tensor by name (release or transformers spelling), checks shapes and dtypes against the
// config, and dequantizes (dequantize false: every check, no buffers; what `dsv3 info` runs on a large
// checkpoint). Fails with one line naming the tensor. matrices: F32 (every parameter in fp32) or BF16 (the
// v4_bf16_resident ones in flat16; each tensor converted straight from the mmap'd file into its place, so the
// fp32 model is never materialized).
V4Weights load_v4_weights(const V4Config& c, const std::string& dir, bool dequantize = true,
                          DType matrices = DType::F32);

// Parameter counts: all (main model, as transformers counts), active per token (routed experts: the top-k only;
// embedding: one row), and the MTP blocks' own (their embedding and head are the main model's).
int64_t v4_total_params(const V4Config& c);
int64_t v4_mtp_params(const V4Config& c);
int64_t v4_active_params(const V4Config& c);

// The dequantization kernels (host): fp4 pairs [N, K/2] x per-32 scales [N, K/32] (fp32 values of the UE8M0
// bytes) into out [N, K].
void dequant_fp4_e2m1(float* out, const uint8_t* packed, const float* scale, int64_t N, int64_t K, int64_t block = 32);

}  // namespace dsv3
