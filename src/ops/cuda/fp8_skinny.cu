// Skinny FP8 products for decode (see fp8.h): few rows of x against e4m3 weights read straight from memory, bound by
// the weight bytes (half of bf16's). The scheme of the bf16 skinny kernel (gemm.cu): W rows on the mma M dimension
// (16 per block), rows of x on N (8 per mma), and each thread loads 16 contiguous bytes of a W row and of an x row.
// A dot product does not care about the order of k, so thread t's 16 bytes (physical k = 16t .. 16t + 15 of a
// 64-wide step) are fed as the logical k of two m16n8k32 mmas that thread t owns in both operands: mma #0 takes
// bytes 0-3 (k 4t..4t+3) and 4-7 (k 16+4t..), mma #1 bytes 8-15. A step of 64 k lies in one 128-wide scale block,
// so its two mmas accumulate from zero and are promoted to fp32 with the weight block's and the x rows' scales
// right away. The 8 warps of a block split the steps of K and reduce through shared memory.
// In-block quantization (xa set): the block first quantizes the rows it needs (up to `chunk` at a time) into
// shared memory, one warp per 128-wide tile as quantize_1x128 does, so no separate launch and no round trip of
// codes through global memory; rows are stored K + 16 bytes apart so the 8 rows one 16-byte read touches fall in
// distinct bank groups.
#include <cuda_fp8.h>

#include "ops/cuda/common.cuh"
#include "ops/cuda/fp8.h"

namespace dsv3::cuda {

namespace {

constexpr int kWarps = 8, kUnroll = 4;
constexpr int kSmemBudget = 200 * 1024;  // dynamic shared memory for in-block quantization (Hopper: 227 KB)

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

template <typename T>
__device__ __forceinline__ void quantize_tile(uint8_t* codes, float* scale, const T* row, int k0, int K, int lane) {
  float v[4], amax = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int k = k0 + lane * 4 + j;
    v[j] = k < K ? to_f<T>(row[k]) : 0.f;
    amax = fmaxf(amax, fabsf(v[j]));
  }
  amax = warp_max(amax);
  const float s = amax > 0.f ? fmaxf(__fdiv_rn(amax, 448.f), 1.17549435e-38f) : 1.f;  // core/fp8.h scale_from_amax
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int k = k0 + lane * 4 + j;
    if (k < K) codes[k] = uint8_t(__nv_cvt_float_to_fp8(__fdiv_rn(v[j], s), __NV_SATFINITE, __NV_E4M3));
  }
  if (lane == 0) *scale = s;
}

