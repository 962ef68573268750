#pragma once
// Causal prefill attention on cuDNN's fused flash attention (SDPA through the cuDNN frontend graph API).
// cuDNN is NVIDIA's maintained attention for Hopper (wgmma/TMA, warp-specialized, the DeepSeek head dims
// d_qk 192 / d_v 128 among its supported shapes); the hand-written mma.sync kernel of attention_prefill.cu stays
// as the fallback for shapes and machines cuDNN does not take. Built only when CMake finds cuDNN and the
// frontend headers (PyPI's nvidia-cudnn-frontend; DSV3_HAVE_CUDNN); otherwise available() is false.
//
// Shapes (bf16, row-major, one sequence): q [len, nh, dqk], k [n, nh, dqk] (dense), v rows of v_row elements
// holding each head's dv values at h * v_head + [0, dv) (so v may be a view into MLA's kv [n, nh, dn+dv]), out
// [len, nh, dv]; n >= len. Query i sits at position n - len + i and sees keys 0 .. n - len + i (bottom-right
// causal alignment).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv3::cuda::cudnn {

// The library was built in and its runtime loads (checked once).
bool available();

struct CausalAttention {
  __nv_bfloat16* out = nullptr;
  const __nv_bfloat16* q = nullptr;
  const __nv_bfloat16* k = nullptr;
  const __nv_bfloat16* v = nullptr;
  int64_t v_row = 0, v_head = 0;  // elements between tokens / heads of v
  int len = 0, n = 0, nh = 0, dqk = 0, dv = 0;
  float scale = 1.f;
};

// Runs it on stream s; false (nothing launched) where cuDNN has no engine for the shape, with the reason in
// *why when given. Plans are cached per shape (the first call of a shape builds one: milliseconds).
bool causal_attention(const CausalAttention& a, cudaStream_t s, const char** why = nullptr);

}  // namespace dsv3::cuda::cudnn
