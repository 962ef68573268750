// Training kernels over rows and elements: fills and copies, RMSNorm, RoPE, SwiGLU, embedding, row gathers.
// The math is that of ops/cpu/backward_norm.cpp. Accumulation follows it: rmsnorm_backward dx +=, dw +=;
// embedding_backward dtable +=; rope backward in place; swiglu_backward overwrites.
// Determinism: no atomics. dw of RMSNorm sums fixed chunks of 64 rows, then the chunks in order (as the CPU);
// the embedding gradient of each vocabulary row is summed by one block in token order.
#include "ops/cuda/train_common.cuh"
#include "ops/cuda/train_kernels.h"

namespace dsv3::cuda::train {

namespace {

constexpr int64_t kRowChunk = 64;  // rows per partial sum of dw (the CPU reference's chunk)

__global__ void fill_kernel(float* x, float v, int64_t n) {
  DSV3_GRID_STRIDE(i, n) x[i] = v;
}

__global__ void copy_2d_kernel(float* dst, int64_t ds, const float* src, int64_t ss, int64_t rows, int64_t cols,
                               bool acc) {
  DSV3_GRID_STRIDE(i, rows * cols) {
    const int64_t r = i / cols, c = i % cols;
    const float v = src[r * ss + c];
    if (acc)
      dst[r * ds + c] += v;
    else
      dst[r * ds + c] = v;
  }
}

__global__ void add_kernel(float* y, const float* x, int64_t n) {
  DSV3_GRID_STRIDE(i, n) y[i] += x[i];
}

// One block per row: the sum of squares in fp64 (as the CPU), out = w * (x * r).
__global__ void rmsnorm_fwd_kernel(float* out, float* rstd, const float* x, int64_t xs, const float* w, int64_t D,
                                   double eps) {
  const int64_t t = blockIdx.x;
  const float* xr = x + t * xs;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) ss += double(xr[i]) * xr[i];
  ss = block_sum_d(ss);
  const float r = float(1.0 / sqrt(ss / double(D) + eps));
  if (threadIdx.x == 0) rstd[t] = r;
  float* o = out + t * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) o[i] = w[i] * (xr[i] * r);
}

// dx_ti += r w_i dout_ti - r^3 / D x_ti sum_j dout_tj w_j x_tj, one block per row.
__global__ void rmsnorm_bwd_dx_kernel(float* dx, int64_t dxs, const float* dout, const float* x, int64_t xs,
                                      const float* rstd, const float* w, int64_t D) {
  const int64_t t = blockIdx.x;
  const float* xr = x + t * xs;
  const float* dr = dout + t * D;
  double dot = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) dot += double(dr[i]) * w[i] * xr[i];
  dot = block_sum_d(dot);
  const float r = rstd[t];
  const float k = r * r * r * float(dot) / float(D);
  float* d = dx + t * dxs;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) d[i] += r * w[i] * dr[i] - k * xr[i];
}

// part[c, i] = sum over rows t of chunk c of dout_ti x_ti r_t (grid: column blocks x chunks).
__global__ void rmsnorm_bwd_part_kernel(float* part, const float* dout, const float* x, int64_t xs, const float* rstd,
                                        int64_t N, int64_t D) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, c = blockIdx.y;
  if (i >= D) return;
  float p = 0.f;
  const int64_t t1 = min(N, (c + 1) * kRowChunk);
  for (int64_t t = c * kRowChunk; t < t1; ++t) p += dout[t * D + i] * x[t * xs + i] * rstd[t];
  part[c * D + i] = p;
}

__global__ void rmsnorm_bwd_dw_kernel(float* dw, const float* part, int64_t nchunks, int64_t D) {
  DSV3_GRID_STRIDE(i, D) {
    float acc = dw[i];
    for (int64_t c = 0; c < nchunks; ++c) acc += part[c * D + i];
    dw[i] = acc;
  }
}

