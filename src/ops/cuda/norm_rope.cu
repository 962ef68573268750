// Elementwise and row-wise kernels: RMSNorm, residual add, SwiGLU, RoPE, embedding, row copies, fills.
// All are bound by memory bytes (or by launch latency at decode sizes): 16-byte accesses where alignment allows,
// fp32 math, one rounding to the activation dtype on store.
#include <cmath>

#include "ops/cuda/common.cuh"

namespace dsv3::cuda {

namespace {

inline int blocks_for(int64_t n, int threads, int cap = 65535 * 8) {
  int64_t b = (n + threads - 1) / threads;
  return int(b < 1 ? 1 : (b > cap ? cap : b));
}
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- RMSNorm: one block per row; pass 1 sums squares, pass 2 rescales (in place is safe: every element is read
// by the thread that writes it, after the block-wide reduction).
template <typename T, typename WT>
__global__ void rmsnorm_kernel(T* out, const T* x, int64_t xs, const WT* w, int D, float eps) {
  pdl_start();
  const T* xr = x + blockIdx.x * xs;
  T* o = out + int64_t(blockIdx.x) * D;
  float ss = 0.f;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    float v = to_f(xr[i]);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum(ss) / float(D) + eps);
  for (int i = threadIdx.x; i < D; i += blockDim.x) o[i] = from_f<T>(to_f(w[i]) * (to_f(xr[i]) * r));
}

// bf16 rows with D % 8 == 0 and aligned rows: 8 values per thread per access.
template <typename WT>
__global__ void rmsnorm_vec_kernel(bf16* out, const bf16* x, int64_t xs, const WT* w, int D, float eps) {
  pdl_start();
  const bf16* xr = x + blockIdx.x * xs;
  bf16* o = out + int64_t(blockIdx.x) * D;
  float ss = 0.f;
  for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
    uint4 u = *reinterpret_cast<const uint4*>(xr + i);
    const uint32_t* pu = &u.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 f = unpack_bf16(pu[j]);
      ss += f.x * f.x + f.y * f.y;
    }
  }
  const float r = rsqrtf(block_sum(ss) / float(D) + eps);
  for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
    uint4 u = *reinterpret_cast<const uint4*>(xr + i);
    uint32_t* pu = &u.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 f = unpack_bf16(pu[j]);
      pu[j] = pack_bf16(to_f(w[i + 2 * j]) * (f.x * r), to_f(w[i + 2 * j + 1]) * (f.y * r));
    }
    *reinterpret_cast<uint4*>(o + i) = u;
  }
}

// x = a + b (rounded to bf16 and stored), then out = rmsnorm(x) * w: the residual add of a layer fused with the
// norm that always reads it next. Same values as the two ops apart (the norm sees the rounded sum).
template <typename WT>
__global__ void add_rmsnorm_kernel(bf16* x, const bf16* a, const bf16* b, bf16* out, const WT* w, int D, float eps) {
  pdl_start();
  const int64_t ro = int64_t(blockIdx.x) * D;
  float ss = 0.f;
  for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
    uint4 ua = *reinterpret_cast<const uint4*>(a + ro + i), ub = *reinterpret_cast<const uint4*>(b + ro + i), ux;
    const uint32_t *pa = &ua.x, *pb = &ub.x;
    uint32_t* px = &ux.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 fa = unpack_bf16(pa[j]), fb = unpack_bf16(pb[j]);
      px[j] = pack_bf16(fa.x + fb.x, fa.y + fb.y);
      const float2 r = unpack_bf16(px[j]);
      ss += r.x * r.x + r.y * r.y;
    }
    *reinterpret_cast<uint4*>(x + ro + i) = ux;
  }
  const float r = rsqrtf(block_sum(ss) / float(D) + eps);
  for (int i = threadIdx.x * 8; i < D; i += blockDim.x * 8) {
    uint4 u = *reinterpret_cast<const uint4*>(x + ro + i);
    uint32_t* pu = &u.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 f = unpack_bf16(pu[j]);
      pu[j] = pack_bf16(to_f(w[i + 2 * j]) * (f.x * r), to_f(w[i + 2 * j + 1]) * (f.y * r));
    }
    *reinterpret_cast<uint4*>(out + ro + i) = u;
  }
}

