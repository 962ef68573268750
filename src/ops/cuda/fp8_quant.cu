// FP8 quantization kernels (see fp8.h). The results are bit-identical to core/fp8.cpp: the amax is exact, the scale
// is an IEEE division (amax / 448, __fdiv_rn), the code is cvt.rn.satfinite.e4m3 of an IEEE division (x / scale).
#include <cuda_fp8.h>

#include <cstdint>

#include "ops/cuda/common.cuh"
#include "ops/cuda/fp8.h"

namespace dsv3::cuda {

namespace {

// core/fp8.h's scale_from_amax: at least 2^-126, so a tile of tiny values never gets a zero scale.
__device__ __forceinline__ float scale_of(float amax) {
  return amax > 0.f ? fmaxf(__fdiv_rn(amax, 448.f), 1.17549435e-38f) : 1.f;
}
__device__ __forceinline__ uint8_t e4m3(float v) {
  return uint8_t(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}
template <typename T> __device__ __forceinline__ float load_f(const T* p, int64_t i) { return to_f<T>(p[i]); }

// One warp per (row, 128-column tile): 4 elements per lane.
template <typename T>
__global__ void quantize_1x128_kernel(uint8_t* codes, float* scales, int64_t scales_ld, const T* x, int64_t ldx,
                                      int64_t M, int64_t K) {
  const int64_t kt = (K + 127) / 128;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= M * kt) return;
  const int64_t m = warp / kt, t = warp % kt, k0 = t * 128;
  float v[4];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + lane * 4 + j;
    v[j] = k < K ? load_f(x, m * ldx + k) : 0.f;
    amax = fmaxf(amax, fabsf(v[j]));
  }
  amax = warp_max(amax);
  const float s = scale_of(amax);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + lane * 4 + j;
    if (k < K) codes[m * K + k] = e4m3(__fdiv_rn(v[j], s));
  }
  if (lane == 0) {
    if (scales_ld == 0) scales[m * kt + t] = s;
    else scales[t * scales_ld + m] = s;
  }
}

__global__ void fill_pad_kernel(float* scales, int64_t scales_ld, int64_t M, int64_t kt) {
  const int64_t pad = scales_ld - M;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < kt * pad; i += int64_t(gridDim.x) * blockDim.x)
    scales[(i / pad) * scales_ld + M + i % pad] = 1.f;
}

// One block of 256 threads per 128 x 128 block (z = matrix of the batch).
template <typename T>
__global__ void quantize_128x128_kernel(uint8_t* codes, float* scales, const T* w, int64_t N, int64_t K) {
  const int64_t nt = (N + 127) / 128, kt = (K + 127) / 128;
  const int64_t bn = blockIdx.y, bk = blockIdx.x, z = blockIdx.z;
  w += z * N * K;
  codes += z * N * K;
  scales += z * nt * kt;
  const int64_t n0 = bn * 128, k0 = bk * 128;
  const int tid = threadIdx.x;
  // Each thread: column k0 + (tid % 128), rows n0 + (tid / 128) + 2 i.
  const int64_t k = k0 + (tid & 127);
  float amax = 0.f;
  for (int i = tid >> 7; i < 128; i += 2) {
    const int64_t n = n0 + i;
    if (n < N && k < K) amax = fmaxf(amax, fabsf(load_f(w, n * K + k)));
  }
  __shared__ float red[8];
  amax = warp_max(amax);
  if ((tid & 31) == 0) red[tid >> 5] = amax;
  __syncthreads();
  amax = red[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) amax = fmaxf(amax, red[i]);
  const float s = scale_of(amax);
  if (tid == 0) scales[bn * kt + bk] = s;
  for (int i = tid >> 7; i < 128; i += 2) {
    const int64_t n = n0 + i;
    if (n < N && k < K) codes[n * K + k] = e4m3(__fdiv_rn(load_f(w, n * K + k), s));
  }
}