template <bool MOE, bool DUAL, bool QX, typename TX, typename TOut>
__global__ void __launch_bounds__(kWarps * 32) fp8_skinny_kernel(Fp8SkinnyArgs a, int chunk) {
  pdl_start();
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const uint8_t* W = a.w;
  const uint8_t* W2 = a.w2;
  const float* SW = a.sw;
  const float* SW2 = a.sw2;
  int M = a.M, base = 0;
  if constexpr (MOE) {
    if (int(blockIdx.y) >= *a.n_active) return;
    const int e = a.active[blockIdx.y];
    M = a.counts[e];
    base = a.offsets[e];
    W += e * a.stride_w;
    SW += e * a.stride_sw;
    if constexpr (DUAL) W2 += e * a.stride_w, SW2 += e * a.stride_sw;
  }
  const int N = a.N, K = a.K, kt = (K + 127) / 128, ldq = K + 16;
  const int64_t ra = min(n0 + g, N - 1), rb = min(n0 + g + 8, N - 1);  // rows past N: loaded, never stored
  const uint8_t* wa = W + ra * K;
  const uint8_t* wb = W + rb * K;
  const uint8_t* w2a = DUAL ? W2 + ra * K : nullptr;
  const uint8_t* w2b = DUAL ? W2 + rb * K : nullptr;
  const float* sw_row = SW + int64_t(n0 / 128) * kt;  // the 16 rows lie in one 128-row scale block
  const float* sw2_row = DUAL ? SW2 + int64_t(n0 / 128) * kt : nullptr;
  const int nsteps = (K + 63) / 64;
  constexpr int NM = DUAL ? 2 : 1;
  __shared__ float red[kWarps][NM][4][32];
  uint8_t* qx = smem;                                            // [chunk, ldq] codes
  float* qs = reinterpret_cast<float*>(smem + int64_t(chunk) * ldq);  // [chunk, kt] scales
  const uint4 z4 = make_uint4(0, 0, 0, 0);
  auto x_row = [&](int b) { return MOE ? (a.xrow ? a.xrow[base + b] : base + b) : b; };

  // The first round of weight loads is issued before the in-block quantization, so the two overlap (at decode
  // sizes a warp's whole share of K is one round).
  uint4 P0[kUnroll], P1[kUnroll], Q0[kUnroll], Q1[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int s = warp + u * kWarps, k = s * 64 + t * 16;
    const bool in = s < nsteps && k < K && M > 0;
    P0[u] = in ? ld_stream(wa + k) : z4;
    P1[u] = in ? ld_stream(wb + k) : z4;
    if constexpr (DUAL) {
      Q0[u] = in ? ld_stream(w2a + k) : z4;
      Q1[u] = in ? ld_stream(w2b + k) : z4;
    }
  }
  bool first = true;

  for (int c0 = 0; c0 < M; c0 += chunk) {
    const int c1 = min(M, c0 + chunk);
    if constexpr (QX) {
      const TX* xa = static_cast<const TX*>(a.xa);
      for (int task = warp; task < (c1 - c0) * kt; task += kWarps) {
        const int r = task / kt, tt = task % kt;
        quantize_tile(qx + int64_t(r) * ldq, qs + r * kt + tt, xa + int64_t(x_row(c0 + r)) * K, tt * 128, K, lane);
      }
      __syncthreads();
    }
    for (int m0 = c0; m0 < c1; m0 += 8) {
      // This thread's x row (B operand, n = g) and the two x rows of its outputs (columns 2t, 2t + 1).
      const int b = m0 + g;
      const bool bv = b < c1;
      const uint8_t* xp = QX ? qx + int64_t(bv ? b - c0 : 0) * ldq : a.x + int64_t(bv ? x_row(b) : 0) * K;
      const float* srow[2];
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        const int c = min(m0 + 2 * t + v, c1 - 1);
        srow[v] = QX ? qs + (c - c0) * kt : a.sx + int64_t(x_row(c)) * kt;
      }
      float acc[NM][4];
#pragma unroll
      for (int m = 0; m < NM; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][i] = 0.f;
      for (int s0 = warp; s0 < nsteps; s0 += kWarps * kUnroll) {
        uint4 A0[kUnroll], A1[kUnroll], C0[kUnroll], C1[kUnroll], XV[kUnroll];
        const bool pre = first && s0 == warp;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int s = s0 + u * kWarps, k = s * 64 + t * 16;
          const bool in = s < nsteps && k < K;
          if (pre) {
            A0[u] = P0[u], A1[u] = P1[u];
            if constexpr (DUAL) C0[u] = Q0[u], C1[u] = Q1[u];
          } else {
            A0[u] = in ? ld_stream(wa + k) : z4;
            A1[u] = in ? ld_stream(wb + k) : z4;
            if constexpr (DUAL) {
              C0[u] = in ? ld_stream(w2a + k) : z4;
              C1[u] = in ? ld_stream(w2b + k) : z4;
            }
          }
          XV[u] = in && bv ? *reinterpret_cast<const uint4*>(xp + k) : z4;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int s = s0 + u * kWarps;
          if (s >= nsteps) break;
          const int kb = s >> 1;
          const float x0 = srow[0][kb], x1 = srow[1][kb];
          float part[4] = {0.f, 0.f, 0.f, 0.f};
          mma_fp8(part, A0[u].x, A1[u].x, A0[u].y, A1[u].y, XV[u].x, XV[u].y);
          mma_fp8(part, A0[u].z, A1[u].z, A0[u].w, A1[u].w, XV[u].z, XV[u].w);
          const float swv = sw_row[kb];
          acc[0][0] += part[0] * swv * x0, acc[0][1] += part[1] * swv * x1;
          acc[0][2] += part[2] * swv * x0, acc[0][3] += part[3] * swv * x1;
          if constexpr (DUAL) {
            float p2[4] = {0.f, 0.f, 0.f, 0.f};
            mma_fp8(p2, C0[u].x, C1[u].x, C0[u].y, C1[u].y, XV[u].x, XV[u].y);
            mma_fp8(p2, C0[u].z, C1[u].z, C0[u].w, C1[u].w, XV[u].z, XV[u].w);
            const float s2 = sw2_row[kb];
            acc[1][0] += p2[0] * s2 * x0, acc[1][1] += p2[1] * s2 * x1;
            acc[1][2] += p2[2] * s2 * x0, acc[1][3] += p2[3] * s2 * x1;
          }
        }
      }
      first = false;
      // Reduce the warps' partial sums; warp 0 writes (c0, c1 = W row g, x rows 2t, 2t+1; c2, c3 = W row g + 8).
#pragma unroll
      for (int m = 0; m < NM; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][m][i][lane] = acc[m][i];
      __syncthreads();
      if (warp == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float v[NM];
#pragma unroll
          for (int m = 0; m < NM; ++m) {
            v[m] = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) v[m] += red[w][m][i][lane];
          }
          float r = v[0];
          if constexpr (DUAL) r = silu(v[0]) * v[1];
          const int n = n0 + g + (i >> 1) * 8, xrow = m0 + 2 * t + (i & 1);
          if (n < N && xrow < c1) {
            TOut* y = static_cast<TOut*>(a.y) + int64_t(base + xrow) * a.ldy + n;
            *y = from_f<TOut>(a.accumulate ? to_f<TOut>(*y) + r : r);
          }
        }
      }
      __syncthreads();
    }
  }
}