// One thread per (row, sub-row, pair): a' = a c - b s, b' = b c + a s; backward the transpose.
__global__ void rope_kernel(float* x, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t half,
                            const int32_t* pos, const float* cos, const float* sin, bool inter, bool bwd) {
  DSV3_GRID_STRIDE(i, N * n * half) {
    const int64_t j = i % half, th = i / half, t = th / n;
    const float c = cos[int64_t(pos[t]) * half + j], s = sin[int64_t(pos[t]) * half + j];
    float* v = x + th * stride + off;
    const int64_t i0 = inter ? 2 * j : j, i1 = inter ? 2 * j + 1 : j + half;
    const float a = v[i0], b = v[i1];
    if (!bwd) {
      v[i0] = a * c - b * s;
      v[i1] = b * c + a * s;
    } else {
      v[i0] = a * c + b * s;
      v[i1] = b * c - a * s;
    }
  }
}

__device__ __forceinline__ float sigm(float g) { return 1.f / (1.f + expf(-g)); }

__global__ void swiglu_fwd_kernel(float* out, const float* g, const float* u, int64_t n) {
  DSV3_GRID_STRIDE(i, n) out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

// du = dout g s; dg = dout u s (1 + g (1 - s)), s = sigmoid(g).
__global__ void swiglu_bwd_kernel(float* dg, float* du, const float* dout, const float* g, const float* u, int64_t n) {
  DSV3_GRID_STRIDE(i, n) {
    const float gi = g[i], ui = u[i], d = dout[i], s = sigm(gi);
    du[i] = d * gi * s;
    dg[i] = d * ui * s * (1.f + gi * (1.f - s));
  }
}

__global__ void embedding_fwd_kernel(float* out, const float* table, const int32_t* ids, int64_t N, int64_t H) {
  DSV3_GRID_STRIDE(i, N * H) out[i] = table[int64_t(ids[i / H]) * H + i % H];
}

// One block per distinct id; each thread owns columns and adds the id's tokens in order (the CPU's order).
__global__ void embedding_bwd_kernel(float* dtable, const float* dout, const int32_t* row_id, const int32_t* tok_off,
                                     const int32_t* tok, int64_t H) {
  const int64_t r = blockIdx.x;
  float* d = dtable + int64_t(row_id[r]) * H;
  const int32_t a = tok_off[r], b = tok_off[r + 1];
  for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
    float acc = d[c];
    for (int32_t i = a; i < b; ++i) acc += dout[int64_t(tok[i]) * H + c];
    d[c] = acc;
  }
}

__global__ void gather_rows_kernel(float* out, const float* src, const int32_t* rows, const float* scale, int64_t n,
                                   int64_t H, bool accumulate) {
  DSV3_GRID_STRIDE(i, n * H) {
    const int64_t r = i / H;
    const float v = src[int64_t(rows[r]) * H + i % H];
    const float x = scale ? scale[r] * v : v;
    out[i] = accumulate ? out[i] + x : x;
  }
}

}  // namespace

void fill(float* x, float value, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  fill_kernel<<<grid_for(n), 256, 0, s>>>(x, value, n);
  DSV3_CUDA_KERNEL_CHECK();
}

void copy_2d(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows, int64_t cols,
             bool accumulate, cudaStream_t s) {
  if (rows <= 0 || cols <= 0) return;
  copy_2d_kernel<<<grid_for(rows * cols), 256, 0, s>>>(dst, dst_stride, src, src_stride, rows, cols, accumulate);
  DSV3_CUDA_KERNEL_CHECK();
}

void add(float* y, const float* x, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  add_kernel<<<grid_for(n), 256, 0, s>>>(y, x, n);
  DSV3_CUDA_KERNEL_CHECK();
}

void rmsnorm_forward(float* out, float* rstd, const float* x, int64_t xs, const float* w, int64_t N, int64_t D,
                     double eps, cudaStream_t s) {
  if (N <= 0) return;
  rmsnorm_fwd_kernel<<<unsigned(N), 256, 0, s>>>(out, rstd, x, xs, w, D, eps);
  DSV3_CUDA_KERNEL_CHECK();
}

