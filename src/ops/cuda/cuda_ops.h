#pragma once
// Host-side entry points of the CUDA kernels (one .cu file per concern). backend_cuda.cpp checks shapes and
// dtypes, then calls these; each launches on the given stream and checks the launch. Activations are bf16
// unless a parameter says otherwise; pointers are device pointers unless named host_*.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {
struct RouteParams;
}

namespace dsv3::cuda {

using bf16 = __nv_bfloat16;

[[noreturn]] void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line);
#define DSV3_CUDA_CHECK(x)                                                                 \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) ::dsv3::cuda::throw_cuda_error(e_, #x, __FILE__, __LINE__);     \
  } while (0)

// ---- write_weights.cu: fp8 e4m3 [N, K] times block scales [ceil(N/bn), ceil(K/bk)] (fp32) -> out (F32 or BF16).
void dequant_fp8(void* out, DType out_t, const uint8_t* w8, const float* scale, int64_t N, int64_t K, int64_t bn,
                 int64_t bk, cudaStream_t s);

// ---- norm_rope.cu: elementwise ops, norms, rope, copies.
// out[t, :D] = x[t*xs : t*xs + D] * rsqrt(mean(x^2) + eps) * w; act dtype at (BF16 or F32), weight dtype wt.
void rmsnorm(void* out, const void* x, int64_t xs, const void* w, DType wt, DType at, int64_t T, int64_t D, float eps,
             cudaStream_t s);
void add(void* out, const void* a, const void* b, int64_t n, DType at, cudaStream_t s);
// x = a + b, then out = rmsnorm(x) * w, over rows of D (bf16, D % 8 == 0, 16-byte aligned; see add_rmsnorm_ok).
bool add_rmsnorm_ok(const void* x, const void* a, const void* b, const void* out, int64_t D);
void add_rmsnorm(bf16* x, const bf16* a, const bf16* b, bf16* out, const void* w, DType wt, int64_t T, int64_t D,
                 float eps, cudaStream_t s);
void silu_mul(void* out, const void* gate, const void* up, int64_t n, DType at, cudaStream_t s);
// Row copies: dst row (dst_idx ? dst_idx[i] : i) = src row (src_idx ? src_idx[i] : i) for i < nrows, row_bytes each;
// a negative index skips the row. Pitches in bytes. Used for gathers, scatters into the KV pool and column slices.
void copy_rows(void* dst, const int* dst_idx, int64_t dst_pitch, const void* src, const int* src_idx, int64_t src_pitch,
               int64_t nrows, int64_t row_bytes, cudaStream_t s);
// out[t, :] = table[ids[t], :] (table F32 or BF16; out in at).
void embedding(void* out, DType at, const void* table, DType tt, const int* ids, int64_t T, int64_t H, cudaStream_t s);
// In place on x viewed [T, n, stride], columns [off, off + dr); cos/sin [max_pos, dr/2] fp32; pos [T].
void rope(void* x, DType at, int64_t T, int64_t n, int64_t stride, int64_t off, int64_t dr, const int* pos,
          const float* cos, const float* sin, bool interleave, cudaStream_t s);
void f32_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t s);
void bf16_to_f32(float* out, const bf16* in, int64_t n, cudaStream_t s);
// Counter-based normal fill: element i = mean + std * N(seed, i), the same formula as Backend::fill_normal.
void fill_normal(void* p, DType t, int64_t n, float mean, float std, uint64_t seed, cudaStream_t s);

// ---- gemm.cu: skinny products for decode (few rows of x, bound by the bytes of W).
// y[b, n] = sum_k x[b, k] W[n, k] for b < M, n < N, with bf16 W and x, fp32 accumulation on tensor cores. Matrix z
// (blockIdx.y) is W + z*stride_w, reading x + z*stride_x, writing y + z*stride_y (elements). The MoE form picks
// expert e = active[z] (z < *n_active): W + e*stride_w; rows j < counts[e], x row xrow[offsets[e] + j] (or
// offsets[e] + j when xrow is null), output row offsets[e] + j. With w2 (dual), it also computes the same rows of
// a second matrix and writes silu(x W^T) * (x W2^T) (the SwiGLU input).
struct SkinnyArgs {
  const bf16* w = nullptr;
  const bf16* w2 = nullptr;
  int64_t ldw = 0, stride_w = 0;
  const bf16* x = nullptr;
  int64_t ldx = 0, stride_x = 0;
  void* y = nullptr;
  int64_t ldy = 0, stride_y = 0;
  int M = 0, N = 0, K = 0, batch = 1;
  DType out_t = DType::BF16;
  const int *active = nullptr, *n_active = nullptr, *counts = nullptr, *offsets = nullptr, *xrow = nullptr;
};
constexpr int kSkinnyMaxRows = 16;  // rows of x per pass (two groups of 8, the n of one mma)
// True when pointers and leading dimensions allow the 16-byte loads of the skinny kernel.
bool skinny_aligned(const SkinnyArgs& a);
// rows_hint: the most rows any matrix can get (chooses 8 or 16 rows per pass; larger counts loop).
void skinny_gemm(const SkinnyArgs& a, int rows_hint, cudaStream_t s);
// q_lat[b, h, :r] = q[b, h, :dn] . W_UK[h] with W_UK[h] = kv_b rows [h*(dn+dv), h*(dn+dv)+dn) ([dn, r]); B <= 8.
// With q_pe (optional): also q_pe[b, h, :dr] = rope(q[b, h, dn:]) at position pos[b] (tables as for rope).
struct RopeArgs {
  const int* pos = nullptr;
  const float *cos = nullptr, *sin = nullptr;
  bool interleave = true;
};
void absorb_q_small(bf16* q_lat, const bf16* q, const bf16* kv_b, int B, int nh, int dn, int dr, int dv, int r,
                    bf16* q_pe, const RopeArgs& rope, cudaStream_t s);

