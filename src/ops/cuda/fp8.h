#pragma once
// FP8 (e4m3, block-scaled) kernels of the CUDA backend, following core/fp8.h bit for bit where it defines a
// result (quantization codes and scales) and up to fp32 summation order where it defines a product.
//   quantize_1x128      activations: one scale per row and 128 columns (scale = amax / 448, code = e4m3(x / s))
//   quantize_128x128    weights: one scale per 128 x 128 block (quantizing a bf16 checkpoint, training)
//   fp8_grouped_gemm    C = (A codes x sa) (B codes x sb)^T for many problems in one launch (routed experts,
//                       and dense products), mma.sync m16n8k32 e4m3 with fp32 promotion every 128 of K
//   fp8_skinny_gemm     decode: few rows of quantized x against fp8 weights read straight from memory
//   fp8_lt_gemm         the cuBLASLt block-scaled baseline (VEC128 activations x BLK128x128 weights)
// All pointers are device pointers; every launch is on the given stream and checked.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "ops/cuda/cuda_ops.h"

namespace dsv3::cuda {

// ---- fp8_quant.cu
// x [M, K] (bf16 or fp32 per xt, leading dimension ldx elements) -> codes [M, K] (leading dimension K) and scales.
// Scale layout: scales_ld == 0: [M, tiles(K)] row-major (core/fp8.h's layout, what the fp8 kernels here read);
// scales_ld >= M: [tiles(K), scales_ld] (the token-contiguous layout cuBLASLt's VEC128 mode reads; the padding
// entries are set to 1).
void quantize_1x128(uint8_t* codes, float* scales, int64_t scales_ld, const void* x, DType xt, int64_t ldx, int64_t M,
                    int64_t K, cudaStream_t s);
// w [N, K] (bf16 or fp32) -> codes [N, K], scales [tiles(N), tiles(K)]; batch matrices back to back.
void quantize_128x128(uint8_t* codes, float* scales, const void* w, DType wt, int64_t N, int64_t K, int64_t batch,
                      cudaStream_t s);
// out [N, K] (bf16 or fp32) = codes x block scales (the inverse; tests and fallbacks).
void dequantize_128x128(void* out, DType ot, const uint8_t* codes, const float* scales, int64_t N, int64_t K,
                        cudaStream_t s);
// The transposed operands of the training products (TrainBackend's FP8 Dgrad and Wgrad), all fp32 inputs:
// w [batch][N, K] -> codes of w^T [batch][K, N] and scales [batch][tiles(K), tiles(N)]: the 128x128 blocks of w
// (the same codes and scales as quantize_128x128, stored transposed).
void quantize_128x128_t(uint8_t* codes_t, float* scales_t, const float* w, int64_t N, int64_t K, int64_t batch,
                        cudaStream_t s);
// 128x1 tiles along the rows of x [M, K] (ldx elements), written transposed: one tile = rows [row0, row0 + rows)
// of x (rows <= 128), each column k quantized with its own scale (core/fp8.h's quantize_128x1), codes to
// codes_t[k * ldq + col0 + i] for i < round_up(rows, 16) (zeros past rows) and the scale to
// scales_t[k * lds + scale_col]. ldq and every col0 are multiples of 16. `tiles` is device memory.
struct ColTile {
  int row0, rows, col0, scale_col;
};
void quantize_128x1_t(uint8_t* codes_t, int64_t ldq, float* scales_t, int64_t lds, const float* x, int64_t ldx,
                      int64_t K, const ColTile* tiles, int64_t n_tiles, cudaStream_t s);
// out[i] += parts[i] + parts[n + i] + ... + parts[(S - 1) n + i] (in that order) for i < n: the split-K partial
// products of fp8_grouped_gemm summed deterministically.
void add_partials(float* out, const float* parts, int64_t n, int S, cudaStream_t s);
// out [rows, cols] fp32 dense = e4m3(codes[r * ldq + c]) * scales[(r / row_div) * lds + c / 128]: one operand of an
// Fp8Problem as fp32 (row_div 1: a scale per row, 128: block scales), for the fp32 fallback of its product.
void dequantize_operand(float* out, const uint8_t* codes, int64_t ldq, const float* scales, int64_t lds, int64_t rows,
                        int64_t cols, int row_div, cudaStream_t s);

// ---- fp8_grouped_gemm.cu
// One problem: C[M, N] (=, or += when accumulate) sum over 128-blocks kb of
//   (sum_{k in kb} A[m, k] B[n, k]) * sa[m * lds_a + kb] * sb[(n / 128) * lds_b + kb]
// or, with b_rows set, sb[n * lds_b + kb] (B scaled per row: the Wgrad product, whose operands both carry 1x128
// tiles along the token dimension); one launch takes problems of one kind only.
// A [M, K] and B [N, K] e4m3 codes, row-major with leading dimensions in bytes; C bf16 or fp32 (ldc elements).
struct Fp8Problem {
  const uint8_t* A;
  const float* sa;
  const uint8_t* B;
  const float* sb;
  void* C;
  int M, N, K, lda, ldb, ldc, lds_a, lds_b;
  int c_f32;       // C is fp32 (else bf16)
  int accumulate;  // C += product (else C = product)
  int tile0;       // first tile of this problem in the launch (filled by fp8_grouped_gemm)
  int b_rows = 0;  // B has one scale per row and K block (else per 128 rows and K block)
};
// K, lda, ldb multiples of 16 and A, B 16-byte aligned (rows are read in 16-byte chunks).
bool fp8_problem_ok(const Fp8Problem& p);
// Runs every problem (host array, uploaded to dev_probs, device memory for probs.size() problems). tile_m: rows of
// a block's tile, 64 or 128 (0: 64 unless the problems average 256 rows or more).
void fp8_grouped_gemm(std::vector<Fp8Problem>& probs, Fp8Problem* dev_probs, cudaStream_t s, int tile_m = 0);

// ---- fp8_skinny.cu: y[b, n] = sum_kb (sum_k x[b, k] W[n, k]) * sx[b * tiles(K) + kb] * sw[(n/128) * tiles(K) + kb]
// for b < M (any M: rows are processed 8 at a time), W codes [N, K].
// x is either pre-quantized (x codes [rows, K] with scales sx [rows, tiles(K)]) or, with xa set, activations
// [rows, K] (bf16 or fp32, xa_t) that each block quantizes into shared memory itself (quantize_1x128's codes and
// scales exactly), which saves the quantization launch at decode sizes.
// Dual form (w2 set): also the same rows of a second matrix W2 (scales sw2), writing silu(x W^T) * (x W2^T).
// The MoE form (active != null) runs matrix e = active[z] for z < *n_active: W + e * stride_w, sw + e * stride_sw,
// rows j < counts[e] of x at row xrow[offsets[e] + j] (or offsets[e] + j), writing y row offsets[e] + j.
// Output bf16 or fp32; accumulate adds into y.
struct Fp8SkinnyArgs {
  const uint8_t* w = nullptr;
  const float* sw = nullptr;
  const uint8_t* w2 = nullptr;
  const float* sw2 = nullptr;
  int64_t stride_w = 0, stride_sw = 0;
  const uint8_t* x = nullptr;
  const float* sx = nullptr;
  const void* xa = nullptr;
  DType xa_t = DType::BF16;
  void* y = nullptr;
  int64_t ldy = 0;
  int M = 0, N = 0, K = 0, batch = 1;
  DType out_t = DType::BF16;
  bool accumulate = false;
  const int *active = nullptr, *n_active = nullptr, *counts = nullptr, *offsets = nullptr, *xrow = nullptr;
};
bool fp8_skinny_ok(const Fp8SkinnyArgs& a);  // K % 16 == 0, 16-byte aligned rows, room for in-block quantization
void fp8_skinny_gemm(const Fp8SkinnyArgs& a, cudaStream_t s);

// ---- fp8_lt.cpp: y [M, N] (bf16 or fp32) = x W^T on cuBLASLt's block-scaled FP8 path.
// xq [M, K] codes with scales sx [tiles(K), ld_sx] (ld_sx = round_up(M, 4)); wq [N, K] codes with scales sw
// [tiles(N), ld_sw] (ld_sw = round_up(tiles(K), 4)). Returns false when cuBLASLt has no algorithm for the shape.
struct LtFp8 {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};
bool fp8_lt_gemm(LtFp8& lt, void* y, DType yt, const uint8_t* xq, const float* sx, const uint8_t* wq, const float* sw,
                 int64_t M, int64_t N, int64_t K, cudaStream_t s);
inline int64_t round_up4(int64_t v) { return (v + 3) / 4 * 4; }
// Copies block scales [rows, cols] into [rows, round_up4(cols)] (the padding set to 1), as cuBLASLt reads them.
void pad_scale_rows(float* out, const float* in, int64_t rows, int64_t cols, cudaStream_t s);

}  // namespace dsv3::cuda
