#pragma once
// CPU matrix products with fp32 activations and fp32 or bf16 weights, fp32 accumulation.
// OpenBLAS does the fp32 work; bf16 weights are either read directly by a small-M kernel (decode: bound by
// weight bytes, and OpenBLAS has no fp32-activation x bf16-weight GEMV) or widened to fp32 in panels and
// handed to sgemm (prefill: bound by FLOPs, the widening is O(N K) against O(M N K)).
#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace dsv3::cpu {

// C[M, N] = A[M, K] W[N, K]^T + beta C, with leading dimensions; W is F32 or BF16.
void gemm_xwT(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const void* W, DType wt, int64_t ldw,
              float* C, int64_t ldc, float beta = 0.f);
// C[M, N] = A[M, K] W[K, N] + beta C; W is F32 or BF16 (row-major [K, N] with leading dimension ldw).
void gemm_xw(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const void* W, DType wt, int64_t ldw,
             float* C, int64_t ldc, float beta = 0.f);
// Up to this many rows of activations, bf16 products stream the weights once (gemv_multi); above, widening
// panels to fp32 for sgemm wins because the work becomes FLOP-bound.
inline constexpr int64_t kSmallM = 32;

// Many small-M products in ONE parallel region: y[m, n] = sum_k W[n, k] x[m, k] for every job.
// Decode calls many small matrices (each expert, each head); one fork/join for all of them keeps the cores
// streaming weights instead of waiting on each other.
struct GemvJob {
  const void* W;  // [N, K] with leading dimension ldw
  DType wt;
  int64_t N, K, ldw;
  const float* x;  // [M, K] with leading dimension ldx
  int64_t ldx;
  float* y;        // [M, N] with leading dimension ldy
  int64_t ldy;
  int64_t M;
  // F8E4M3 weights: the [tiles(N), tiles(K)] block scales of W (row n of W lies in block row n / 128; ldw == K).
  // x must already hold fake-quantized activations (fp8::round_trip_1x128), see gemm_xwT_fp8.
  const float* scale = nullptr;
};
void gemv_multi(const std::vector<GemvJob>& jobs);

// ---- FP8 (core/fp8.h): W F8E4M3 [N, K] (dense, ldw = K) with 128x128 block scales, A [M, K] already
// fake-quantized in 1x128 tiles (each value code * tile scale, exact in fp32). C = A (code_w * scale_w)^T in fp32:
// for M <= kSmallM the weights are dequantized inside the GEMV (1 byte per weight from memory), above in panels
// of rows for sgemm. Equal to the per-128-block promoted FP8 product up to fp32 summation order.
void gemm_xwT_fp8(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint8_t* W, const float* scale,
                  float* C, int64_t ldc);
// Rows [n0, n1) of an F8E4M3 GemvJob (called by gemv_multi).
void gemv_rows_fp8(const GemvJob& g, int64_t n0, int64_t n1);
// dst[r, :] = W[n0 + r, :] dequantized (code x block scale), r < rows; W [N, K] F8E4M3 with scales as above.
void dequant_rows_fp8(float* dst, int64_t ld_dst, const uint8_t* W, const float* scale, int64_t K, int64_t n0,
                      int64_t rows);

// Widen rows of a bf16/f32 matrix to fp32: dst[r, :] = src[r, :cols] for r < rows.
void widen_rows(float* dst, int64_t ld_dst, const void* src, DType t, int64_t ld_src, int64_t rows, int64_t cols);

}  // namespace dsv3::cpu