int chunk_rows(int K) {
  const int per_row = (K + 16) + ((K + 127) / 128) * 4;
  return std::min(32, kSmemBudget / per_row / 8 * 8);
}

template <bool MOE, bool DUAL, bool QX, typename TX, typename TOut>
void launch_one(const Fp8SkinnyArgs& a, cudaStream_t s) {
  auto kernel = fp8_skinny_kernel<MOE, DUAL, QX, TX, TOut>;
  int chunk = 32;
  size_t smem = 0;
  if constexpr (QX) {
    static const bool raised = [&] {
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBudget));
      return true;
    }();
    (void)raised;
    chunk = chunk_rows(a.K);
    smem = size_t(chunk) * size_t(a.K + 16) + size_t(chunk) * size_t((a.K + 127) / 128) * 4;
  }
  dim3 grid(unsigned((a.N + 15) / 16), unsigned(MOE ? a.batch : 1));
  launch(kernel, grid, dim3(kWarps * 32), smem, s, a, chunk);
}

template <bool MOE, bool DUAL, bool QX, typename TX>
void launch_out(const Fp8SkinnyArgs& a, cudaStream_t s) {
  if (a.out_t == DType::F32) launch_one<MOE, DUAL, QX, TX, float>(a, s);
  else if (a.out_t == DType::BF16) launch_one<MOE, DUAL, QX, TX, bf16>(a, s);
  else fail("fp8_skinny_gemm: unsupported output dtype {}", dtype_name(a.out_t));
}

template <bool MOE, bool DUAL>
void launch_x(const Fp8SkinnyArgs& a, cudaStream_t s) {
  if (!a.xa) launch_out<MOE, DUAL, false, bf16>(a, s);
  else if (a.xa_t == DType::BF16) launch_out<MOE, DUAL, true, bf16>(a, s);
  else if (a.xa_t == DType::F32) launch_out<MOE, DUAL, true, float>(a, s);
  else fail("fp8_skinny_gemm: unsupported activation dtype {}", dtype_name(a.xa_t));
}

}  // namespace

bool fp8_skinny_ok(const Fp8SkinnyArgs& a) {
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  return a.K > 0 && a.K % 16 == 0 && aligned(a.w) && (a.stride_w % 16) == 0 && (!a.w2 || aligned(a.w2)) &&
         (a.xa ? chunk_rows(a.K) >= 8 : aligned(a.x));
}

void fp8_skinny_gemm(const Fp8SkinnyArgs& a, cudaStream_t s) {
  if (a.N <= 0 || (a.M <= 0 && !a.active)) return;
  DSV3_CHECK(fp8_skinny_ok(a), "fp8_skinny_gemm: unsupported shape N {} K {} (K must be a multiple of 16)", a.N, a.K);
  const bool moe = a.active != nullptr, dual = a.w2 != nullptr;
  if (moe && dual) launch_x<true, true>(a, s);
  else if (moe) launch_x<true, false>(a, s);
  else if (dual) launch_x<false, true>(a, s);
  else launch_x<false, false>(a, s);
}

}  // namespace dsv3::cuda
