// Skinny FP8 products for decode (see fp8.h): few rows of quantized x against e4m3 weights read straight from
// memory, bound by the weight bytes (half of bf16's). The scheme of the bf16 skinny kernel (gemm.cu): W rows on the
// mma M dimension (16 per block), rows of x on N (8 per mma), and each thread loads 16 contiguous bytes of a W row
// and of an x row straight from global memory. A dot product does not care about the order of k, so thread t's
// 16 bytes (physical k = 16t .. 16t + 15 of a 64-wide step) are fed as the logical k of two m16n8k32 mmas that
// thread t owns in both operands: mma #0 takes bytes 0-3 (k 4t..4t+3) and 4-7 (k 16+4t..), mma #1 bytes 8-15.
// A step of 64 k lies in one 128-wide scale block, so its two mmas accumulate from zero and are promoted to fp32
// with the weight block's scale and the x rows' scales right away. The 8 warps of a block split the steps of K
// and reduce through shared memory.
#include "ops/cuda/common.cuh"
#include "ops/cuda/fp8.h"

namespace dsv3::cuda {

namespace {

constexpr int kWarps = 8, kUnroll = 4;

template <bool MOE, typename TOut>
__global__ void __launch_bounds__(kWarps * 32) fp8_skinny_kernel(Fp8SkinnyArgs a) {
  pdl_start();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const uint8_t* W = a.w;
  const float* SW = a.sw;
  int M = a.M, base = 0;
  if constexpr (MOE) {
    if (int(blockIdx.y) >= *a.n_active) return;
    const int e = a.active[blockIdx.y];
    M = a.counts[e];
    base = a.offsets[e];
    W += e * a.stride_w;
    SW += e * a.stride_sw;
  }
  const int N = a.N, K = a.K, kt = (K + 127) / 128;
  const int64_t ra = min(n0 + g, N - 1), rb = min(n0 + g + 8, N - 1);  // rows past N: loaded, never stored
  const uint8_t* wa = W + ra * K;
  const uint8_t* wb = W + rb * K;
  const float* sw_row = SW + int64_t(n0 / 128) * kt;  // the 16 rows lie in one 128-row scale block
  const int nsteps = (K + 63) / 64;
  __shared__ float red[kWarps][4][32];
  const uint4 z4 = make_uint4(0, 0, 0, 0);

  for (int m0 = 0; m0 < M; m0 += 8) {
    // This thread's x row (B operand, n = g) and the two x rows of its outputs (columns 2t, 2t + 1).
    const int b = m0 + g;
    const bool bv = b < M;
    int xr = 0;
    if (bv) xr = MOE ? (a.xrow ? a.xrow[base + b] : base + b) : b;
    const uint8_t* xp = a.x + int64_t(xr) * K;
    int sr[2];
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int c = min(m0 + 2 * t + v, M - 1);
      sr[v] = MOE ? (a.xrow ? a.xrow[base + c] : base + c) : c;
    }
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s0 = warp; s0 < nsteps; s0 += kWarps * kUnroll) {
      uint4 A0[kUnroll], A1[kUnroll], XV[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int s = s0 + u * kWarps, k = s * 64 + t * 16;
        const bool in = s < nsteps && k < K;
        A0[u] = in ? ld_stream(wa + k) : z4;
        A1[u] = in ? ld_stream(wb + k) : z4;
        XV[u] = in && bv ? *reinterpret_cast<const uint4*>(xp + k) : z4;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int s = s0 + u * kWarps;
        if (s >= nsteps) break;
        float part[4] = {0.f, 0.f, 0.f, 0.f};
        mma_fp8(part, A0[u].x, A1[u].x, A0[u].y, A1[u].y, XV[u].x, XV[u].y);
        mma_fp8(part, A0[u].z, A1[u].z, A0[u].w, A1[u].w, XV[u].z, XV[u].w);
        const int kb = s >> 1;
        const float swv = sw_row[kb];
        const float f0 = swv * a.sx[int64_t(sr[0]) * kt + kb], f1 = swv * a.sx[int64_t(sr[1]) * kt + kb];
        acc[0] += part[0] * f0, acc[1] += part[1] * f1, acc[2] += part[2] * f0, acc[3] += part[3] * f1;
      }
    }
    // Reduce the warps' partial sums; warp 0 writes (c0, c1 = W row g, x rows 2t, 2t+1; c2, c3 = W row g + 8).
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][i][lane] = acc[i];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += red[w][i][lane];
        const int n = n0 + g + (i >> 1) * 8, xrow = m0 + 2 * t + (i & 1);
        if (n < N && xrow < M) {
          TOut* y = static_cast<TOut*>(a.y) + int64_t(base + xrow) * a.ldy + n;
          *y = from_f<TOut>(a.accumulate ? to_f<TOut>(*y) + v : v);
        }
      }
    }
    __syncthreads();
  }
}

template <bool MOE>
void launch_skinny(const Fp8SkinnyArgs& a, cudaStream_t s) {
  dim3 grid(unsigned((a.N + 15) / 16), unsigned(MOE ? a.batch : 1));
  if (a.out_t == DType::F32) launch(fp8_skinny_kernel<MOE, float>, grid, dim3(kWarps * 32), 0, s, a);
  else if (a.out_t == DType::BF16) launch(fp8_skinny_kernel<MOE, bf16>, grid, dim3(kWarps * 32), 0, s, a);
  else fail("fp8_skinny_gemm: unsupported output dtype {}", dtype_name(a.out_t));
}

}  // namespace

bool fp8_skinny_ok(const Fp8SkinnyArgs& a) {
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  return a.K > 0 && a.K % 16 == 0 && aligned(a.w) && aligned(a.x) && (a.stride_w % 16) == 0;
}

void fp8_skinny_gemm(const Fp8SkinnyArgs& a, cudaStream_t s) {
  if (a.N <= 0 || (a.M <= 0 && !a.active)) return;
  DSV3_CHECK(fp8_skinny_ok(a), "fp8_skinny_gemm: unsupported shape N {} K {} (K must be a multiple of 16)", a.N, a.K);
  if (a.active) launch_skinny<true>(a, s);
  else launch_skinny<false>(a, s);
}

}  // namespace dsv3::cuda
