// MLA prefill attention for one sequence: causal softmax(q k^T * scale) v with q/k head dim dn + dr (the rope
// part of k is one vector shared by all heads) and v head dim dv. Flash-attention-2 style on tensor cores:
// a block takes 64 queries of one head (4 warps x 16 rows), streams 64-key tiles of K = [k_nope | k_pe] and V
// through shared memory (cp.async, double-buffered), keeps the online-softmax state and the output in registers.
// Shapes: q [len, nh, dn+dr], kv [n, nh, dn+dv] (k_nope then v), kpe [n, dr], out [len, nh, dv]; n = pos0 + len.
// Query i sits at position pos0 + i and sees keys 0..pos0 + i.
// Head dims of the instantiated configs take the fast kernel; any other shape takes a simple warp-per-query kernel.
#include <cmath>

#include "ops/cuda/common.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kBM = 64, kBN = 64, kThreads = 128;

template <int DN, int DR, int DV>
struct PrefillCfg {
  static constexpr int DQK = DN + DR;
  static constexpr int QP = DQK + 8;  // smem row pitch in elements: an odd number of 16-byte chunks (no bank conflicts)
  static constexpr int VP = DV + 8;
  static constexpr size_t smem = size_t(kBM * QP + 2 * kBN * QP + 2 * kBN * VP) * sizeof(bf16);
  static_assert(DN % 8 == 0 && DR % 8 == 0 && DQK % 16 == 0 && DV % 16 == 0, "head dims must fill mma tiles");
  static_assert(((QP * 2 / 16) & 1) == 1 && ((VP * 2 / 16) & 1) == 1, "pitches must be odd multiples of 16 bytes");
};

template <int DN, int DR, int DV>
__global__ void __launch_bounds__(kThreads) mla_prefill_kernel(bf16* __restrict__ out, const bf16* __restrict__ q,
                                                               const bf16* __restrict__ kv, const bf16* __restrict__ kpe,
                                                               int len, int pos0, int nh, float scale_log2) {
  pdl_start();
  using C = PrefillCfg<DN, DR, DV>;
  constexpr int DQK = C::DQK, QP = C::QP, VP = C::VP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // [kBM][QP]
  bf16* Ks = Qs + kBM * QP;                       // [2][kBN][QP]
  bf16* Vs = Ks + 2 * kBN * QP;                   // [2][kBN][VP]

  const int tile = gridDim.x - 1 - blockIdx.x;  // late query tiles see the most keys: start them first
  const int h = blockIdx.y, i0 = tile * kBM, n = pos0 + len;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t qstride = int64_t(nh) * DQK, kvstride = int64_t(nh) * (DN + DV);
  const int kend = min(n, pos0 + min(i0 + kBM, len));  // keys visible to the block's last query
  const int ntiles = (kend + kBN - 1) / kBN;

  constexpr int QCH = DQK / 8;
  for (int c = threadIdx.x; c < kBM * QCH; c += kThreads) {
    const int r = c / QCH, cc = c % QCH, qi = i0 + r;
    const bool ok = qi < len;
    cp_async16(Qs + r * QP + cc * 8, q + int64_t(ok ? qi : 0) * qstride + int64_t(h) * DQK + cc * 8, ok);
  }
  auto load_kv = [&](int kt, int buf) {
    bf16* Kb = Ks + buf * kBN * QP;
    bf16* Vb = Vs + buf * kBN * VP;
    constexpr int KN = DN / 8, KC = DQK / 8, VC = DV / 8;
    for (int c = threadIdx.x; c < kBN * KC; c += kThreads) {
      const int r = c / KC, cc = c % KC, j = kt * kBN + r;
      const bool ok = j < kend;
      const int64_t jj = ok ? j : 0;
      const bf16* src = cc < KN ? kv + jj * kvstride + int64_t(h) * (DN + DV) + cc * 8 : kpe + jj * DR + (cc - KN) * 8;
      cp_async16(Kb + r * QP + cc * 8, src, ok);
    }
    for (int c = threadIdx.x; c < kBN * VC; c += kThreads) {
      const int r = c / VC, cc = c % VC, j = kt * kBN + r;
      const bool ok = j < kend;
      cp_async16(Vb + r * VP + cc * 8, kv + int64_t(ok ? j : 0) * kvstride + int64_t(h) * (DN + DV) + DN + cc * 8, ok);
    }
  };
  load_kv(0, 0);
  cp_async_commit();  // group: Q and key tile 0

  const int qrow0 = warp * 16;
  const int pa = pos0 + i0 + qrow0 + g, pb = pa + 8;  // positions of this thread's two query rows
  float o[DV / 8][4];
#pragma unroll
  for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[DQK / 16][4];

  for (int kt = 0; kt < ntiles; ++kt) {
    if (kt + 1 < ntiles) load_kv(kt + 1, (kt + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the group just issued has landed
    __syncthreads();
    if (kt == 0) {
#pragma unroll
      for (int ks = 0; ks < DQK / 16; ++ks)
        ldmatrix_x4(qf[ks], Qs + (qrow0 + (lane & 15)) * QP + ks * 16 + (lane >> 4) * 8);
    }
    const bf16* Kb = Ks + (kt & 1) * kBN * QP;
    const bf16* Vb = Vs + (kt & 1) * kBN * VP;

    // S = Q K^T for 16 queries x 64 keys.
    float sc[kBN / 8][4];
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < DQK / 16; ++ks)
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, Kb + (np * 16 + (lane & 7) + (lane >> 4) * 8) * QP + ks * 16 + ((lane >> 3) & 1) * 8);
        mma_bf16(sc[2 * np], qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], b[0], b[1]);
        mma_bf16(sc[2 * np + 1], qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], b[2], b[3]);
      }

    // Causal mask and online softmax (base 2). Rows: r = 0 -> query row g (c0, c1), r = 1 -> row g + 8 (c2, c3).
    online_softmax_tile(sc, o, m, l, kt * kBN, pa, pb, kend, scale_log2, t);

    // O += P V; P's C-fragments of two key n-tiles form one A-fragment.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a0 = pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), a1 = pack_bf16(sc[2 * kk][2], sc[2 * kk][3]);
      const uint32_t a2 = pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                     a3 = pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < DV / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, Vb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * VP + dp * 16 + (lane >> 4) * 8);
        mma_bf16(o[2 * dp], a0, a1, a2, a3, b[0], b[1]);
        mma_bf16(o[2 * dp + 1], a0, a1, a2, a3, b[2], b[3]);
      }
    }
    __syncthreads();  // the next iteration's loads overwrite the buffer read here
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int qa = i0 + qrow0 + g, qb = qa + 8;
  const float ia = l[0] > 0.f ? 1.f / l[0] : 0.f, ib = l[1] > 0.f ? 1.f / l[1] : 0.f;