template <typename T>
__global__ void add_kernel(T* out, const T* a, const T* b, int64_t n) {
  pdl_start();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
}
__global__ void add_vec_kernel(bf16* out, const bf16* a, const bf16* b, int64_t n8) {
  pdl_start();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    uint4 ua = reinterpret_cast<const uint4*>(a)[i], ub = reinterpret_cast<const uint4*>(b)[i], uo;
    const uint32_t *pa = &ua.x, *pb = &ub.x;
    uint32_t* po = &uo.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 fa = unpack_bf16(pa[j]), fb = unpack_bf16(pb[j]);
      po[j] = pack_bf16(fa.x + fb.x, fa.y + fb.y);
    }
    reinterpret_cast<uint4*>(out)[i] = uo;
  }
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

template <typename T>
__global__ void silu_mul_kernel(T* out, const T* g, const T* u, int64_t n) {
  pdl_start();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f<T>(silu(to_f(g[i])) * to_f(u[i]));
}
__global__ void silu_mul_vec_kernel(bf16* out, const bf16* g, const bf16* u, int64_t n8) {
  pdl_start();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * blockDim.x) {
    uint4 ug = reinterpret_cast<const uint4*>(g)[i], uu = reinterpret_cast<const uint4*>(u)[i], uo;
    const uint32_t *pg = &ug.x, *pu = &uu.x;
    uint32_t* po = &uo.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 fg = unpack_bf16(pg[j]), fu = unpack_bf16(pu[j]);
      po[j] = pack_bf16(silu(fg.x) * fu.x, silu(fg.y) * fu.y);
    }
    reinterpret_cast<uint4*>(out)[i] = uo;
  }
}

template <typename U>
__global__ void copy_rows_kernel(char* dst, const int* dst_idx, int64_t dst_pitch, const char* src, const int* src_idx,
                                 int64_t src_pitch, int64_t nrows, int64_t units) {
  pdl_start();
  for (int64_t i = blockIdx.x; i < nrows; i += gridDim.x) {
    const int64_t di = dst_idx ? dst_idx[i] : i, si = src_idx ? src_idx[i] : i;
    if (di < 0 || si < 0) continue;
    U* d = reinterpret_cast<U*>(dst + di * dst_pitch);
    const U* s = reinterpret_cast<const U*>(src + si * src_pitch);
    for (int64_t j = threadIdx.x; j < units; j += blockDim.x) d[j] = s[j];
  }
}

template <typename T, typename TT>
__global__ void embedding_kernel(T* out, const TT* table, const int* ids, int H) {
  pdl_start();
  const TT* row = table + int64_t(ids[blockIdx.x]) * H;
  T* o = out + int64_t(blockIdx.x) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = from_f<T>(to_f(row[i]));
}

// One thread per rotated pair (t, head, j).
template <typename T>
__global__ void rope_kernel(T* x, int64_t T_, int n, int64_t stride, int off, int half, const int* pos,
                            const float* cos, const float* sin, bool interleave) {
  pdl_start();
  const int64_t total = T_ * n * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int j = int(i % half);
    const int64_t th = i / half;  // t * n + head
    const int64_t t = th / n;
    T* v = x + th * stride + off;
    const int p = pos[t];
    const float c = cos[int64_t(p) * half + j], s = sin[int64_t(p) * half + j];
    const int i0 = interleave ? 2 * j : j, i1 = interleave ? 2 * j + 1 : j + half;
    const float a = to_f(v[i0]), b = to_f(v[i1]);
    v[i0] = from_f<T>(a * c - b * s);
    v[i1] = from_f<T>(b * c + a * s);
  }
}

__global__ void bf16_to_f32_kernel(float* out, const bf16* in, int64_t n) {
  pdl_start();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

__global__ void f32_to_bf16_kernel(bf16* out, const float* in, int64_t n) {
  pdl_start();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(in[i]);
}

// splitmix64 finalizer; the same integer recipe as the CPU's Backend::fill_normal.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
template <typename T>
__global__ void fill_normal_kernel(T* p, int64_t n, float mean, float std, uint64_t seed) {
  pdl_start();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t h = mix64(seed ^ mix64(uint64_t(i)));
    const float u1 = float((h >> 40) + 1) * 5.9604645e-08f;        // (0, 1], 24 bits
    const float u2 = float(h & 0xffffffull) * 5.9604645e-08f;      // [0, 1)
    const float z = sqrtf(-2.f * logf(u1)) * cosf(6.2831853f * u2);
    p[i] = from_f<T>(mean + std * z);
  }
}

}  // namespace

