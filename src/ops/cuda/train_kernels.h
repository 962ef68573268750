#pragma once
// Host entry points of the training kernels (train_*.cu), called by cuda_train_backend.cpp. Everything is fp32
// device memory unless a name says host_*; each function launches on stream s and checks the launch. The math of
// each op is that of the CPU reference kernel of the same name in ops/cpu/train_ops.h.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ops/cuda/cuda_ops.h"  // DSV3_CUDA_CHECK

namespace dsv3 {
struct RouteParams;
}

namespace dsv3::cuda::train {

// ---- train_elementwise.cu: fills, copies, RMSNorm, RoPE, SwiGLU, embedding.
void fill(float* x, float value, int64_t n, cudaStream_t s);
// dst[r * dst_stride + c] (= or +=) src[r * src_stride + c].
void copy_2d(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows, int64_t cols,
             bool accumulate, cudaStream_t s);
void add(float* y, const float* x, int64_t n, cudaStream_t s);  // y += x
void rmsnorm_forward(float* out, float* rstd, const float* x, int64_t xs, const float* w, int64_t N, int64_t D,
                     double eps, cudaStream_t s);
// part: scratch of rmsnorm_backward_part_floats(N, D) floats (per-chunk partial sums of dw, summed in order).
int64_t rmsnorm_backward_part_floats(int64_t N, int64_t D);
void rmsnorm_backward(float* dx, int64_t dxs, float* dw, const float* dout, const float* x, int64_t xs,
                      const float* rstd, const float* w, int64_t N, int64_t D, float* part, cudaStream_t s);
// backward = the transposed rotation.
void rope(float* x, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
          const float* cos, const float* sin, bool interleave, bool backward, cudaStream_t s);
void swiglu_forward(float* out, const float* g, const float* u, int64_t n, cudaStream_t s);
// dg/du may alias g/u (each element is read before it is written by the same thread).
void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u, int64_t n,
                     cudaStream_t s);
void embedding_forward(float* out, const float* table, const int32_t* ids, int64_t N, int64_t H, cudaStream_t s);
// dtable[row_id[r]] += sum of dout rows tok[tok_off[r] .. tok_off[r+1]) in that order, for r < nrows (one block
// per distinct id; the lists are built on the host, so repeated ids never race and the order is the token order).
void embedding_backward(float* dtable, const float* dout, const int32_t* row_id, const int32_t* tok_off,
                        const int32_t* tok, int64_t nrows, int64_t H, cudaStream_t s);
// out[i, :] (= or += with accumulate) src[rows[i], :] for i < n (row gather, H columns).
void gather_rows(float* out, const float* src, const int32_t* rows, int64_t n, int64_t H, cudaStream_t s,
                 bool accumulate = false);
// out[i, :] = scale[i] * src[rows[i], :].
void gather_rows_scaled(float* out, const float* src, const int32_t* rows, const float* scale, int64_t n, int64_t H,
                        cudaStream_t s);

// ---- train_loss.cu: cross-entropy, forward and backward in one pass; row_loss [N] fp64 and hit [N] int32 are
// per-row results the host sums in order.
void cross_entropy(float* dlogits, const float* logits, const int32_t* targets, int64_t N, int64_t V, double scale,
                   double* row_loss, int32_t* hit, cudaStream_t s);

// ---- train_attention.cu: the non-GEMM parts of the causal attention core of one sequence, all heads at once.
// S/P [nh, T, T]: P = exp(S - lse) on j <= i, 0 above the diagonal; forward also writes lse [nh, T] (row i of
// head h at lse[h * T + i]).
void causal_softmax_forward(float* SP, float* lse, int64_t nh, int64_t T, cudaStream_t s);
// P recomputed from lse; D[h * T + i] = dO_i,h . O_i,h (dout/out rows [T, nh, dv] with row stride os).
void causal_softmax_recompute(float* SP, float* D, const float* lse, const float* dout, const float* out, int64_t nh,
                              int64_t T, int64_t dv, int64_t os, cudaStream_t s);
