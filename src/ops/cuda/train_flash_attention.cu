// Fused causal MLA attention for training (flash-attention-2 style forward and backward on bf16 tensor cores,
// fp32 accumulation). Same semantics as the materialized path (train_attention.cu + cuBLAS) and the CPU kernels
// (ops/cpu/train_ops.h attention_forward/backward); nothing of size T x T is stored.
//
// Shapes (fp32 in memory, row t = b T + i): q [N, nh, dn+dr] (rotated), kv [N, nh, dn+dv] (k_nope | v per head),
// kpe [N, dr] shared by the heads (key of head h = [k_nope_h | kpe]), out [N, nh, dv], lse [B, nh, T] (natural log
// of the softmax denominators of the scaled scores).
//
// Every call first converts its operands to 16-bit copies in the work buffer (one elementwise pass, ~0.05 ms at
// train-s shapes) so the attention kernels stream tiles with cp.async like the inference prefill kernel
// (attention_prefill.cu): Qb [N, nh, DQK], Kb [N, nh, DQK] = [k_nope | kpe] per head, Vb [N, nh, DV], and for the
// backward dOb [N, nh, DV].
// Precision: the forward uses fp16 operands (q, k, v, P; 8x finer rounding than bf16, output error ~4e-4 like
// the cuBLAS path), because its rounding reaches the router scores of the later layers: with bf16 operands
// (~3e-3) near-tied experts flipped often enough to fail the whole-model comparison with the CPU. Activations
// are far inside fp16's range (|x| < 65504); P is in [0, 1]. The backward uses bf16: dO and dS are gradients
// (tiny magnitudes that fp16 would flush), and its ~4e-3 error stays in the gradients.
//
// Kernels (64-row tiles, 4 warps of 16 rows, fragments as in common.cuh):
//  - forward: block = 64 queries of one (b, h); online softmax over 64-key tiles; writes out and lse.
//  - backward prep: D[b, h, i] = dO . O (fp32), dO -> bf16.
//  - dK/dV: block = 64 keys of one (b, h), loops over the query tiles at or after it; a warp owns 16 keys and
//    computes S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - D) in registers,
//    dV += P^T dO, dK += dS^T Q. The rope part of dK goes to a per-head scratch [N, nh, dr].
//  - dQ: block = 64 queries of one (b, h), loops over the key tiles up to it, recomputes P and dS, dQ += dS K.
//  - dkpe[t] = sum over heads of the per-head rope gradients, in head order.
// No atomics: every output element is written by one thread, so results are deterministic.
#include <climits>
#include <cmath>

#include <cuda_fp16.h>

#include "ops/cuda/train_common.cuh"
#include "ops/cuda/train_kernels.h"

namespace dsv3::cuda::train {

namespace {

constexpr int kTile = 64, kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// The 16-bit element type of the tensor-core operands: fp16 in the forward, bf16 in the backward (see the file
// comment). Both have the same fragment layouts; only the conversion and the mma variant differ.
template <typename E>
struct Elem;
template <>
struct Elem<bf16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) { return pack_bf16(lo, hi); }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    mma_bf16(c, a[0], a[1], a[2], a[3], b0, b1);
  }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <int DN, int DR, int DV>
struct FlashCfg {
  static constexpr int DQK = DN + DR;
  static constexpr int QP = DQK + 8;  // smem row pitch (elements): an odd number of 16-byte chunks, no bank conflicts
  static constexpr int VP = DV + 8;
  static constexpr size_t qtile = size_t(kTile) * QP * sizeof(bf16), vtile = size_t(kTile) * VP * sizeof(bf16);
  // forward and dQ: one resident tile pair (Q, dO) + two buffers of (K, V); dK/dV: resident (K, V) + two buffers
  // of (Q, dO, lse, D).
  static constexpr size_t smem_fwd = qtile + 2 * (qtile + vtile);
  static constexpr size_t smem_dq = qtile + vtile + 2 * (qtile + vtile);
  static constexpr size_t smem_dkdv = qtile + vtile + 2 * (qtile + vtile + 2 * kTile * sizeof(float));
  static_assert(DN % 8 == 0 && DR % 8 == 0 && DQK % 16 == 0 && DV % 16 == 0, "head dims must fill mma tiles");
  static_assert(((QP * 2 / 16) & 1) == 1 && ((VP * 2 / 16) & 1) == 1, "pitches must be odd multiples of 16 bytes");
};

