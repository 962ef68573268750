#pragma once
// CPU implementations of the backend ops (fp32 activations). The CpuBackend class forwards to these; the
// CPU trainer calls them (and their backward partners in ops/cpu/*_backward) directly.
#include "ops/backend.h"

namespace dsv3::cpu {

void rmsnorm(float* out, const float* x, int64_t x_stride, const Tensor& w, int64_t T, int64_t D, float eps);
void rope(float* x, int64_t T, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
          const float* cos, const float* sin, bool interleave);
// sel: optional DSA selection [len, K] (mla_attention) / [B, K] (mla_decode) of attended positions, -1 = none.
void mla_attention(float* out, const float* q, const float* kv, const float* kpe, int64_t len, int64_t pos0,
                   int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale, const int32_t* sel = nullptr,
                   int64_t K = 0);
void mla_decode(Tensor& out_lat, const Tensor& q_lat, const Tensor& q_pe, const Tensor& pool, const KvPoolSpec& spec,
                int64_t layer, const std::vector<SeqSlice>& seqs, float scale, const Tensor* sel = nullptr);
// DeepSeek-V3.2 indexer ops (ops/cpu/dsa.cpp); the Backend comments define them.
void layernorm(float* out, const float* x, const Tensor& w, const Tensor& b, int64_t T, int64_t D, float eps);
void index_key_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs,
                     const float* k);
void dsa_select(int32_t* sel, int64_t K, const float* q, const float* w, int64_t nI, const Tensor& pool,
                const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs, float q_scale, float w_scale);
void moe_route(int32_t* idx, float* w, const float* logits, const float* bias, int64_t T, const RouteParams& p,
               float* scores_out = nullptr);
void moe_experts_acc(float* out, const float* x, const int32_t* idx, const float* w, int64_t T, int64_t K,
                     int64_t H, const Tensor& gate, const Tensor& up, const Tensor& down);

// Pointer to expert e's [rows, cols] slice of a grouped [E, rows, cols] weight.
inline const void* expert_slice(const Tensor& g, int64_t e) {
  return static_cast<const char*>(g.data) + size_t(e * g.dim(1) * g.dim(2)) * dtype_size(g.dtype);
}

}  // namespace dsv3::cpu