// dS = P * (dP - D) on j <= i, 0 above (in place on dP).
void softmax_backward(float* dP, const float* P, const float* D, int64_t nh, int64_t T, cudaStream_t s);
// Kc [n, nh, dn + dr] = [k_nope | k_pe] per head, from kv [n, nh, dn + dv] and kpe [n, dr].
void concat_keys(float* Kc, const float* kv, const float* kpe, int64_t n, int64_t nh, int64_t dn, int64_t dr,
                 int64_t dv, cudaStream_t s);
// dKc [T, nh, dn + dr] -> dkv[:, :, :dn] (v columns untouched) and dkpe [T, dr] = sum over heads in head order.
void split_key_grads(float* dkv, float* dkpe, const float* dKc, int64_t T, int64_t nh, int64_t dn, int64_t dr,
                     int64_t dv, cudaStream_t s);

// ---- train_flash_attention.cu: the fused causal attention core (all sequences and heads in one launch per
// kernel; bf16 tensor cores, fp32 accumulation; no T x T buffer). Same arguments and semantics as
// TrainBackend::attention_forward/backward; `work` is device scratch of flash_attention_work_bytes(...,
// backward) bytes, 16-byte aligned. Each returns false (and launches nothing) when the head dims are not
// instantiated (dn/dr/dv = 64/32/64 or 32/16/32) or a pointer is not 16-byte aligned: the caller then takes the
// materialized path.
bool flash_attention_supported(int64_t dn, int64_t dr, int64_t dv);
size_t flash_attention_work_bytes(int64_t B, int64_t T, int64_t nh, int64_t dn, int64_t dr, int64_t dv,
                                  bool backward);
bool flash_attention_forward(float* out, float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                             int64_t T, int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale, void* work,
                             cudaStream_t s);
bool flash_attention_backward(float* dq, float* dkv, float* dkpe, const float* dout, const float* out,
                              const float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                              int64_t T, int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale, void* work,
                              cudaStream_t s);

// ---- train_moe.cu: router, balance loss, expert dispatch helpers.
void route_forward(int32_t* idx, float* w, float* scores, const float* logits, const float* bias, int64_t N,
                   const RouteParams& p, cudaStream_t s);
void route_backward(float* dlogits, const float* dw, const float* dscores_extra, const float* scores,
                    const int32_t* idx, int64_t N, const RouteParams& p, cudaStream_t s);
// seq_loss [B] fp64 (per-sequence losses, summed on the host); inv_s [N] fp64 scratch.
void balance_loss(float* dscores, const float* scores, const int32_t* idx, int64_t B, int64_t Tq, int64_t E,
                  int64_t K, double alpha, double grad_scale, double* seq_loss, double* inv_s, cudaStream_t s);
// out[t, :] += sum_k w[t, k] Y[where[t K + k], :] (k order).
void moe_combine(float* out, const float* Y, const float* w, const int32_t* where, int64_t N, int64_t K, int64_t H,
                 cudaStream_t s);
// out[t, :] += sum_k Y[where[t K + k], :] (k order).
void moe_sum_pairs(float* out, const float* Y, const int32_t* where, int64_t N, int64_t K, int64_t H,
                   cudaStream_t s);
// dw[t, k] = dout[t, :] . Y[where[t K + k], :].
void moe_dw(float* dw, const float* dout, const float* Y, const int32_t* where, int64_t N, int64_t K, int64_t H,
            cudaStream_t s);

// ---- train_optim.cu: gradient norm and AdamW.
constexpr int kSumSquaresBlocks = 256;  // fixed, so the reduction order depends only on n
// part [kSumSquaresBlocks] fp64 partial sums (the host adds them in order).
void sum_squares(const float* x, int64_t n, double* part, cudaStream_t s);
void adamw(float* params, const float* grads, float* m, float* v, int64_t n, float b1, float b2, float eps,
           float grad_scale, float decay, float step_size, float inv_sqrt_bc2, cudaStream_t s);

}  // namespace dsv3::cuda::train