template <typename T>
__global__ void dequantize_128x128_kernel(T* out, const uint8_t* codes, const float* scales, int64_t N, int64_t K) {
  const int64_t kt = (K + 127) / 128;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * K; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i % K;
    __nv_fp8_e4m3 c;
    c.__x = codes[i];
    out[i] = from_f<T>(float(c) * scales[(n / 128) * kt + k / 128]);
  }
}

__global__ void pad_scale_rows_kernel(float* out, const float* in, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * ld; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / ld, c = i % ld;
    out[i] = c < cols ? in[r * cols + c] : 1.f;
  }
}

// 128x128 blocks of w written transposed: one block of 256 threads per block (z = matrix of the batch), the
// amax as in quantize_128x128_kernel, the codes staged in shared memory [k][n] and written as rows of w^T (16
// bytes per store where N allows).
__global__ void quantize_128x128_t_kernel(uint8_t* codes_t, float* scales_t, const float* w, int64_t N, int64_t K) {
  const int64_t nt = (N + 127) / 128, kt = (K + 127) / 128;
  const int64_t bn = blockIdx.y, bk = blockIdx.x, z = blockIdx.z;
  w += z * N * K;
  codes_t += z * N * K;
  scales_t += z * nt * kt;
  const int64_t n0 = bn * 128, k0 = bk * 128;
  const int tid = threadIdx.x, kl = tid & 127;
  const int64_t k = k0 + kl;
  float amax = 0.f;
  for (int i = tid >> 7; i < 128; i += 2) {
    const int64_t n = n0 + i;
    if (n < N && k < K) amax = fmaxf(amax, fabsf(w[n * K + k]));
  }
  __shared__ float red[8];
  __shared__ alignas(16) uint8_t q[128][144];  // [k - k0][n - n0]; rows of 144 bytes keep 16-byte alignment
  amax = warp_max(amax);
  if ((tid & 31) == 0) red[tid >> 5] = amax;
  __syncthreads();
  amax = red[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) amax = fmaxf(amax, red[i]);
  const float s = scale_of(amax);
  if (tid == 0) scales_t[bk * nt + bn] = s;
  for (int i = tid >> 7; i < 128; i += 2) {
    const int64_t n = n0 + i;
    q[kl][i] = n < N && k < K ? e4m3(__fdiv_rn(w[n * K + k], s)) : uint8_t(0);
  }
  __syncthreads();
  // Output row k0 + r, bytes n0 + 64 h .. + 64 (thread: r = tid / 2, h = tid % 2).
  const int r = tid >> 1, h = tid & 1;
  const int64_t ko = k0 + r;
  if (ko >= K) return;
  uint8_t* dst = codes_t + ko * N + n0 + 64 * h;
  const int64_t left = N - (n0 + 64 * h);
  if (N % 16 == 0) {
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (16 * c < left) *reinterpret_cast<uint4*>(dst + 16 * c) = *reinterpret_cast<const uint4*>(&q[r][64 * h + 16 * c]);
  } else {
    for (int b = 0; b < 64 && b < left; ++b) dst[b] = q[r][64 * h + b];
  }
}