#pragma unroll
  for (int nt = 0; nt < DV / 8; ++nt) {
    const int col = nt * 8 + 2 * t;
    if (qa < len)
      *reinterpret_cast<uint32_t*>(out + (int64_t(qa) * nh + h) * DV + col) = pack_bf16(o[nt][0] * ia, o[nt][1] * ia);
    if (qb < len)
      *reinterpret_cast<uint32_t*>(out + (int64_t(qb) * nh + h) * DV + col) = pack_bf16(o[nt][2] * ib, o[nt][3] * ib);
  }
}

// Any head dims (and fp32 activations): one warp per (query, head), online softmax over keys, lanes split the
// head dims (dv <= 256).
template <typename T>
__global__ void mla_prefill_ref_kernel(T* out, const T* q, const T* kv, const T* kpe, int len, int pos0, int nh, int dn,
                                       int dr, int dv, float scale) {
  pdl_start();
  const int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (w >= int64_t(len) * nh) return;
  const int i = int(w / nh), h = int(w % nh);
  const T* qr = q + (int64_t(i) * nh + h) * (dn + dr);
  float m = -INFINITY, l = 0.f, acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j <= pos0 + i; ++j) {
    const T* kr = kv + (int64_t(j) * nh + h) * (dn + dv);
    float s = 0.f;
    for (int d = lane; d < dn + dr; d += 32) s += to_f(qr[d]) * to_f(d < dn ? kr[d] : kpe[int64_t(j) * dr + d - dn]);
    s = warp_sum(s) * scale;
    const float mn = fmaxf(m, s), alpha = expf(m - mn), p = expf(s - mn);
    l = l * alpha + p;
#pragma unroll
    for (int c = 0; c < 8; ++c)
      if (lane + 32 * c < dv) acc[c] = acc[c] * alpha + p * to_f(kr[dn + lane + 32 * c]);
    m = mn;
  }
#pragma unroll
  for (int c = 0; c < 8; ++c)
    if (lane + 32 * c < dv) out[(int64_t(i) * nh + h) * dv + lane + 32 * c] = from_f<T>(acc[c] / l);
}

