// Skinny matrix products for decode: y = x W^T with few rows of x (M <= 16 per pass) and a large bf16 W, bound by
// the bytes of W. cuBLAS handles every other shape (backend_cuda.cpp).
//
// The skinny kernel puts W rows on the mma M dimension (16 rows per block) and the rows of x on N (8 per mma), so
// a weight tile is read from memory exactly once whatever the batch. Because a dot product does not care about
// the order of k, each thread loads 16 contiguous bytes of a W row and of an x row and feeds them to two mmas:
// mma #0 takes physical k = 8t + {0,1,2,3} as logical slots {2t, 2t+1, 2t+8, 2t+9} (of both A and B), mma #1 takes
// 8t + {4..7}. This gives coalesced 16-byte loads straight from global memory, no shared-memory staging.
// A block of 8 warps splits K (warp w takes 32-wide k steps w, w+8, ...) and reduces through shared memory.
#include "ops/cuda/common.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kWarps = 8;  // warps per block, each a slice of K

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// U: k steps in flight per warp (U x 16 B per W row and thread). Decode matrices have K of 1408-2048, i.e. 44-64
// steps over 8 warps: U = 8 issues a warp's whole share at once (one memory round trip); the dual form holds two
// matrices' fragments and uses U = 4 to stay within registers.
template <int NG, bool DUAL, bool MOE, typename TOut, int kUnroll>
__global__ void __launch_bounds__(kWarps * 32) skinny_kernel(SkinnyArgs a) {
  pdl_start();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const bf16* W = a.w;
  const bf16* W2 = a.w2;
  const bf16* X = a.x;
  int M = a.M, base = 0;
  int64_t yoff = 0;
  if constexpr (MOE) {
    if (int(blockIdx.y) >= *a.n_active) return;
    const int e = a.active[blockIdx.y];
    M = a.counts[e];
    base = a.offsets[e];
    W += e * a.stride_w;
    if constexpr (DUAL) W2 += e * a.stride_w;
  } else {
    W += blockIdx.y * a.stride_w;
    if constexpr (DUAL) W2 += blockIdx.y * a.stride_w;
    X += blockIdx.y * a.stride_x;
    yoff = blockIdx.y * a.stride_y;
  }
  const int N = a.N, K = a.K;
  // Rows past N are clamped to a valid row (loaded, never stored).
  const int64_t ra = min(n0 + g, N - 1), rb = min(n0 + g + 8, N - 1);
  const bf16* wa = W + ra * a.ldw;
  const bf16* wb = W + rb * a.ldw;
  const bf16* w2a = DUAL ? W2 + ra * a.ldw : nullptr;
  const bf16* w2b = DUAL ? W2 + rb * a.ldw : nullptr;
  const int nsteps = (K + 31) / 32;
  constexpr int NM = DUAL ? 2 : 1;
  __shared__ float red[kWarps][NM][NG][4][32];
  const uint4 z4 = make_uint4(0, 0, 0, 0);

  for (int m0 = 0; m0 < M; m0 += 8 * NG) {
    const bf16* xr[NG];
    bool xv[NG];
#pragma unroll
    for (int q = 0; q < NG; ++q) {
      const int b = m0 + q * 8 + g;
      xv[q] = b < M;
      int row = b;
      if constexpr (MOE) row = xv[q] ? (a.xrow ? a.xrow[base + b] : base + b) : 0;
      xr[q] = X + int64_t(xv[q] ? row : 0) * a.ldx;
    }
    float acc[NM][NG][4];
#pragma unroll
    for (int m = 0; m < NM; ++m)
#pragma unroll
      for (int q = 0; q < NG; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][q][i] = 0.f;

    for (int s0 = warp; s0 < nsteps; s0 += kWarps * kUnroll) {
      uint4 A0[kUnroll], A1[kUnroll], C0[kUnroll], C1[kUnroll], XV[kUnroll][NG];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = (s0 + u * kWarps) * 32 + 8 * t;
        const bool ok = s0 + u * kWarps < nsteps && k < K;
        A0[u] = ok ? ld_stream(wa + k) : z4;
        A1[u] = ok ? ld_stream(wb + k) : z4;
        if constexpr (DUAL) {
          C0[u] = ok ? ld_stream(w2a + k) : z4;
          C1[u] = ok ? ld_stream(w2b + k) : z4;
        }
#pragma unroll
        for (int q = 0; q < NG; ++q) XV[u][q] = ok && xv[q] ? __ldg(reinterpret_cast<const uint4*>(xr[q] + k)) : z4;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int q = 0; q < NG; ++q) {
          mma_bf16(acc[0][q], A0[u].x, A1[u].x, A0[u].y, A1[u].y, XV[u][q].x, XV[u][q].y);
          mma_bf16(acc[0][q], A0[u].z, A1[u].z, A0[u].w, A1[u].w, XV[u][q].z, XV[u][q].w);
          if constexpr (DUAL) {
            mma_bf16(acc[NM - 1][q], C0[u].x, C1[u].x, C0[u].y, C1[u].y, XV[u][q].x, XV[u][q].y);
            mma_bf16(acc[NM - 1][q], C0[u].z, C1[u].z, C0[u].w, C1[u].w, XV[u][q].z, XV[u][q].w);
          }
        }
    }
#pragma unroll
    for (int m = 0; m < NM; ++m)
#pragma unroll
      for (int q = 0; q < NG; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][m][q][i][lane] = acc[m][q][i];
    __syncthreads();
    for (int idx = threadIdx.x; idx < NG * 128; idx += kWarps * 32) {
      const int q = idx >> 7, i = (idx >> 5) & 3, l = idx & 31;
      float s = 0.f, s2 = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        s += red[w][0][q][i][l];
        if constexpr (DUAL) s2 += red[w][NM - 1][q][i][l];
      }
      // C fragment: i = 0, 1 -> row g, columns 2t, 2t+1; i = 2, 3 -> row g + 8.
      const int n = n0 + (l >> 2) + (i >= 2 ? 8 : 0);
      const int b = m0 + q * 8 + 2 * (l & 3) + (i & 1);
      if (n < N && b < M) {
        const float v = DUAL ? silu(s) * s2 : s;
        const int64_t yr = MOE ? base + b : b;
        static_cast<TOut*>(a.y)[yoff + yr * a.ldy + n] = from_f<TOut>(v);
      }
    }
    __syncthreads();  // red[] is reused by the next pass
  }
}

