// Fused decode kernels: each replaces a chain of tiny kernels that a decode step runs back to back, where every
// launch costs a few microseconds on the GPU whatever its bytes (27 layers x ~24 kernels per step). Each does
// exactly the arithmetic of the chain it replaces (fp32 math, one rounding to the activation dtype per stored
// value, at the same points), so results match the unfused ops up to the order of a norm's sum.
#include <algorithm>

#include "ops/cuda/common.cuh"

namespace dsv3::cuda {

namespace {

// Rotates the pair (a, b) of column j of a rope part by the angle of position p (tables [max_pos, half]).
__device__ __forceinline__ void rope_pair(float& a, float& b, const float* cos, const float* sin, int p, int half,
                                          int j) {
  const float c = cos[int64_t(p) * half + j], s = sin[int64_t(p) * half + j];
  const float a0 = a, b0 = b;
  a = a0 * c - b0 * s;
  b = b0 * c + a0 * s;
}

// One block per token t: kv_a row [c_raw (r) | k_pe_raw (dr)] -> cache row rows[t] = [rmsnorm(c_raw) * w |
// rope(k_pe_raw)]. Replaces rmsnorm + copy_cols + rope + kv_write (4 kernels). r = 512, dr = 64 in DeepSeek.
template <typename T, typename WT>
__global__ void kv_norm_rope_write_kernel(T* pool, const int* rows, const T* kva, int r, int dr, const WT* w,
                                          float eps, const int* pos, const float* cos, const float* sin,
                                          bool interleave) {
  pdl_start();
  const int t = blockIdx.x, row = rows[t];
  if (row < 0) return;  // the whole block: no barrier is skipped by part of it
  const T* x = kva + int64_t(t) * (r + dr);
  T* o = pool + int64_t(row) * (r + dr);
  float ss = 0.f;
  for (int i = threadIdx.x; i < r; i += blockDim.x) {
    const float v = to_f(x[i]);
    ss += v * v;
  }
  const float rs = rsqrtf(block_sum(ss) / float(r) + eps);
  for (int i = threadIdx.x; i < r; i += blockDim.x) o[i] = from_f<T>(to_f(w[i]) * (to_f(x[i]) * rs));
  const int half = dr / 2, p = pos[t];
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    const int i0 = interleave ? 2 * j : j, i1 = interleave ? 2 * j + 1 : j + half;
    float a = to_f(x[r + i0]), b = to_f(x[r + i1]);
    rope_pair(a, b, cos, sin, p, half, j);
    o[r + i0] = from_f<T>(a);
    o[r + i1] = from_f<T>(b);
  }
}

// out[t, h, :dr] = rope(x[t, h, off : off + dr]) for x viewed [T, n, stride]: the rotated q_pe of absorbed decode
// written straight from q (rope in place + copy_cols before). One thread per pair.
template <typename T>
__global__ void rope_copy_kernel(T* out, const T* x, int64_t T_, int n, int64_t stride, int off, int half,
                                 const int* pos, const float* cos, const float* sin, bool interleave) {
  pdl_start();
  const int64_t total = T_ * n * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int j = int(i % half);
    const int64_t th = i / half;
    const T* v = x + th * stride + off;
    T* o = out + th * 2 * half;
    const int i0 = interleave ? 2 * j : j, i1 = interleave ? 2 * j + 1 : j + half;
    float a = to_f(v[i0]), b = to_f(v[i1]);
    rope_pair(a, b, cos, sin, pos[th / n], half, j);
    o[i0] = from_f<T>(a);
    o[i1] = from_f<T>(b);
  }
}