template <int DN, int DR, int DV>
void launch_fast(bf16* out, const bf16* q, const bf16* kv, const bf16* kpe, int len, int pos0, int nh, float scale,
                 cudaStream_t s) {
  using C = PrefillCfg<DN, DR, DV>;
  static bool configured = false;  // raise the dynamic shared-memory limit once per instantiation
  if (!configured) {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(mla_prefill_kernel<DN, DR, DV>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(C::smem)));
    configured = true;
  }
  const dim3 grid((len + kBM - 1) / kBM, nh);
  launch(mla_prefill_kernel<DN, DR, DV>, dim3(grid), dim3(kThreads), C::smem, s, out, q, kv, kpe, len, pos0, nh,
                                                                  scale * 1.4426950408889634f);
}

}  // namespace

void mla_prefill(bf16* out, const bf16* q, const bf16* kv, const bf16* kpe, int len, int pos0, int nh, int dn, int dr,
                 int dv, float scale, cudaStream_t s) {
  if (len == 0) return;
  const bool al = ((reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(kv) |
                    reinterpret_cast<uintptr_t>(kpe)) & 15) == 0;
  if (al && dn == 128 && dr == 64 && dv == 128) launch_fast<128, 64, 128>(out, q, kv, kpe, len, pos0, nh, scale, s);
  else if (al && dn == 64 && dr == 32 && dv == 64) launch_fast<64, 32, 64>(out, q, kv, kpe, len, pos0, nh, scale, s);
  else if (al && dn == 32 && dr == 16 && dv == 32) launch_fast<32, 16, 32>(out, q, kv, kpe, len, pos0, nh, scale, s);
  else {
    DSV3_CHECK(dv <= 256, "mla_prefill: v head dim {} > 256", dv);
    const int64_t warps = int64_t(len) * nh;
    launch(mla_prefill_ref_kernel<bf16>, dim3(int((warps * 32 + 255) / 256)), dim3(256), 0, s, out, q, kv, kpe, len,
           pos0, nh, dn, dr, dv, scale);
  }
  DSV3_CUDA_KERNEL_CHECK();
}

void mla_prefill_f32(float* out, const float* q, const float* kv, const float* kpe, int len, int pos0, int nh, int dn,
                     int dr, int dv, float scale, cudaStream_t s) {
  if (len == 0) return;
  DSV3_CHECK(dv <= 256, "mla_prefill: v head dim {} > 256", dv);
  const int64_t warps = int64_t(len) * nh;
  launch(mla_prefill_ref_kernel<float>, dim3(int((warps * 32 + 255) / 256)), dim3(256), 0, s, out, q, kv, kpe, len, pos0,
         nh, dn, dr, dv, scale);
  DSV3_CUDA_KERNEL_CHECK();
}

// k [n, nh, dn+dr]: each head's k_nope from kv [n, nh, dn+dv] and the shared k_pe [n, dr] (the dense keys a
// library attention kernel reads; MLA stores the rope part once per token). One thread per 16-byte chunk.
__global__ void mla_concat_k_kernel(bf16* __restrict__ k, const bf16* __restrict__ kv, const bf16* __restrict__ kpe,
                                    int n, int nh, int dn, int dr, int dv) {
  pdl_start();
  const int dqk = dn + dr, cpr = dqk / 8;  // chunks per (token, head) row
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(n) * nh * cpr) return;
  const int c = int(i % cpr);
  const int64_t jh = i / cpr, j = jh / nh;
  const int h = int(jh % nh);
  const uint4* src = c * 8 < dn ? reinterpret_cast<const uint4*>(kv + (j * nh + h) * (dn + dv) + c * 8)
                                : reinterpret_cast<const uint4*>(kpe + j * dr + (c * 8 - dn));
  reinterpret_cast<uint4*>(k + jh * dqk)[c] = *src;
}

void mla_concat_k(bf16* k, const bf16* kv, const bf16* kpe, int n, int nh, int dn, int dr, int dv, cudaStream_t s) {
  DSV3_CHECK(dn % 8 == 0 && dr % 8 == 0 && dv % 8 == 0, "mla_concat_k: head dims {} {} {} must be multiples of 8", dn,
             dr, dv);
  const int64_t chunks = int64_t(n) * nh * ((dn + dr) / 8);
  if (chunks == 0) return;
  launch(mla_concat_k_kernel, dim3(int((chunks + 255) / 256)), dim3(256), 0, s, k, kv, kpe, n, nh, dn, dr, dv);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