// 128x1 tiles written transposed (see fp8.h): one block of 256 threads per (tile, 32 columns of x). Loads are rows
// of 32 floats; each column's amax is reduced over the 8 warps; each thread then writes 16 codes of one column.
__global__ void quantize_128x1_t_kernel(uint8_t* codes_t, int64_t ldq, float* scales_t, int64_t lds, const float* x,
                                        int64_t ldx, int64_t K, const ColTile* tiles) {
  const ColTile t = tiles[blockIdx.x];
  const int64_t k0 = int64_t(blockIdx.y) * 32;
  __shared__ float v[128][33];
  __shared__ float red[8][32];
  __shared__ float sc[32];
  const int tid = threadIdx.x, c = tid & 31, r0 = tid >> 5;
  const int64_t k = k0 + c;
  float amax = 0.f;
#pragma unroll 4
  for (int i = 0; i < 16; ++i) {
    const int r = r0 + 8 * i;
    const float val = r < t.rows && k < K ? x[int64_t(t.row0 + r) * ldx + k] : 0.f;
    v[r][c] = val;
    amax = fmaxf(amax, fabsf(val));
  }
  red[r0][c] = amax;
  __syncthreads();
  if (tid < 32) {
    float a = red[0][tid];
#pragma unroll
    for (int j = 1; j < 8; ++j) a = fmaxf(a, red[j][tid]);
    const float sv = scale_of(a);
    sc[tid] = sv;
    if (k0 + tid < K) scales_t[(k0 + tid) * lds + t.scale_col] = sv;
  }
  __syncthreads();
  const int cc = tid >> 3, j = tid & 7;
  const int64_t kk = k0 + cc;
  const int width = (t.rows + 15) & ~15;
  if (kk >= K || 16 * j >= width) return;
  const float sv = sc[cc];
  uint32_t wd[4];
#pragma unroll
  for (int qd = 0; qd < 4; ++qd) {
    wd[qd] = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) wd[qd] |= uint32_t(e4m3(__fdiv_rn(v[16 * j + 4 * qd + b][cc], sv))) << (8 * b);
  }
  *reinterpret_cast<uint4*>(codes_t + kk * ldq + t.col0 + 16 * j) = make_uint4(wd[0], wd[1], wd[2], wd[3]);
}

__global__ void add_partials_kernel(float* out, const float* parts, int64_t n, int S) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int j = 0; j < S; ++j) v += parts[j * n + i];
    out[i] += v;
  }
}

__global__ void dequantize_operand_kernel(float* out, const uint8_t* codes, int64_t ldq, const float* scales,
                                          int64_t lds, int64_t rows, int64_t cols, int row_div) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * cols;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    __nv_fp8_e4m3 q;
    q.__x = codes[r * ldq + c];
    out[i] = float(q) * scales[(r / row_div) * lds + c / 128];
  }
}

int blocks_for(int64_t n, int threads) { return int(std::min<int64_t>((n + threads - 1) / threads, 65535)); }

}  // namespace

void quantize_1x128(uint8_t* codes, float* scales, int64_t scales_ld, const void* x, DType xt, int64_t ldx, int64_t M,
                    int64_t K, cudaStream_t s) {
  if (M <= 0 || K <= 0) return;
  DSV3_CHECK(scales_ld == 0 || scales_ld >= M, "quantize_1x128: scale stride {} for {} rows", scales_ld, M);
  const int64_t kt = (K + 127) / 128, warps = M * kt;
  const int blocks = int((warps + 7) / 8);
  if (xt == DType::BF16)
    quantize_1x128_kernel<bf16><<<blocks, 256, 0, s>>>(codes, scales, scales_ld, static_cast<const bf16*>(x), ldx, M, K);
  else if (xt == DType::F32)
    quantize_1x128_kernel<float><<<blocks, 256, 0, s>>>(codes, scales, scales_ld, static_cast<const float*>(x), ldx, M, K);
  else
    fail("quantize_1x128: unsupported input dtype {}", dtype_name(xt));
  DSV3_CUDA_KERNEL_CHECK();
  if (scales_ld > M) {
    fill_pad_kernel<<<blocks_for(kt * (scales_ld - M), 256), 256, 0, s>>>(scales, scales_ld, M, kt);
    DSV3_CUDA_KERNEL_CHECK();
  }
}

