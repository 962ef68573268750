// Grouped NT GEMM on mma.sync (see grouped_gemm.h). One block computes a 128x128 tile of one problem: 8 warps in
// a 2 x 4 grid, each 64 x 32 outputs (4 x 4 m16n8 fragments, 64 fp32 accumulators per thread). K advances in
// steps of 32 through two shared-memory stages filled by cp.async (16-byte chunks, zero-filled past M, N or K),
// so the next stage loads while the tensor cores work on the current one. Shared rows are 64 bytes (4 chunks);
// chunk c of row r sits at position c ^ ((r / 2) % 4), which makes the 8 rows an ldmatrix reads hit 8 distinct
// 16-byte bank groups. Tiles of all problems form one grid; a block finds its problem by the prefix sums.
#include <algorithm>

#include "ops/cuda/common.cuh"
#include "ops/cuda/grouped_gemm.h"

namespace dsv3::cuda {

namespace {

constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256;

__device__ __forceinline__ int swz(int r, int chunk) { return r * BK + ((chunk ^ ((r >> 1) & 3)) << 3); }

__global__ void __launch_bounds__(THREADS) grouped_gemm_kernel(const GroupedProblem* __restrict__ probs, int nprob) {
  __shared__ alignas(128) bf16 sA[2][BM * BK];
  __shared__ alignas(128) bf16 sB[2][BN * BK];
  const int tile = blockIdx.x;
  int g = 0;
  while (g + 1 < nprob && probs[g + 1].tile0 <= tile) ++g;
  const GroupedProblem p = probs[g];
  const int tiles_n = (p.N + BN - 1) / BN, t = tile - p.tile0;
  const int m0 = (t / tiles_n) * BM, n0 = (t % tiles_n) * BN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;

  // Stage loader: 512 chunks of A and 512 of B, two of each per thread.
  auto load = [&](int stage, int k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * THREADS, r = c >> 2, ch = c & 3, k = k0 + ch * 8;
      const bool kin = k < p.K;
      const bool a_ok = kin && m0 + r < p.M, b_ok = kin && n0 + r < p.N;
      cp_async16(&sA[stage][swz(r, ch)], a_ok ? p.A + size_t(m0 + r) * p.lda + k : p.A, a_ok);
      cp_async16(&sB[stage][swz(r, ch)], b_ok ? p.B + size_t(n0 + r) * p.ldb + k : p.B, b_ok);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

  const int ktiles = (p.K + BK - 1) / BK;
  load(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < ktiles; ++kt) {
    const int st = kt & 1;
    if (kt + 1 < ktiles) load(st ^ 1, (kt + 1) * BK);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK / 8; kk += 2) {  // two k16 steps per stage: chunk pairs (0, 1) and (2, 3)
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // lanes 0-15: rows 0-15 at chunk kk; lanes 16-31: the same rows at chunk kk + 1 -> a0..a3.
        const int r = wm + mi * 16 + (lane & 15);
        ldmatrix_x4(a[mi], &sA[st][swz(r, kk + (lane >> 4))]);
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        // lanes 0-7: n 0-7 at chunk kk (b0 of tile 2nj), 8-15: n 0-7 at kk + 1 (b1), 16-31: n 8-15 (tile 2nj+1).
        const int r = wn + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t q[4];
        ldmatrix_x4(q, &sB[st][swz(r, kk + ((lane >> 3) & 1))]);
        b[2 * nj][0] = q[0], b[2 * nj][1] = q[1], b[2 * nj + 1][0] = q[2], b[2 * nj + 1][1] = q[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_bf16(acc[mi][ni], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[ni][0], b[ni][1]);
    }
    __syncthreads();  // the stage is refilled by the next iteration's load
  }

  // Epilogue: c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1] of each fragment (g = lane / 4, t = lane % 4).
  const bool acc_c = p.beta != 0.f;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm + mi * 16 + (lane >> 2) + h * 8;
        if (row >= p.M) continue;
#pragma unroll
        for (int v = 0; v < 2; ++v) {
          const int col = n0 + wn + ni * 8 + 2 * (lane & 3) + v;
          if (col >= p.N) continue;
          float* c = p.C + size_t(row) * p.ldc + col;
          const float x = acc[mi][ni][2 * h + v];
          *c = acc_c ? x + p.beta * *c : x;
        }
      }
}

__global__ void convert_kernel(bf16* out, const float* in, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

// 32 x 32 tiles through shared memory: reads of `in` rows and writes of `out` rows are both coalesced.
__global__ void transpose_kernel(bf16* out, const float* in, int64_t ld_in, const int32_t* src_row, int64_t n_out,
                                 int64_t cols, int64_t in_stride, int64_t out_stride) {
  __shared__ float tileb[32][33];
  in += blockIdx.z * in_stride;
  out += blockIdx.z * out_stride;
  const int64_t j0 = int64_t(blockIdx.x) * 32, c0 = int64_t(blockIdx.y) * 32;
  for (int y = threadIdx.y; y < 32; y += blockDim.y) {  // tile row y: output column j0 + y, input row src
    const int64_t j = j0 + y, c = c0 + threadIdx.x;
    float v = 0.f;
    if (j < n_out && c < cols) {
      const int64_t src = src_row ? src_row[j] : j;
      if (src >= 0) v = in[src * ld_in + c];
    }
    tileb[y][threadIdx.x] = v;
  }
  __syncthreads();
  for (int y = threadIdx.y; y < 32; y += blockDim.y) {  // output row c0 + y, columns j0 + x
    const int64_t c = c0 + y, j = j0 + threadIdx.x;
    if (c < cols && j < n_out) out[c * n_out + j] = __float2bfloat16_rn(tileb[threadIdx.x][y]);
  }
}

}  // namespace

bool grouped_gemm_ok(const GroupedProblem& p) {
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  return p.K > 0 && p.K % 8 == 0 && p.lda % 8 == 0 && p.ldb % 8 == 0 && p.lda >= p.K && p.ldb >= p.K &&
         p.ldc >= p.N && aligned(p.A) && aligned(p.B);
}

void grouped_gemm(std::vector<GroupedProblem>& probs, GroupedProblem* dev_probs, cudaStream_t s) {
  probs.erase(std::remove_if(probs.begin(), probs.end(), [](const GroupedProblem& p) { return p.M <= 0 || p.N <= 0; }),
              probs.end());
  if (probs.empty()) return;
  int tiles = 0;
  for (auto& p : probs) {
    DSV3_CHECK(grouped_gemm_ok(p), "grouped_gemm: unsupported problem M {} N {} K {} lda {} ldb {}", p.M, p.N, p.K,
               p.lda, p.ldb);
    p.tile0 = tiles;
    tiles += ((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN);
  }
  DSV3_CUDA_CHECK(cudaMemcpyAsync(dev_probs, probs.data(), probs.size() * sizeof(GroupedProblem),
                                  cudaMemcpyHostToDevice, s));
  grouped_gemm_kernel<<<tiles, THREADS, 0, s>>>(dev_probs, int(probs.size()));
  DSV3_CUDA_KERNEL_CHECK();
}

void convert_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  const int blocks = int(std::min<int64_t>((n + 255) / 256, 8192));
  convert_kernel<<<blocks, 256, 0, s>>>(out, in, n);
  DSV3_CUDA_KERNEL_CHECK();
}

void transpose_to_bf16(bf16* out, const float* in, int64_t ld_in, const int32_t* src_row, int64_t n_out, int64_t cols,
                       cudaStream_t s, int64_t batch, int64_t in_stride, int64_t out_stride) {
  if (n_out <= 0 || cols <= 0 || batch <= 0) return;
  dim3 grid(unsigned((n_out + 31) / 32), unsigned((cols + 31) / 32), unsigned(batch));
  transpose_kernel<<<grid, dim3(32, 8), 0, s>>>(out, in, ld_in, src_row, n_out, cols, in_stride, out_stride);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
