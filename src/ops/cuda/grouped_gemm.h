#pragma once
// A grouped GEMM on tensor cores for the routed experts of GPU training: one launch runs many independent
// products of different sizes (one or two per active expert), so the GPU is filled by all experts together
// instead of by each small product in turn. Training wants bf16 operands with fp32 results that accumulate into
// fp32 weight gradients, which cuBLAS' grouped call does not offer (one dtype for A, B and C; with fp32 operands
// it ran no faster than a loop of per-expert calls). Measured at train-s: 122,800 vs 100,900 tok/s for the whole
// step with cuBLAS. For inference prefill (bf16 in and out) cuBLAS' grouped call stays faster (266 vs ~200
// TFLOP/s on infer-m's experts), so this kernel is used for training only.
//
// Every problem is in the "NT" form (both operands K-contiguous, the layout mma.sync reads directly):
//   C[M, N] = A[M, K] B[N, K]^T  (+ beta C),  A, B bf16 row-major (lda, ldb), C fp32 row-major (ldc).
// Products of other layouts reach it through transposed bf16 copies (transpose_to_bf16). Requirements (checked
// by grouped_gemm_ok): K, lda and ldb multiples of 8 and A, B 16-byte aligned (rows are read in 16-byte chunks);
// M, N and K otherwise arbitrary (edge tiles are zero-filled).
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "ops/cuda/cuda_ops.h"

namespace dsv3::cuda {

struct GroupedProblem {
  const bf16* A;
  const bf16* B;
  float* C;
  int M, N, K, lda, ldb, ldc;
  float beta;  // 0: C = A B^T (C is not read); otherwise C = A B^T + beta C
  int tile0;   // first tile of this problem in the launch (filled by grouped_gemm)
};

bool grouped_gemm_ok(const GroupedProblem& p);
// Runs every problem of `probs` (host array, uploaded to dev_probs: device memory for probs.size() problems,
// reused in stream order). Problems with M or N of 0 are skipped; K must be > 0.
void grouped_gemm(std::vector<GroupedProblem>& probs, GroupedProblem* dev_probs, cudaStream_t s);

// out[i] = bf16(in[i]) for i < n.
void convert_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t s);
// Transposed bf16 copy with a column map: out[c, j] = src_row[j] >= 0 ? bf16(in[src_row[j], c]) : 0 for
// c < cols, j < n_out; in [*, cols] fp32 row-major (leading dimension ld_in), out [cols, n_out] row-major.
// src_row may be null (j itself). Used to make expert blocks of rows into K-contiguous operands, each expert's
// block padded with zero columns to a multiple of 8.
// batch > 1 repeats this for batch matrices (in + b * in_stride, out + b * out_stride; src_row shared).
void transpose_to_bf16(bf16* out, const float* in, int64_t ld_in, const int32_t* src_row, int64_t n_out, int64_t cols,
                       cudaStream_t s, int64_t batch = 1, int64_t in_stride = 0, int64_t out_stride = 0);

}  // namespace dsv3::cuda