void rmsnorm(void* out, const void* x, int64_t xs, const void* w, DType wt, DType at, int64_t T, int64_t D, float eps,
             cudaStream_t s) {
  if (T == 0) return;
  const int threads = D >= 4096 ? 512 : (D >= 1024 ? 256 : 128);
  const bool vec = at == DType::BF16 && D % 8 == 0 && xs % 8 == 0 && aligned16(out) && aligned16(x);
  auto go = [&](auto wtag) {
    using WT = decltype(wtag);
    const WT* wp = static_cast<const WT*>(w);
    if (vec)
      launch(rmsnorm_vec_kernel<WT>, dim3(T), dim3(threads), 0, s, static_cast<bf16*>(out), static_cast<const bf16*>(x), xs, wp, int(D), eps);
    else if (at == DType::BF16)
      launch(rmsnorm_kernel<bf16, WT>, dim3(T), dim3(threads), 0, s, static_cast<bf16*>(out), static_cast<const bf16*>(x), xs, wp, int(D), eps);
    else
      launch(rmsnorm_kernel<float, WT>, dim3(T), dim3(threads), 0, s, static_cast<float*>(out), static_cast<const float*>(x), xs, wp, int(D), eps);
  };
  if (wt == DType::BF16) go(bf16{});
  else go(float{});
  DSV3_CUDA_KERNEL_CHECK();
}

bool add_rmsnorm_ok(const void* x, const void* a, const void* b, const void* out, int64_t D) {
  return D % 8 == 0 && aligned16(x) && aligned16(a) && aligned16(b) && aligned16(out);
}

void add_rmsnorm(bf16* x, const bf16* a, const bf16* b, bf16* out, const void* w, DType wt, int64_t T, int64_t D,
                 float eps, cudaStream_t s) {
  if (T == 0) return;
  const int threads = D >= 4096 ? 512 : (D >= 1024 ? 256 : 128);
  if (wt == DType::BF16)
    launch(add_rmsnorm_kernel<bf16>, dim3(T), dim3(threads), 0, s, x, a, b, out, static_cast<const bf16*>(w), int(D), eps);
  else
    launch(add_rmsnorm_kernel<float>, dim3(T), dim3(threads), 0, s, x, a, b, out, static_cast<const float*>(w), int(D), eps);
  DSV3_CUDA_KERNEL_CHECK();
}

void add(void* out, const void* a, const void* b, int64_t n, DType at, cudaStream_t s) {
  if (n == 0) return;
  if (at == DType::BF16 && n % 8 == 0 && aligned16(out) && aligned16(a) && aligned16(b))
    launch(add_vec_kernel, dim3(blocks_for(n / 8, 256)), dim3(256), 0, s, static_cast<bf16*>(out), static_cast<const bf16*>(a),
                                                          static_cast<const bf16*>(b), n / 8);
  else if (at == DType::BF16)
    launch(add_kernel<bf16>, dim3(blocks_for(n, 256)), dim3(256), 0, s, static_cast<bf16*>(out), static_cast<const bf16*>(a),
                                                        static_cast<const bf16*>(b), n);
  else
    launch(add_kernel<float>, dim3(blocks_for(n, 256)), dim3(256), 0, s, static_cast<float*>(out), static_cast<const float*>(a),
                                                         static_cast<const float*>(b), n);
  DSV3_CUDA_KERNEL_CHECK();
}

void silu_mul(void* out, const void* gate, const void* up, int64_t n, DType at, cudaStream_t s) {
  if (n == 0) return;
  if (at == DType::BF16 && n % 8 == 0 && aligned16(out) && aligned16(gate) && aligned16(up))
    launch(silu_mul_vec_kernel, dim3(blocks_for(n / 8, 256)), dim3(256), 0, s, static_cast<bf16*>(out), static_cast<const bf16*>(gate),
                                                               static_cast<const bf16*>(up), n / 8);
  else if (at == DType::BF16)
    launch(silu_mul_kernel<bf16>, dim3(blocks_for(n, 256)), dim3(256), 0, s, static_cast<bf16*>(out), static_cast<const bf16*>(gate),
                                                             static_cast<const bf16*>(up), n);
  else
    launch(silu_mul_kernel<float>, dim3(blocks_for(n, 256)), dim3(256), 0, s, static_cast<float*>(out), static_cast<const float*>(gate),
                                                              static_cast<const float*>(up), n);
  DSV3_CUDA_KERNEL_CHECK();
}

