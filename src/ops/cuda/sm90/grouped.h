#pragma once
// Grouped GEMMs for the routed experts on Hopper's wgmma + TMA, built from CUTLASS's sm90 ptr-array kernels
// (warp-specialized: one producer warp group feeding shared memory by TMA, two consumer warp groups on wgmma,
// a persistent tile scheduler that walks the tiles of all groups, so experts with few rows and experts with
// many share one launch without padding). CUTLASS is used rather than a hand-written wgmma kernel because it
// is NVIDIA's maintained implementation of exactly this pipeline (TMA descriptors rewritten per group in
// shared memory, the FP8 blockwise-scaled mainloop of DeepSeek-V3's recipe); the headers come from PyPI's
// `nvidia-cutlass`. Built only when CMake finds those headers (DSV3_HAVE_CUTLASS); otherwise available()
// is false and callers keep cuBLAS' grouped GEMM and the mma.sync kernels.
//
// Layout conventions (all row-major, leading dimensions in elements):
//   expert form  rows [off[e], off[e+1]) of A [P, K] belong to expert e; W [E, N, K]; D [P, N]:
//                D[off[e] + r, :] = A[off[e] + r, :] W[e]^T, for one or two weight sets in one launch (gate and
//                up read the same rows). off is a device array: nothing returns to the host, so the launch
//                can be captured in a CUDA graph.
//   list form    independent problems C[M, N] (+)= A[M, K] B[N, K]^T, bf16 operands, fp32 C (training).
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ops/cuda/grouped_gemm.h"

namespace dsv3::cuda::sm90 {

// The kernels were compiled in and the current device is sm_90.
bool available();

struct ExpertGemm {
  const void* A = nullptr;  // [P, K]: bf16, or e4m3 codes for the fp8 form
  int64_t lda = 0;
  const void* W[2] = {nullptr, nullptr};  // [E, N, K] per weight set: bf16, or e4m3 codes
  int64_t w_stride = 0;                    // elements between experts of W (N * K when packed)
  void* D[2] = {nullptr, nullptr};         // [P, N] bf16 per weight set
  int64_t ldd = 0;
  const int* offsets = nullptr;  // device [E + 1], offsets[0] = 0, non-decreasing
  int E = 0, N = 0, K = 0, sets = 1;
  // fp8 form only. sa: A's 1x128 scales in the grouped layout (regroup_act_scales); sw[s]: W_s's 128x128 block
  // scales transposed to [E][tiles(K)][tiles(N)] (transpose_block_scales).
  const float* sa = nullptr;
  const float* sw[2] = {nullptr, nullptr};
};

// Device bytes of the workspace an expert launch with E experts x sets (or a list of `groups` problems) needs.
size_t expert_workspace_bytes(int groups, bool fp8);
size_t list_workspace_bytes(int groups);

// bf16 expert form. K and lda multiples of 8, pointers 16-byte aligned (TMA). Checked: a clear error otherwise.
void expert_gemm_bf16(const ExpertGemm& g, void* ws, size_t ws_bytes, cudaStream_t s);
// e4m3 expert form with 1x128 activation and 128x128 weight scales, fp32 accumulation promoted every 128 of K,
// bf16 D. K and lda multiples of 16.
void expert_gemm_fp8(const ExpertGemm& g, void* ws, size_t ws_bytes, cudaStream_t s);

// List form (grouped_gemm.h's problems, beta 0 or 1): the products with beta 0 run in one launch, those with
// beta 1 in a second. Requirements beyond grouped_gemm_ok: ldc a multiple of 4 and C 16-byte aligned.
bool list_gemm_ok(const GroupedProblem& p);
void list_gemm(const std::vector<GroupedProblem>& probs, void* ws, size_t ws_bytes, cudaStream_t s);

// Scales of the fp8 form. The kernel reads each expert's activation scales packed as [tiles(K)][rows of the
// expert] (token-contiguous within the expert): out[off[e] * kt + t * n_e + (r - off[e])] = in[r * kt + t] for
// in = quantize_1x128's [P, kt] layout.
void regroup_act_scales(float* out, const float* in, const int* offsets, int E, int64_t P, int64_t kt, cudaStream_t s);
// [batch][nt][kt] -> [batch][kt][nt] (weight block scales, once per weight).
void transpose_block_scales(float* out, const float* in, int64_t batch, int64_t nt, int64_t kt, cudaStream_t s);

}  // namespace dsv3::cuda::sm90