// Loads rows row0.. row0+63 (W bf16 columns, row r at g + r * gstride) into smem with pitch P; rows >= limit
// are zero-filled. cp.async: the caller commits and waits.
template <int W, int P, typename E>
__device__ __forceinline__ void load_tile(E* s, const E* g, int64_t gstride, int row0, int limit) {
  constexpr int CH = W / 8;
  for (int c = threadIdx.x; c < kTile * CH; c += kThreads) {
    const int r = c / CH, cc = c % CH, row = row0 + r;
    const bool ok = row < limit;
    cp_async16(s + r * P + cc * 8, g + int64_t(ok ? row : 0) * gstride + cc * 8, ok);
  }
}

// acc[16 x (16 NP)] += A (16 x 16 KS, fragments af) B^T, B rows = the 16 NP n-indices in smem [n][k] (pitch P).
template <int KS, int NP, int P, typename E>
__device__ __forceinline__ void mma_abt(float (*acc)[4], const uint32_t (*af)[4], const E* B, int lane) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, B + (np * 16 + (lane & 7) + (lane >> 4) * 8) * P + ks * 16 + ((lane >> 3) & 1) * 8);
      Elem<E>::mma(acc[2 * np], af[ks], b[0], b[1]);
      Elem<E>::mma(acc[2 * np + 1], af[ks], b[2], b[3]);
    }
}