// Row t (one block, D = 2048 in infer-m, 8 values per thread per access):
//   f = bf16(f + sum_k w[t, k] * Y[pair_pos[t, k]])    (moe_combine: the routed experts into the shared output)
//   x = bf16(x + f)                                     (the residual add)
//   out = rmsnorm(x) * nw                                (the next norm)
// Replaces moe_combine + add+rmsnorm (2 kernels). Y [P, D] fp32 in sorted-pair order; K <= 32.
template <typename WT>
__global__ void combine_add_rmsnorm_kernel(bf16* x, bf16* f, const float* y, const float* wk, const int* pair_pos, int K,
                                           bf16* out, const WT* nw, int D, float eps) {
  pdl_start();
  __shared__ int64_t yrow[32];
  __shared__ float wts[32];
  const int t = blockIdx.x;
  if (threadIdx.x < K) {
    const int i = t * K + threadIdx.x;
    yrow[threadIdx.x] = pair_pos[i];
    wts[threadIdx.x] = wk[i];
  }
  __syncthreads();
  const int64_t ro = int64_t(t) * D;
  float ss = 0.f;
  for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
    float acc[8];
    uint4 uf = *reinterpret_cast<const uint4*>(f + ro + i), ux = *reinterpret_cast<const uint4*>(x + ro + i);
    uint32_t* pf = &uf.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 v = unpack_bf16(pf[j]);
      acc[2 * j] = v.x;
      acc[2 * j + 1] = v.y;
    }
    for (int k = 0; k < K; ++k) {
      if (yrow[k] < 0) continue;
      const float4* yr = reinterpret_cast<const float4*>(y + yrow[k] * D + i);
      const float4 y0 = yr[0], y1 = yr[1];
      const float wv = wts[k];
      acc[0] += wv * y0.x, acc[1] += wv * y0.y, acc[2] += wv * y0.z, acc[3] += wv * y0.w;
      acc[4] += wv * y1.x, acc[5] += wv * y1.y, acc[6] += wv * y1.z, acc[7] += wv * y1.w;
    }
    uint32_t* px = &ux.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pf[j] = pack_bf16(acc[2 * j], acc[2 * j + 1]);
      const float2 fv = unpack_bf16(pf[j]), xv = unpack_bf16(px[j]);
      px[j] = pack_bf16(xv.x + fv.x, xv.y + fv.y);
      const float2 s = unpack_bf16(px[j]);
      ss += s.x * s.x + s.y * s.y;
    }
    *reinterpret_cast<uint4*>(f + ro + i) = uf;
    *reinterpret_cast<uint4*>(x + ro + i) = ux;
  }
  const float rs = rsqrtf(block_sum(ss) / float(D) + eps);
  for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
    uint4 u = *reinterpret_cast<const uint4*>(x + ro + i);
    uint32_t* pu = &u.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 v = unpack_bf16(pu[j]);
      pu[j] = pack_bf16(to_f(nw[i + 2 * j]) * (v.x * rs), to_f(nw[i + 2 * j + 1]) * (v.y * rs));
    }
    *reinterpret_cast<uint4*>(out + ro + i) = u;
  }
}

inline bool al16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

void kv_norm_rope_write(void* pool, const int* rows, const void* kva, DType at, int T, int r, int dr, const void* w,
                        DType wt, float eps, const int* pos, const float* cos, const float* sin, bool interleave,
                        cudaStream_t s) {
  if (T == 0) return;
  auto go = [&](auto atag, auto wtag) {
    using A = decltype(atag);
    using W = decltype(wtag);
    launch(kv_norm_rope_write_kernel<A, W>, dim3(T), dim3(128), 0, s, static_cast<A*>(pool), rows,
           static_cast<const A*>(kva), r, dr, static_cast<const W*>(w), eps, pos, cos, sin, interleave);
  };
  if (at == DType::BF16) {
    if (wt == DType::BF16) go(bf16{}, bf16{});
    else go(bf16{}, float{});
  } else {
    if (wt == DType::BF16) go(float{}, bf16{});
    else go(float{}, float{});
  }
  DSV3_CUDA_KERNEL_CHECK();
}

void rope_copy(void* out, const void* x, DType at, int64_t T, int64_t n, int64_t stride, int64_t off, int64_t dr,
               const int* pos, const float* cos, const float* sin, bool interleave, cudaStream_t s) {
  const int64_t total = T * n * (dr / 2);
  if (total == 0) return;
  const int grid = int(std::min<int64_t>((total + 255) / 256, 65535));
  if (at == DType::BF16)
    launch(rope_copy_kernel<bf16>, dim3(grid), dim3(256), 0, s, static_cast<bf16*>(out), static_cast<const bf16*>(x), T,
           int(n), stride, int(off), int(dr / 2), pos, cos, sin, interleave);
  else
    launch(rope_copy_kernel<float>, dim3(grid), dim3(256), 0, s, static_cast<float*>(out), static_cast<const float*>(x),
           T, int(n), stride, int(off), int(dr / 2), pos, cos, sin, interleave);
  DSV3_CUDA_KERNEL_CHECK();
}

bool combine_add_rmsnorm_ok(const void* x, const void* f, const void* y, const void* out, int K, int64_t D) {
  return D % 8 == 0 && K <= 32 && al16(x) && al16(f) && al16(y) && al16(out);
}

void combine_add_rmsnorm(bf16* x, bf16* f, const float* y, const float* w, const int* pair_pos, int T, int K, bf16* out,
                         const void* nw, DType nwt, int64_t D, float eps, cudaStream_t s) {
  if (T == 0) return;
  DSV3_CHECK(combine_add_rmsnorm_ok(x, f, y, out, K, D), "combine_add_rmsnorm: unaligned rows or K {} > 32", K);
  const int threads = D >= 4096 ? 512 : (D >= 1024 ? 256 : 128);
  if (nwt == DType::BF16)
    launch(combine_add_rmsnorm_kernel<bf16>, dim3(T), dim3(threads), 0, s, x, f, y, w, pair_pos, K, out,
           static_cast<const bf16*>(nw), int(D), eps);
  else
    launch(combine_add_rmsnorm_kernel<float>, dim3(T), dim3(threads), 0, s, x, f, y, w, pair_pos, K, out,
           static_cast<const float*>(nw), int(D), eps);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