void copy_rows(void* dst, const int* dst_idx, int64_t dst_pitch, const void* src, const int* src_idx, int64_t src_pitch,
               int64_t nrows, int64_t row_bytes, cudaStream_t s) {
  if (nrows == 0 || row_bytes == 0) return;
  const uint64_t a = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | uint64_t(dst_pitch) |
                     uint64_t(src_pitch) | uint64_t(row_bytes);
  const int grid = int(nrows < 65535 ? nrows : 65535);
  auto go = [&](auto unit) {
    using U = decltype(unit);
    const int64_t units = row_bytes / int64_t(sizeof(U));
    const int threads = units >= 256 ? 256 : (units >= 64 ? 64 : 32);
    launch(copy_rows_kernel<U>, dim3(grid), dim3(threads), 0, s, static_cast<char*>(dst), dst_idx, dst_pitch,
                                                 static_cast<const char*>(src), src_idx, src_pitch, nrows, units);
  };
  if ((a & 15) == 0) go(uint4{});
  else if ((a & 7) == 0) go(uint2{});
  else if ((a & 3) == 0) go(uint32_t{});
  else if ((a & 1) == 0) go(uint16_t{});
  else go(uint8_t{});
  DSV3_CUDA_KERNEL_CHECK();
}

void embedding(void* out, DType at, const void* table, DType tt, const int* ids, int64_t T, int64_t H, cudaStream_t s) {
  if (T == 0) return;
  const int threads = H >= 1024 ? 256 : 128;
  if (at == DType::BF16 && tt == DType::BF16)
    launch(embedding_kernel<bf16, bf16>, dim3(T), dim3(threads), 0, s, static_cast<bf16*>(out), static_cast<const bf16*>(table), ids, int(H));
  else if (at == DType::BF16)
    launch(embedding_kernel<bf16, float>, dim3(T), dim3(threads), 0, s, static_cast<bf16*>(out), static_cast<const float*>(table), ids, int(H));
  else if (tt == DType::BF16)
    launch(embedding_kernel<float, bf16>, dim3(T), dim3(threads), 0, s, static_cast<float*>(out), static_cast<const bf16*>(table), ids, int(H));
  else
    launch(embedding_kernel<float, float>, dim3(T), dim3(threads), 0, s, static_cast<float*>(out), static_cast<const float*>(table), ids, int(H));
  DSV3_CUDA_KERNEL_CHECK();
}

void rope(void* x, DType at, int64_t T, int64_t n, int64_t stride, int64_t off, int64_t dr, const int* pos,
          const float* cos, const float* sin, bool interleave, cudaStream_t s) {
  const int64_t total = T * n * (dr / 2);
  if (total == 0) return;
  if (at == DType::BF16)
    launch(rope_kernel<bf16>, dim3(blocks_for(total, 256)), dim3(256), 0, s, static_cast<bf16*>(x), T, int(n), stride, int(off),
                                                             int(dr / 2), pos, cos, sin, interleave);
  else
    launch(rope_kernel<float>, dim3(blocks_for(total, 256)), dim3(256), 0, s, static_cast<float*>(x), T, int(n), stride, int(off),
                                                              int(dr / 2), pos, cos, sin, interleave);
  DSV3_CUDA_KERNEL_CHECK();
}

void f32_to_bf16(bf16* out, const float* in, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  launch(f32_to_bf16_kernel, dim3(blocks_for(n, 256)), dim3(256), 0, s, out, in, n);
  DSV3_CUDA_KERNEL_CHECK();
}

void bf16_to_f32(float* out, const bf16* in, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  launch(bf16_to_f32_kernel, dim3(blocks_for(n, 256)), dim3(256), 0, s, out, in, n);
  DSV3_CUDA_KERNEL_CHECK();
}

void fill_normal(void* p, DType t, int64_t n, float mean, float std, uint64_t seed, cudaStream_t s) {
  if (n == 0) return;
  if (t == DType::BF16)
    launch(fill_normal_kernel<bf16>, dim3(blocks_for(n, 256, 132 * 64)), dim3(256), 0, s, static_cast<bf16*>(p), n, mean, std, seed);
  else if (t == DType::F32)
    launch(fill_normal_kernel<float>, dim3(blocks_for(n, 256, 132 * 64)), dim3(256), 0, s, static_cast<float*>(p), n, mean, std, seed);
  else
    fail("fill_normal: dtype {} is not a float type", dtype_name(t));
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
