// Grouped block-scaled FP8 GEMM on mma.sync (see fp8.h). The tile geometry is the bf16 grouped kernel's
// (grouped_gemm.cu) in bytes: one block computes a 128 x 128 tile of one problem with 8 warps in a 2 x 4 grid
// (64 x 32 outputs each, 4 x 4 m16n8 fragments); a shared-memory stage holds 64 bytes of every row, which is
// 64 e4m3 values of K (two m16n8k32 steps), filled by cp.async two stages deep; rows are swizzled in 16-byte
// chunks (chunk c of row r at c ^ ((r / 2) % 4)) so the 8 rows of an ldmatrix hit distinct bank groups.
// Block scaling: two stages make one 128-wide K block. Its products accumulate in `part` from zero; at the end of
// the block part is multiplied by the row's activation scale and the tile's weight scale and added to `acc`
// (fp32): this is the promotion every 128 elements of K of the DeepSeek-V3 recipe, done in registers. A tile's
// 128 columns lie in one 128-row block of B (tiles start at multiples of 128), so B has one scale per K block;
// with b_rows (Wgrad: B = x^T in 128x1 tiles) each output column has its own, read at each promotion.
#include <algorithm>

#include "ops/cuda/common.cuh"
#include "ops/cuda/fp8.h"

namespace dsv3::cuda {

namespace {

// MI: m16 fragments per warp in M (4: 128-row tiles, warp tiles 64 x 32; 2: 64-row tiles, 32 x 32, half the
// registers and twice the blocks per SM, for the few rows an expert gets).
constexpr int BN = 128, BKB = 64, THREADS = 256;  // BKB: bytes (= e4m3 values) of K per stage
constexpr int kRowUnits = BKB / 2;                           // a row of a stage in 2-byte units (ldmatrix's b16)

__device__ __forceinline__ int swz(int r, int chunk) { return r * kRowUnits + ((chunk ^ ((r >> 1) & 3)) << 3); }

template <int MI, bool BROWS>
__global__ void __launch_bounds__(THREADS, MI == 2 ? 2 : 1) fp8_grouped_kernel(const Fp8Problem* __restrict__ probs,
                                                                               int nprob) {
  constexpr int BM = MI * 32;
  __shared__ alignas(128) uint16_t sA[2][BM * kRowUnits];
  __shared__ alignas(128) uint16_t sB[2][BN * kRowUnits];
  const int tile = blockIdx.x;
  int g = 0;
  while (g + 1 < nprob && probs[g + 1].tile0 <= tile) ++g;
  const Fp8Problem p = probs[g];
  const int tiles_n = (p.N + BN - 1) / BN, t = tile - p.tile0;
  const int m0 = (t / tiles_n) * BM, n0 = (t % tiles_n) * BN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = (warp >> 2) * (MI * 16), wn = (warp & 3) * 32;

  // Stage loader: BM * 4 16-byte chunks of A and 512 of B (MI / 2 and two per thread).
  auto load = [&](int stage, int k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * THREADS, r = c >> 2, ch = c & 3, k = k0 + ch * 16;
      const bool kin = k < p.K;
      if (i < MI / 2) {
        const bool a_ok = kin && m0 + r < p.M;
        cp_async16(&sA[stage][swz(r, ch)], a_ok ? p.A + size_t(m0 + r) * p.lda + k : p.A, a_ok);
      }
      const bool b_ok = kin && n0 + r < p.N;
      cp_async16(&sB[stage][swz(r, ch)], b_ok ? p.B + size_t(n0 + r) * p.ldb + k : p.B, b_ok);
    }
  };