template <int NG, bool DUAL, bool MOE>
void launch_skinny(const SkinnyArgs& a, dim3 grid, cudaStream_t s) {
  constexpr int U = DUAL ? 4 : 8;
  if (a.out_t == DType::F32) launch(skinny_kernel<NG, DUAL, MOE, float, U>, dim3(grid), dim3(kWarps * 32), 0, s, a);
  else launch(skinny_kernel<NG, DUAL, MOE, bf16, U>, dim3(grid), dim3(kWarps * 32), 0, s, a);
}

// q_lat[b, h, j] = sum_i q[b, h, i] W_UK[h][i, j]: W_UK[h] is [dn, r] row-major, so a block takes 64 columns of
// one head (2 per thread, 4-byte loads coalesced along j) and 8 slices of i, reduced in shared memory.
constexpr int kAbsorbMaxB = 8, kAbsorbMaxDn = 256;
// With q_pe, the blocks of column chunk 0 also write the rotated rope part of their head (rope in place on q
// and the q_pe copy were two more kernels per layer).
__global__ void __launch_bounds__(256) absorb_q_kernel(bf16* q_lat, const bf16* q, const bf16* kv_b, int B, int nh, int dn,
                                                       int dr, int dv, int r, bf16* q_pe, RopeArgs rp) {
  pdl_start();
  __shared__ float qs[kAbsorbMaxB][kAbsorbMaxDn];
  __shared__ float red[8][kAbsorbMaxB][64];
  const int h = blockIdx.x, cp = threadIdx.x & 31, sl = threadIdx.x >> 5;
  if (q_pe && blockIdx.y == 0) {
    const int half = dr / 2;
    for (int i = threadIdx.x; i < B * half; i += blockDim.x) {
      const int b = i / half, j = i % half;
      const bf16* v = q + int64_t(b) * nh * (dn + dr) + int64_t(h) * (dn + dr) + dn;
      bf16* o = q_pe + (int64_t(b) * nh + h) * dr;
      const int i0 = rp.interleave ? 2 * j : j, i1 = rp.interleave ? 2 * j + 1 : j + half, p = rp.pos[b];
      const float c = rp.cos[int64_t(p) * half + j], sn = rp.sin[int64_t(p) * half + j];
      const float a = __bfloat162float(v[i0]), bb = __bfloat162float(v[i1]);
      o[i0] = __float2bfloat16(a * c - bb * sn);
      o[i1] = __float2bfloat16(bb * c + a * sn);
    }
  }
  for (int i = threadIdx.x; i < B * dn; i += blockDim.x) {
    const int b = i / dn, d = i % dn;
    qs[b][d] = __bfloat162float(q[int64_t(b) * nh * (dn + dr) + int64_t(h) * (dn + dr) + d]);
  }
  __syncthreads();
  const int j = blockIdx.y * 64 + cp * 2;
  const bf16* W = kv_b + int64_t(h) * (dn + dv) * r;
  float acc[kAbsorbMaxB][2];
#pragma unroll
  for (int b = 0; b < kAbsorbMaxB; ++b) acc[b][0] = acc[b][1] = 0.f;
  const int per = (dn + 7) / 8, i0 = sl * per, i1 = min(dn, i0 + per);
  if (j < r) {
#pragma unroll 4
    for (int i = i0; i < i1; ++i) {
      const float2 w = unpack_bf16(__ldg(reinterpret_cast<const uint32_t*>(W + int64_t(i) * r + j)));
#pragma unroll
      for (int b = 0; b < kAbsorbMaxB; ++b)
        if (b < B) {
          acc[b][0] += qs[b][i] * w.x;
          acc[b][1] += qs[b][i] * w.y;
        }
    }
  }
#pragma unroll
  for (int b = 0; b < kAbsorbMaxB; ++b) {
    red[sl][b][cp * 2] = acc[b][0];
    red[sl][b][cp * 2 + 1] = acc[b][1];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < B * 64; idx += blockDim.x) {
    const int b = idx / 64, c = idx % 64, col = blockIdx.y * 64 + c;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) s += red[w][b][c];
    if (col < r) q_lat[int64_t(b) * nh * r + int64_t(h) * r + col] = __float2bfloat16(s);
  }
}

}  // namespace