// ---- attention_prefill.cu: causal MLA attention of one sequence (flash-attention style on tensor cores).
// q [len, nh, dn+dr], kv [n, nh, dn+dv], kpe [n, dr], out [len, nh, dv], n = pos0 + len.
void mla_prefill(bf16* out, const bf16* q, const bf16* kv, const bf16* kpe, int len, int pos0, int nh, int dn, int dr,
                 int dv, float scale, cudaStream_t s);
// k [n, nh, dn+dr] = per head [k_nope | k_pe] from kv [n, nh, dn+dv] and kpe [n, dr]: dense keys for cuDNN's
// attention (cudnn_attention.h). Head dims multiples of 8, pointers 16-byte aligned.
void mla_concat_k(bf16* k, const bf16* kv, const bf16* kpe, int n, int nh, int dn, int dr, int dv, cudaStream_t s);
// The same with fp32 activations (the exact-comparison mode; simple kernel).
void mla_prefill_f32(float* out, const float* q, const float* kv, const float* kpe, int len, int pos0, int nh, int dn,
                     int dr, int dv, float scale, cudaStream_t s);

// ---- mla_decode.cu: absorbed decode over the paged bf16 latent cache (one query per sequence).
// Cache write: pool (this layer's rows) row rows[i] = [c[i, :r] | kpe[i, :dr]] for i < T; rows < 0 skipped.
void kv_write(bf16* pool, const int* rows, const bf16* c, const bf16* kpe, int T, int r, int dr, cudaStream_t s);
// meta (device int32): [B] key counts n_b, [B] offsets of each block table into meta, then the tables.
// pool: this layer's rows [blocks * bs, r + dr]. out_lat [B, nh, r]. ws: workspace of mla_decode_ws_bytes.
int mla_decode_splits(int B, int nh, int max_n, int num_sms);
size_t mla_decode_ws_bytes(int B, int nh, int r, int splits, int max_n);
void mla_decode(bf16* out_lat, const bf16* q_lat, const bf16* q_pe, const bf16* pool, const int* meta, int B, int nh,
                int r, int dr, int bs, int splits, int max_n, float scale, void* ws, cudaStream_t s);
// fp32 activations and cache (simple kernel; ws as for splits = 1).
void mla_decode_f32(float* out_lat, const float* q_lat, const float* q_pe, const float* pool, const int* meta, int B,
                    int nh, int r, int dr, int bs, int max_n, float scale, void* ws, cudaStream_t s);

// ---- fused.cu: fused decode kernels (each replaces a chain of small ones; see the file).
// Cache rows rows[t] (< 0: skipped) of this layer's pool = [rmsnorm(kva[t, :r]) * w | rope(kva[t, r:r+dr])].
void kv_norm_rope_write(void* pool, const int* rows, const void* kva, DType at, int T, int r, int dr, const void* w,
                        DType wt, float eps, const int* pos, const float* cos, const float* sin, bool interleave,
                        cudaStream_t s);
// out [T, n, dr] = rope(x[t, h, off : off + dr]) for x viewed [T, n, stride] (x unchanged).
void rope_copy(void* out, const void* x, DType at, int64_t T, int64_t n, int64_t stride, int64_t off, int64_t dr,
               const int* pos, const float* cos, const float* sin, bool interleave, cudaStream_t s);
// Per row t of D: f = bf16(f + sum_k w[t, k] y[pair_pos[t*K + k]]); x = bf16(x + f); out = rmsnorm(x) * nw.
// y [P, D] fp32 (moe_combine's input), bf16 rows, D % 8 == 0, 16-byte aligned (see combine_add_rmsnorm_ok).
bool combine_add_rmsnorm_ok(const void* x, const void* f, const void* y, const void* out, int K, int64_t D);
void combine_add_rmsnorm(bf16* x, bf16* f, const float* y, const float* w, const int* pair_pos, int T, int K, bf16* out,
                         const void* nw, DType nwt, int64_t D, float eps, cudaStream_t s);

// ---- moe.cu: routing and dispatch.
void moe_route(int* idx, float* w, const float* logits, const float* bias, int T, const RouteParams& p, cudaStream_t s);
// moe_route then moe_plan in one single-block kernel, for decode sizes (T <= kRoutePlanMaxT).
constexpr int kRoutePlanMaxT = 64;
void moe_route_plan(int* idx, float* w, const float* logits, const float* bias, int T, const RouteParams& p, int* counts,
                    int* offsets, int* active, int* n_active, int* sorted_xrow, int* pair_pos, cudaStream_t s);
// Buckets the T*K (token, slot) pairs by expert: counts[E], offsets[E+1], active[E] (experts with tokens, ascending),
// n_active[1], sorted_xrow[pos] = token of the pair at sorted position pos, pair_pos[t*K + k] = its position.
void moe_plan(const int* idx, int T, int K, int E, int* counts, int* offsets, int* active, int* n_active,
              int* sorted_xrow, int* pair_pos, cudaStream_t s);
// out[t, :] += sum_k w[t, k] * Y[pair_pos[t*K + k], :]; Y [T*K, H] fp32 or bf16 in sorted-pair order.
void moe_combine(bf16* out, const void* y, bool y_f32, const float* w, const int* pair_pos, int T, int K, int H,
                 cudaStream_t s);
void moe_combine_f32(float* out, const float* y, const float* w, const int* pair_pos, int T, int K, int H,
                     cudaStream_t s);

}  // namespace dsv3::cuda