void quantize_128x128(uint8_t* codes, float* scales, const void* w, DType wt, int64_t N, int64_t K, int64_t batch,
                      cudaStream_t s) {
  if (N <= 0 || K <= 0 || batch <= 0) return;
  dim3 grid(unsigned((K + 127) / 128), unsigned((N + 127) / 128), unsigned(batch));
  if (wt == DType::BF16)
    quantize_128x128_kernel<bf16><<<grid, 256, 0, s>>>(codes, scales, static_cast<const bf16*>(w), N, K);
  else if (wt == DType::F32)
    quantize_128x128_kernel<float><<<grid, 256, 0, s>>>(codes, scales, static_cast<const float*>(w), N, K);
  else
    fail("quantize_128x128: unsupported input dtype {}", dtype_name(wt));
  DSV3_CUDA_KERNEL_CHECK();
}

void dequantize_128x128(void* out, DType ot, const uint8_t* codes, const float* scales, int64_t N, int64_t K,
                        cudaStream_t s) {
  if (N <= 0 || K <= 0) return;
  const int blocks = blocks_for(N * K, 256);
  if (ot == DType::BF16)
    dequantize_128x128_kernel<bf16><<<blocks, 256, 0, s>>>(static_cast<bf16*>(out), codes, scales, N, K);
  else if (ot == DType::F32)
    dequantize_128x128_kernel<float><<<blocks, 256, 0, s>>>(static_cast<float*>(out), codes, scales, N, K);
  else
    fail("dequantize_128x128: unsupported output dtype {}", dtype_name(ot));
  DSV3_CUDA_KERNEL_CHECK();
}

void quantize_128x128_t(uint8_t* codes_t, float* scales_t, const float* w, int64_t N, int64_t K, int64_t batch,
                        cudaStream_t s) {
  if (N <= 0 || K <= 0 || batch <= 0) return;
  dim3 grid(unsigned((K + 127) / 128), unsigned((N + 127) / 128), unsigned(batch));
  quantize_128x128_t_kernel<<<grid, 256, 0, s>>>(codes_t, scales_t, w, N, K);
  DSV3_CUDA_KERNEL_CHECK();
}

void quantize_128x1_t(uint8_t* codes_t, int64_t ldq, float* scales_t, int64_t lds, const float* x, int64_t ldx,
                      int64_t K, const ColTile* tiles, int64_t n_tiles, cudaStream_t s) {
  if (K <= 0 || n_tiles <= 0) return;
  DSV3_CHECK(ldq % 16 == 0 && (reinterpret_cast<uintptr_t>(codes_t) & 15) == 0,
             "quantize_128x1_t: code rows must be 16-byte aligned (ld {})", ldq);
  DSV3_CHECK(n_tiles <= INT32_MAX && (K + 31) / 32 <= 65535, "quantize_128x1_t: {} tiles x {} columns", n_tiles, K);
  dim3 grid(unsigned(n_tiles), unsigned((K + 31) / 32));
  quantize_128x1_t_kernel<<<grid, 256, 0, s>>>(codes_t, ldq, scales_t, lds, x, ldx, K, tiles);
  DSV3_CUDA_KERNEL_CHECK();
}

void add_partials(float* out, const float* parts, int64_t n, int S, cudaStream_t s) {
  if (n <= 0 || S <= 0) return;
  add_partials_kernel<<<blocks_for(n, 256), 256, 0, s>>>(out, parts, n, S);
  DSV3_CUDA_KERNEL_CHECK();
}

void dequantize_operand(float* out, const uint8_t* codes, int64_t ldq, const float* scales, int64_t lds, int64_t rows,
                        int64_t cols, int row_div, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return;
  dequantize_operand_kernel<<<blocks_for(rows * cols, 256), 256, 0, s>>>(out, codes, ldq, scales, lds, rows, cols,
                                                                         row_div);
  DSV3_CUDA_KERNEL_CHECK();
}

void pad_scale_rows(float* out, const float* in, int64_t rows, int64_t cols, cudaStream_t s) {
  const int64_t ld = round_up4(cols);
  if (rows <= 0 || cols <= 0) return;
  pad_scale_rows_kernel<<<blocks_for(rows * ld, 256), 256, 0, s>>>(out, in, rows, cols, ld);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