bool skinny_aligned(const SkinnyArgs& a) {
  auto al = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  return a.K % 8 == 0 && a.ldw % 8 == 0 && a.ldx % 8 == 0 && a.stride_w % 8 == 0 && a.stride_x % 8 == 0 && al(a.w) &&
         (!a.w2 || al(a.w2)) && al(a.x) && a.N > 0;
}

void skinny_gemm(const SkinnyArgs& a, int rows_hint, cudaStream_t s) {
  DSV3_CHECK(skinny_aligned(a), "skinny_gemm: unaligned operands (K {}, ldw {}, ldx {})", a.K, a.ldw, a.ldx);
  if (a.N == 0 || a.batch == 0) return;
  const dim3 grid((a.N + 15) / 16, a.batch);
  const bool moe = a.active != nullptr, dual = a.w2 != nullptr;
  // The dual (SwiGLU) form serves the routed experts (MoE) and the shared experts / dense MLP (plain).
  if (rows_hint <= 8) {
    if (dual && moe) launch_skinny<1, true, true>(a, grid, s);
    else if (dual) launch_skinny<1, true, false>(a, grid, s);
    else if (moe) launch_skinny<1, false, true>(a, grid, s);
    else launch_skinny<1, false, false>(a, grid, s);
  } else {
    if (dual && moe) launch_skinny<2, true, true>(a, grid, s);
    else if (dual) launch_skinny<2, true, false>(a, grid, s);
    else if (moe) launch_skinny<2, false, true>(a, grid, s);
    else launch_skinny<2, false, false>(a, grid, s);
  }
  DSV3_CUDA_KERNEL_CHECK();
}

void absorb_q_small(bf16* q_lat, const bf16* q, const bf16* kv_b, int B, int nh, int dn, int dr, int dv, int r,
                    bf16* q_pe, const RopeArgs& rope, cudaStream_t s) {
  DSV3_CHECK(B <= kAbsorbMaxB && dn <= kAbsorbMaxDn && r % 2 == 0, "absorb_q_small: B {} dn {} r {}", B, dn, r);
  DSV3_CHECK(!q_pe || (rope.pos && rope.cos && rope.sin), "absorb_q_small: q_pe needs positions and tables");
  if (B == 0) return;
  launch(absorb_q_kernel, dim3(dim3(nh, (r + 63) / 64)), dim3(256), 0, s, q_lat, q, kv_b, B, nh, dn, dr, dv, r, q_pe,
         rope);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