// acc[16 x W] += X (16 x 64, fp32 C-fragments x[8][4], rounded to bf16) Z, Z = smem [64 k-rows][W] (pitch P).
// The C-fragments of two adjacent 8-column tiles form one A-fragment (common.cuh layouts).
template <int W, int P, typename E>
__device__ __forceinline__ void mma_cz(float (*acc)[4], const float (*x)[4], const E* Z, int lane) {
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
    const uint32_t a[4] = {Elem<E>::pack(x[2 * kk][0], x[2 * kk][1]), Elem<E>::pack(x[2 * kk][2], x[2 * kk][3]),
                           Elem<E>::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                           Elem<E>::pack(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < W / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, Z + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * P + dp * 16 + (lane >> 4) * 8);
      Elem<E>::mma(acc[2 * dp], a, b[0], b[1]);
      Elem<E>::mma(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// A-fragments of a warp's 16 rows (row0..row0+15) of smem X [rows][W] (pitch P).
template <int W, int P, typename E>
__device__ __forceinline__ void load_afrag(uint32_t (*af)[4], const E* X, int row0, int lane) {
#pragma unroll
  for (int ks = 0; ks < W / 16; ++ks) ldmatrix_x4(af[ks], X + (row0 + (lane & 15)) * P + ks * 16 + (lane >> 4) * 8);
}

template <int N>
__device__ __forceinline__ void zero(float (*a)[4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.f;
}

template <typename E>
__device__ __forceinline__ void store4(E* dst, float4 v) {
  uint2 u;
  u.x = Elem<E>::pack(v.x, v.y);
  u.y = Elem<E>::pack(v.z, v.w);
  *reinterpret_cast<uint2*>(dst) = u;
}

// Qb/Kb/Vb (16-bit copies) from q, kv, kpe (4 columns per thread; all head dims are multiples of 8 here).
template <typename E>
__global__ void flash_convert_kernel(E* Qb, E* Kb, E* Vb, const float* q, const float* kv, const float* kpe,
                                     int64_t rows, int nh, int dn, int dr, int dv) {
  const int dqk = dn + dr, per = (2 * dqk + dv) / 4;
  DSV3_GRID_STRIDE(idx, rows * per) {
    const int64_t row = idx / per, t = row / nh;  // row = t nh + h
    const int c = int(idx % per) * 4;
    if (c < dqk) {
      store4(Qb + row * dqk + c, *reinterpret_cast<const float4*>(q + row * dqk + c));
    } else if (c < 2 * dqk) {
      const int d = c - dqk;
      const float* src = d < dn ? kv + row * (dn + dv) + d : kpe + t * dr + (d - dn);
      store4(Kb + row * dqk + d, *reinterpret_cast<const float4*>(src));
    } else {
      const int d = c - 2 * dqk;
      store4(Vb + row * dv + d, *reinterpret_cast<const float4*>(kv + row * (dn + dv) + dn + d));
    }
  }
}

// One warp per (t, h): D[b, h, i] = dO . O (fp32), dOb = bf16(dO).
__global__ void flash_bwd_prep_kernel(float* D, bf16* dOb, const float* dout, const float* out, int64_t rows, int T,
                                      int nh, int dv) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int64_t t = row / nh, b = t / T;
  const int h = int(row % nh), i = int(t % T);
  float acc = 0.f;
  for (int c = 4 * lane; c < dv; c += 128) {
    const float4 a = *reinterpret_cast<const float4*>(dout + row * dv + c);
    const float4 o = *reinterpret_cast<const float4*>(out + row * dv + c);
    acc += a.x * o.x + a.y * o.y + a.z * o.z + a.w * o.w;
    store4(dOb + row * dv + c, a);
  }
  acc = warp_sum(acc);
  if (lane == 0) D[(b * nh + h) * T + i] = acc;
}

// dkpe[t, j] = sum over h of dkpe_h[t, h, j], in head order.
__global__ void flash_sum_heads_kernel(float* dkpe, const float* dkpe_h, int64_t N, int nh, int dr) {
  DSV3_GRID_STRIDE(idx, N * dr) {
    const int64_t t = idx / dr;
    const int j = int(idx % dr);
    const float* src = dkpe_h + t * nh * dr + j;
    float acc = 0.f;
    for (int h = 0; h < nh; ++h) acc += src[h * dr];
    dkpe[idx] = acc;
  }
}

// grid (ceil(T / 64), nh, B). Late query tiles see the most keys: they start first.
template <int DN, int DR, int DV>
__global__ void __launch_bounds__(kThreads)
    flash_fwd_kernel(float* __restrict__ out, float* __restrict__ lse, const __half* __restrict__ Qb,
                     const __half* __restrict__ Kb, const __half* __restrict__ Vb, int T, int nh, float scale_log2) {
  using C = FlashCfg<DN, DR, DV>;
  constexpr int DQK = C::DQK, QP = C::QP, VP = C::VP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* Qs = reinterpret_cast<__half*>(smem_raw);  // [64][QP]
  __half* Ks = Qs + kTile * QP;                     // [2][64][QP]
  __half* Vs = Ks + 2 * kTile * QP;                 // [2][64][VP]

  const int tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, i0 = tile * kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t qs = int64_t(nh) * DQK, vs = int64_t(nh) * DV, tok0 = int64_t(b) * T;
  const __half* qg = Qb + tok0 * qs + h * DQK;
  const __half* kg = Kb + tok0 * qs + h * DQK;
  const __half* vg = Vb + tok0 * vs + h * DV;
  const int kend = min(T, i0 + kTile), ntiles = tile + 1;

  load_tile<DQK, QP>(Qs, qg, qs, i0, T);
  load_tile<DQK, QP>(Ks, kg, qs, 0, kend);
  load_tile<DV, VP>(Vs, vg, vs, 0, kend);
  cp_async_commit();

  const int qrow0 = warp * 16, pa = i0 + qrow0 + g, pb = pa + 8;  // this thread's two query rows
  float o[DV / 8][4];
  zero<DV / 8>(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[DQK / 16][4];

  for (int kt = 0; kt < ntiles; ++kt) {
    if (kt + 1 < ntiles) {
      const int nb = (kt + 1) & 1;
      load_tile<DQK, QP>(Ks + nb * kTile * QP, kg, qs, (kt + 1) * kTile, kend);
      load_tile<DV, VP>(Vs + nb * kTile * VP, vg, vs, (kt + 1) * kTile, kend);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (kt == 0) load_afrag<DQK, QP>(qf, Qs, qrow0, lane);
    const __half* Kt = Ks + (kt & 1) * kTile * QP;
    const __half* Vt = Vs + (kt & 1) * kTile * VP;

    float sc[kTile / 8][4];
    zero<kTile / 8>(sc);
    mma_abt<DQK / 16, kTile / 16, QP>(sc, qf, Kt, lane);

    // Causal mask, online softmax in base 2. Row r = 0: query pa (c0, c1); r = 1: query pb (c2, c3).
    online_softmax_tile(sc, o, m, l, kt * kTile, pa, pb, kend, scale_log2, t);
    mma_cz<DV, VP>(o, sc, Vt, lane);
    __syncthreads();  // the next iteration's loads overwrite the buffer read here
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const float ia = l[0] > 0.f ? 1.f / l[0] : 0.f, ib = l[1] > 0.f ? 1.f / l[1] : 0.f;
#pragma unroll
  for (int nt = 0; nt < DV / 8; ++nt) {
    const int col = nt * 8 + 2 * t;
    if (pa < T)
      *reinterpret_cast<float2*>(out + ((tok0 + pa) * nh + h) * DV + col) = make_float2(o[nt][0] * ia, o[nt][1] * ia);
    if (pb < T)
      *reinterpret_cast<float2*>(out + ((tok0 + pb) * nh + h) * DV + col) = make_float2(o[nt][2] * ib, o[nt][3] * ib);
  }
  if (t == 0) {  // natural-log lse of the scaled scores: (m + log2 l) ln 2, m in the scaled base-2 domain
    float* lr = lse + (int64_t(b) * nh + h) * T;
    if (pa < T) lr[pa] = (m[0] + log2f(l[0])) * kLn2;
    if (pb < T) lr[pb] = (m[1] + log2f(l[1])) * kLn2;
  }
}

// grid (ceil(T / 64), nh, B); block kt owns keys kt*64.. and visits query tiles kt..last (the first key tiles
// have the most work: they start first). Writes dkv (both parts) of its keys and their per-head rope gradient.
template <int DN, int DR, int DV>
__global__ void __launch_bounds__(kThreads)
    flash_bwd_dkdv_kernel(float* __restrict__ dkv, float* __restrict__ dkpe_h, const bf16* __restrict__ Qb,
                          const bf16* __restrict__ Kb, const bf16* __restrict__ Vb, const bf16* __restrict__ dOb,
                          const float* __restrict__ lse, const float* __restrict__ Dg, int T, int nh, float scale,
                          float scale_log2) {
  using C = FlashCfg<DN, DR, DV>;
  constexpr int DQK = C::DQK, QP = C::QP, VP = C::VP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Ks = reinterpret_cast<bf16*>(smem_raw);  // [64][QP]
  bf16* Vs = Ks + kTile * QP;                     // [64][VP]
  bf16* Qs = Vs + kTile * VP;                     // [2][64][QP]
  bf16* Os = Qs + 2 * kTile * QP;                 // [2][64][VP]  (dO)
  float* Ls = reinterpret_cast<float*>(Os + 2 * kTile * VP);  // [2][64]  lse * log2 e
  float* Ds = Ls + 2 * kTile;                                 // [2][64]

  const int kt = blockIdx.x, h = blockIdx.y, b = blockIdx.z, j0 = kt * kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t qs = int64_t(nh) * DQK, vs = int64_t(nh) * DV, tok0 = int64_t(b) * T;
  const bf16* qg = Qb + tok0 * qs + h * DQK;
  const bf16* kg = Kb + tok0 * qs + h * DQK;
  const bf16* vg = Vb + tok0 * vs + h * DV;
  const bf16* og = dOb + tok0 * vs + h * DV;
  const float* lg = lse + (int64_t(b) * nh + h) * T;
  const float* dg = Dg + (int64_t(b) * nh + h) * T;
  const int nq = (T + kTile - 1) / kTile;

  auto load_q = [&](int qt, int buf) {
    load_tile<DQK, QP>(Qs + buf * kTile * QP, qg, qs, qt * kTile, T);
    load_tile<DV, VP>(Os + buf * kTile * VP, og, vs, qt * kTile, T);
    if (threadIdx.x < kTile) {  // plain stores: visible after the __syncthreads that precedes their use
      const int i = qt * kTile + threadIdx.x;
      Ls[buf * kTile + threadIdx.x] = i < T ? lg[i] * kLog2e : 0.f;
      Ds[buf * kTile + threadIdx.x] = i < T ? dg[i] : 0.f;
    }
  };
  load_tile<DQK, QP>(Ks, kg, qs, j0, T);
  load_tile<DV, VP>(Vs, vg, vs, j0, T);
  load_q(kt, 0);
  cp_async_commit();

  const int krow0 = warp * 16, ja = j0 + krow0 + g, jb = ja + 8;  // this thread's two key rows
  float dv[DV / 8][4], dk[DQK / 8][4];
  zero<DV / 8>(dv);
  zero<DQK / 8>(dk);

  for (int qt = kt; qt < nq; ++qt) {
    const int buf = (qt - kt) & 1;
    if (qt + 1 < nq) load_q(qt + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const bf16* Qt = Qs + buf * kTile * QP;
    const bf16* Ot = Os + buf * kTile * VP;
    const float* Lt = Ls + buf * kTile;
    const float* Dt = Ds + buf * kTile;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x 64 queries.
    float s[kTile / 8][4], dp[kTile / 8][4];
    zero<kTile / 8>(s);
    zero<kTile / 8>(dp);
    {
      uint32_t kf[DQK / 16][4];
      load_afrag<DQK, QP>(kf, Ks, krow0, lane);
      mma_abt<DQK / 16, kTile / 16, QP>(s, kf, Qt, lane);
    }
    {
      uint32_t vf[DV / 16][4];
      load_afrag<DV, VP>(vf, Vs, krow0, lane);
      mma_abt<DV / 16, kTile / 16, VP>(dp, vf, Ot, lane);
    }
    // P^T = exp(S^T scale - lse) where key j <= query i < T, else 0; dS^T = P^T (dP^T - D). Column = query.
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1), i = qt * kTile + col, j = e < 2 ? ja : jb;
        const float p = (i >= j && i < T) ? exp2f(s[nt][e] * scale_log2 - Lt[col]) : 0.f;
        s[nt][e] = p;
        dp[nt][e] = p * (dp[nt][e] - Dt[col]);
      }
    mma_cz<DV, VP>(dv, s, Ot, lane);    // dV += P^T dO
    mma_cz<DQK, QP>(dk, dp, Qt, lane);  // dK += dS^T Q (scaled at the end)
    __syncthreads();                    // the next iteration's loads overwrite the buffer read here
  }

  // dkv[t, h] = [dK[:, :DN] | dV]; dK[:, DN:] -> dkpe_h[t, h] (summed over heads by flash_sum_heads_kernel).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = r == 0 ? ja : jb;
    if (j >= T) continue;
    const int64_t row = (tok0 + j) * nh + h;
    float* kvr = dkv + row * (DN + DV);
#pragma unroll
    for (int nt = 0; nt < DV / 8; ++nt)
      *reinterpret_cast<float2*>(kvr + DN + nt * 8 + 2 * t) = make_float2(dv[nt][2 * r], dv[nt][2 * r + 1]);
#pragma unroll
    for (int nt = 0; nt < DQK / 8; ++nt) {
      const int c = nt * 8 + 2 * t;
      const float2 v = make_float2(dk[nt][2 * r] * scale, dk[nt][2 * r + 1] * scale);
      if (nt < DN / 8)
        *reinterpret_cast<float2*>(kvr + c) = v;
      else
        *reinterpret_cast<float2*>(dkpe_h + row * DR + (c - DN)) = v;
    }
  }
}

// grid (ceil(T / 64), nh, B); block = 64 queries, key tiles 0..its own (late query tiles start first).
template <int DN, int DR, int DV>
__global__ void __launch_bounds__(kThreads)
    flash_bwd_dq_kernel(float* __restrict__ dq, const bf16* __restrict__ Qb, const bf16* __restrict__ Kb,
                        const bf16* __restrict__ Vb, const bf16* __restrict__ dOb, const float* __restrict__ lse,
                        const float* __restrict__ Dg, int T, int nh, float scale, float scale_log2) {
  using C = FlashCfg<DN, DR, DV>;
  constexpr int DQK = C::DQK, QP = C::QP, VP = C::VP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // [64][QP]
  bf16* Os = Qs + kTile * QP;                     // [64][VP]  (dO)
  bf16* Ks = Os + kTile * VP;                     // [2][64][QP]
  bf16* Vs = Ks + 2 * kTile * QP;                 // [2][64][VP]

  const int tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, i0 = tile * kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t qs = int64_t(nh) * DQK, vs = int64_t(nh) * DV, tok0 = int64_t(b) * T;
  const bf16* qg = Qb + tok0 * qs + h * DQK;
  const bf16* kg = Kb + tok0 * qs + h * DQK;
  const bf16* vg = Vb + tok0 * vs + h * DV;
  const bf16* og = dOb + tok0 * vs + h * DV;
  const int kend = min(T, i0 + kTile), ntiles = tile + 1;

  load_tile<DQK, QP>(Qs, qg, qs, i0, T);
  load_tile<DV, VP>(Os, og, vs, i0, T);
  load_tile<DQK, QP>(Ks, kg, qs, 0, kend);
  load_tile<DV, VP>(Vs, vg, vs, 0, kend);
  cp_async_commit();

  const int qrow0 = warp * 16, pa = i0 + qrow0 + g, pb = pa + 8;
  const float* lr = lse + (int64_t(b) * nh + h) * T;
  const float* dr_ = Dg + (int64_t(b) * nh + h) * T;
  const float L[2] = {pa < T ? lr[pa] * kLog2e : 0.f, pb < T ? lr[pb] * kLog2e : 0.f};
  const float Dr[2] = {pa < T ? dr_[pa] : 0.f, pb < T ? dr_[pb] : 0.f};
  float acc[DQK / 8][4];
  zero<DQK / 8>(acc);
  uint32_t qf[DQK / 16][4], of[DV / 16][4];

  for (int kt = 0; kt < ntiles; ++kt) {
    if (kt + 1 < ntiles) {
      const int nb = (kt + 1) & 1;
      load_tile<DQK, QP>(Ks + nb * kTile * QP, kg, qs, (kt + 1) * kTile, kend);
      load_tile<DV, VP>(Vs + nb * kTile * VP, vg, vs, (kt + 1) * kTile, kend);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (kt == 0) {
      load_afrag<DQK, QP>(qf, Qs, qrow0, lane);
      load_afrag<DV, VP>(of, Os, qrow0, lane);
    }
    const bf16* Kt = Ks + (kt & 1) * kTile * QP;
    const bf16* Vt = Vs + (kt & 1) * kTile * VP;

    float s[kTile / 8][4], dp[kTile / 8][4];
    zero<kTile / 8>(s);
    zero<kTile / 8>(dp);
    mma_abt<DQK / 16, kTile / 16, QP>(s, qf, Kt, lane);  // S = Q K^T
    mma_abt<DV / 16, kTile / 16, VP>(dp, of, Vt, lane);  // dP = dO V^T
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = kt * kTile + nt * 8 + 2 * t + (e & 1), r = e >> 1;
        const float p = (j <= (r ? pb : pa) && j < kend) ? exp2f(s[nt][e] * scale_log2 - L[r]) : 0.f;
        dp[nt][e] = p * (dp[nt][e] - Dr[r]);
      }
    mma_cz<DQK, QP>(acc, dp, Kt, lane);  // dQ += dS K
    __syncthreads();
  }

#pragma unroll
  for (int nt = 0; nt < DQK / 8; ++nt) {
    const int col = nt * 8 + 2 * t;
    if (pa < T)
      *reinterpret_cast<float2*>(dq + ((tok0 + pa) * nh + h) * DQK + col) =
          make_float2(acc[nt][0] * scale, acc[nt][1] * scale);
    if (pb < T)
      *reinterpret_cast<float2*>(dq + ((tok0 + pb) * nh + h) * DQK + col) =
          make_float2(acc[nt][2] * scale, acc[nt][3] * scale);
  }
}

// Work buffer layout (byte offsets rounded to 256): Qb, Kb, Vb [N nh DQK | N nh DQK | N nh DV] bf16, then for the
// backward dOb [N nh DV] bf16, D [B nh T] fp32, dkpe_h [N nh dr] fp32.
struct WorkLayout {
  size_t qb, kb, vb, ob, d, kpe, fwd_end, bwd_end;
  WorkLayout(int64_t B, int64_t T, int64_t nh, int64_t dn, int64_t dr, int64_t dv) {
    const auto up = [](size_t x) { return (x + 255) / 256 * 256; };
    const size_t rows = size_t(B * T * nh);
    qb = 0;
    kb = up(qb + rows * size_t(dn + dr) * 2);
    vb = up(kb + rows * size_t(dn + dr) * 2);
    fwd_end = up(vb + rows * size_t(dv) * 2);
    ob = fwd_end;
    d = up(ob + rows * size_t(dv) * 2);
    kpe = up(d + size_t(B * nh * T) * 4);
    bwd_end = up(kpe + rows * size_t(dr) * 4);
  }
};

template <typename T>
T* at(void* work, size_t off) {
  return reinterpret_cast<T*>(static_cast<unsigned char*>(work) + off);
}

template <typename E>
void convert(const WorkLayout& w, void* work, const float* q, const float* kv, const float* kpe, int64_t rows, int nh,
             int dn, int dr, int dv, cudaStream_t s) {
  flash_convert_kernel<E><<<grid_for(rows * (2 * (dn + dr) + dv) / 4), 256, 0, s>>>(
      at<E>(work, w.qb), at<E>(work, w.kb), at<E>(work, w.vb), q, kv, kpe, rows, nh, dn, dr, dv);
  DSV3_CUDA_KERNEL_CHECK();
}

template <typename K>
void allow_smem(K kernel, size_t bytes) {
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <int DN, int DR, int DV>
void forward_impl(float* out, float* lse, const float* q, const float* kv, const float* kpe, int64_t B, int64_t T,
                  int64_t nh, float scale, void* work, cudaStream_t s) {
  using C = FlashCfg<DN, DR, DV>;
  static bool configured = false;  // raise the dynamic shared-memory limit once per instantiation
  if (!configured) allow_smem(flash_fwd_kernel<DN, DR, DV>, C::smem_fwd), configured = true;
  const WorkLayout w(B, T, nh, DN, DR, DV);
  convert<__half>(w, work, q, kv, kpe, B * T * nh, int(nh), DN, DR, DV, s);
  const dim3 grid(unsigned((T + kTile - 1) / kTile), unsigned(nh), unsigned(B));
  flash_fwd_kernel<DN, DR, DV><<<grid, kThreads, C::smem_fwd, s>>>(
      out, lse, at<__half>(work, w.qb), at<__half>(work, w.kb), at<__half>(work, w.vb), int(T), int(nh),
      scale * kLog2e);
  DSV3_CUDA_KERNEL_CHECK();
}

template <int DN, int DR, int DV>
void backward_impl(float* dq, float* dkv, float* dkpe, const float* dout, const float* out, const float* lse,
                   const float* q, const float* kv, const float* kpe, int64_t B, int64_t T, int64_t nh, float scale,
                   void* work, cudaStream_t s) {
  using C = FlashCfg<DN, DR, DV>;
  static bool configured = false;
  if (!configured) {
    allow_smem(flash_bwd_dkdv_kernel<DN, DR, DV>, C::smem_dkdv);
    allow_smem(flash_bwd_dq_kernel<DN, DR, DV>, C::smem_dq);
    configured = true;
  }
  const WorkLayout w(B, T, nh, DN, DR, DV);
  const int64_t rows = B * T * nh;
  convert<bf16>(w, work, q, kv, kpe, rows, int(nh), DN, DR, DV, s);
  bf16 *Qb = at<bf16>(work, w.qb), *Kb = at<bf16>(work, w.kb), *Vb = at<bf16>(work, w.vb), *dOb = at<bf16>(work, w.ob);
  float *D = at<float>(work, w.d), *dkpe_h = at<float>(work, w.kpe);
  flash_bwd_prep_kernel<<<unsigned((rows * 32 + 255) / 256), 256, 0, s>>>(D, dOb, dout, out, rows, int(T), int(nh),
                                                                          DV);
  DSV3_CUDA_KERNEL_CHECK();
  const dim3 grid(unsigned((T + kTile - 1) / kTile), unsigned(nh), unsigned(B));
  flash_bwd_dkdv_kernel<DN, DR, DV><<<grid, kThreads, C::smem_dkdv, s>>>(dkv, dkpe_h, Qb, Kb, Vb, dOb, lse, D, int(T),
                                                                          int(nh), scale, scale * kLog2e);
  DSV3_CUDA_KERNEL_CHECK();
  flash_bwd_dq_kernel<DN, DR, DV><<<grid, kThreads, C::smem_dq, s>>>(dq, Qb, Kb, Vb, dOb, lse, D, int(T), int(nh),
                                                                      scale, scale * kLog2e);
  DSV3_CUDA_KERNEL_CHECK();
  flash_sum_heads_kernel<<<grid_for(B * T * DR), 256, 0, s>>>(dkpe, dkpe_h, B * T, int(nh), DR);
  DSV3_CUDA_KERNEL_CHECK();
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

bool flash_attention_supported(int64_t dn, int64_t dr, int64_t dv) {
  return (dn == 64 && dr == 32 && dv == 64) || (dn == 32 && dr == 16 && dv == 32);
}

size_t flash_attention_work_bytes(int64_t B, int64_t T, int64_t nh, int64_t dn, int64_t dr, int64_t dv,
                                  bool backward) {
  const WorkLayout w(B, T, nh, dn, dr, dv);
  return backward ? w.bwd_end : w.fwd_end;
}

bool flash_attention_forward(float* out, float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                             int64_t T, int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale, void* work,
                             cudaStream_t s) {
  if (!flash_attention_supported(dn, dr, dv) || !aligned16(out) || !aligned16(q) || !aligned16(kv) ||
      !aligned16(kpe) || !aligned16(work) || T > INT_MAX / 2 || nh > 65535 || B > 65535)
    return false;
  if (B * T * nh == 0) return true;
  if (dn == 64) forward_impl<64, 32, 64>(out, lse, q, kv, kpe, B, T, nh, scale, work, s);
  else forward_impl<32, 16, 32>(out, lse, q, kv, kpe, B, T, nh, scale, work, s);
  return true;
}

bool flash_attention_backward(float* dq, float* dkv, float* dkpe, const float* dout, const float* out,
                              const float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                              int64_t T, int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale, void* work,
                              cudaStream_t s) {
  if (!flash_attention_supported(dn, dr, dv) || !aligned16(dq) || !aligned16(dkv) || !aligned16(dout) ||
      !aligned16(out) || !aligned16(q) || !aligned16(kv) || !aligned16(kpe) ||
      !aligned16(work) || T > INT_MAX / 2 || nh > 65535 || B > 65535)
    return false;
  if (B * T * nh == 0) return true;
  if (dn == 64) backward_impl<64, 32, 64>(dq, dkv, dkpe, dout, out, lse, q, kv, kpe, B, T, nh, scale, work, s);
  else backward_impl<32, 16, 32>(dq, dkv, dkpe, dout, out, lse, q, kv, kpe, B, T, nh, scale, work, s);
  return true;
}

}  // namespace dsv3::cuda::train