  float acc[MI][4][4], part[MI][4][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f, part[i][j][v] = 0.f;

  // The 8 rows whose activation scales this thread applies (clamped: rows past M are computed, never stored).
  int srow[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) srow[mi][h] = min(m0 + wm + mi * 16 + (lane >> 2) + h * 8, p.M - 1);
  const float* sb_row = p.sb + size_t(n0 / 128) * p.lds_b;
  // b_rows: this thread's 8 output columns are c0 + 8 ni + v; columns past N are never stored (scale 0 there).
  const int c0 = n0 + wn + 2 * (lane & 3);
  const float* sb_c0 = p.sb + size_t(c0) * p.lds_b;

  const int ktiles = (p.K + BKB - 1) / BKB;
  load(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < ktiles; ++kt) {
    const int st = kt & 1;
    if (kt + 1 < ktiles) load(st ^ 1, (kt + 1) * BKB);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < 4; kk += 2) {  // two k32 steps per stage: chunk pairs (0, 1) and (2, 3)
      uint32_t a[MI][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int r = wm + mi * 16 + (lane & 15);
        ldmatrix_x4(a[mi], &sA[st][swz(r, kk + (lane >> 4))]);
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        const int r = wn + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t q[4];
        ldmatrix_x4(q, &sB[st][swz(r, kk + ((lane >> 3) & 1))]);
        b[2 * nj][0] = q[0], b[2 * nj][1] = q[1], b[2 * nj + 1][0] = q[2], b[2 * nj + 1][1] = q[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_fp8(part[mi][ni], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[ni][0], b[ni][1]);
    }
    __syncthreads();  // the stage is refilled by the next iteration's load
    if ((kt & 1) || kt + 1 == ktiles) {  // end of a 128-wide K block: promote to fp32 with both scales
      const int kb = kt >> 1;
      float sbv[4][2];
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int v = 0; v < 2; ++v)
          sbv[ni][v] = !BROWS ? sb_row[kb] : c0 + ni * 8 + v < p.N ? sb_c0[(ni * 8 + v) * p.lds_b + kb] : 0.f;
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float f = p.sa[size_t(srow[mi][h]) * p.lds_a + kb];
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int v = 0; v < 2; ++v) {
              acc[mi][ni][2 * h + v] += part[mi][ni][2 * h + v] * (f * sbv[ni][v]);
              part[mi][ni][2 * h + v] = 0.f;
            }
        }
    }
  }

  // Epilogue: c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1] of each fragment.
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
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
          const float x = acc[mi][ni][2 * h + v];
          if (p.c_f32) {
            float* c = static_cast<float*>(p.C) + size_t(row) * p.ldc + col;
            *c = p.accumulate ? *c + x : x;
          } else {
            bf16* c = static_cast<bf16*>(p.C) + size_t(row) * p.ldc + col;
            *c = __float2bfloat16(p.accumulate ? __bfloat162float(*c) + x : x);
          }
        }
      }
}

}  // namespace

bool fp8_problem_ok(const Fp8Problem& p) {
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  return p.K > 0 && p.K % 16 == 0 && p.lda % 16 == 0 && p.ldb % 16 == 0 && p.lda >= p.K && p.ldb >= p.K &&
         p.ldc >= p.N && aligned(p.A) && aligned(p.B) && p.sa && p.sb && p.lds_a >= (p.K + 127) / 128 &&
         p.lds_b >= (p.K + 127) / 128;
}

void fp8_grouped_gemm(std::vector<Fp8Problem>& probs, Fp8Problem* dev_probs, cudaStream_t s, int tile_m) {
  probs.erase(std::remove_if(probs.begin(), probs.end(), [](const Fp8Problem& p) { return p.M <= 0 || p.N <= 0; }),
              probs.end());
  if (probs.empty()) return;
  if (tile_m == 0) {  // 64-row tiles unless the problems average 256 rows or more
    int64_t rows = 0;
    for (auto& p : probs) rows += p.M;
    tile_m = rows >= 256 * int64_t(probs.size()) ? 128 : 64;
  }
  DSV3_CHECK(tile_m == 64 || tile_m == 128, "fp8_grouped_gemm: tile_m {} (64 or 128)", tile_m);
  const int BM = tile_m;
  const bool b_rows = probs[0].b_rows != 0;
  int tiles = 0;
  for (auto& p : probs) {
    DSV3_CHECK((p.b_rows != 0) == b_rows, "fp8_grouped_gemm: problems with row and block scales of B in one launch");
    DSV3_CHECK(fp8_problem_ok(p), "fp8_grouped_gemm: unsupported problem M {} N {} K {} lda {} ldb {}", p.M, p.N, p.K,
               p.lda, p.ldb);
    p.tile0 = tiles;
    tiles += ((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN);
  }
  DSV3_CUDA_CHECK(
      cudaMemcpyAsync(dev_probs, probs.data(), probs.size() * sizeof(Fp8Problem), cudaMemcpyHostToDevice, s));
  auto* kernel = BM == 128 ? (b_rows ? fp8_grouped_kernel<4, true> : fp8_grouped_kernel<4, false>)
                           : (b_rows ? fp8_grouped_kernel<2, true> : fp8_grouped_kernel<2, false>);
  kernel<<<tiles, THREADS, 0, s>>>(dev_probs, int(probs.size()));
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