int64_t rmsnorm_backward_part_floats(int64_t N, int64_t D) { return (N + kRowChunk - 1) / kRowChunk * D; }

void rmsnorm_backward(float* dx, int64_t dxs, float* dw, const float* dout, const float* x, int64_t xs,
                      const float* rstd, const float* w, int64_t N, int64_t D, float* part, cudaStream_t s) {
  if (N <= 0 || D <= 0) return;
  const int64_t nchunks = (N + kRowChunk - 1) / kRowChunk;
  rmsnorm_bwd_part_kernel<<<dim3(unsigned((D + 127) / 128), unsigned(nchunks)), 128, 0, s>>>(part, dout, x, xs, rstd,
                                                                                             N, D);
  DSV3_CUDA_KERNEL_CHECK();
  rmsnorm_bwd_dw_kernel<<<grid_for(D), 256, 0, s>>>(dw, part, nchunks, D);
  DSV3_CUDA_KERNEL_CHECK();
  // dx last: dw has read dout and x, so dx may alias dout (the CPU reads a row fully before writing it).
  rmsnorm_bwd_dx_kernel<<<unsigned(N), 256, 0, s>>>(dx, dxs, dout, x, xs, rstd, w, D);
  DSV3_CUDA_KERNEL_CHECK();
}

void rope(float* x, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
          const float* cos, const float* sin, bool interleave, bool backward, cudaStream_t s) {
  const int64_t half = dr / 2;
  if (N <= 0 || n <= 0 || half <= 0) return;
  rope_kernel<<<grid_for(N * n * half), 256, 0, s>>>(x, N, n, stride, off, half, pos, cos, sin, interleave, backward);
  DSV3_CUDA_KERNEL_CHECK();
}

void swiglu_forward(float* out, const float* g, const float* u, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  swiglu_fwd_kernel<<<grid_for(n), 256, 0, s>>>(out, g, u, n);
  DSV3_CUDA_KERNEL_CHECK();
}

void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u, int64_t n,
                     cudaStream_t s) {
  if (n <= 0) return;
  swiglu_bwd_kernel<<<grid_for(n), 256, 0, s>>>(dg, du, dout, g, u, n);
  DSV3_CUDA_KERNEL_CHECK();
}

void embedding_forward(float* out, const float* table, const int32_t* ids, int64_t N, int64_t H, cudaStream_t s) {
  if (N <= 0 || H <= 0) return;
  embedding_fwd_kernel<<<grid_for(N * H), 256, 0, s>>>(out, table, ids, N, H);
  DSV3_CUDA_KERNEL_CHECK();
}

void embedding_backward(float* dtable, const float* dout, const int32_t* row_id, const int32_t* tok_off,
                        const int32_t* tok, int64_t nrows, int64_t H, cudaStream_t s) {
  if (nrows <= 0 || H <= 0) return;
  embedding_bwd_kernel<<<unsigned(nrows), 256, 0, s>>>(dtable, dout, row_id, tok_off, tok, H);
  DSV3_CUDA_KERNEL_CHECK();
}

void gather_rows(float* out, const float* src, const int32_t* rows, int64_t n, int64_t H, cudaStream_t s,
                 bool accumulate) {
  if (n <= 0 || H <= 0) return;
  gather_rows_kernel<<<grid_for(n * H), 256, 0, s>>>(out, src, rows, nullptr, n, H, accumulate);
  DSV3_CUDA_KERNEL_CHECK();
}

void gather_rows_scaled(float* out, const float* src, const int32_t* rows, const float* scale, int64_t n, int64_t H,
                        cudaStream_t s) {
  if (n <= 0 || H <= 0) return;
  gather_rows_kernel<<<grid_for(n * H), 256, 0, s>>>(out, src, rows, scale, n, H, false);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda::train
