// The non-GEMM parts of the causal MLA attention core for training (the products are cuBLAS calls in
// cuda_train_backend.cpp; the math is ops/cpu/backward_attention.cpp). Everything works on one sequence of T
// tokens with all nh heads at once: scores S/P [nh, T, T] (row (h, i) at (h T + i) T), lse and D [nh, T].
#include "ops/cuda/train_common.cuh"
#include "ops/cuda/train_kernels.h"

namespace dsv3::cuda::train {

namespace {

// One block per score row (h, i): keys j <= i. P = exp(S - max) / sum, zeros above the diagonal,
// lse = max + log(sum).
__global__ void causal_softmax_fwd_kernel(float* SP, float* lse, int64_t T) {
  const int64_t row = blockIdx.x, i = row % T;
  float* r = SP + row * T;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, r[j]);
  mx = block_max(mx);
  double sum = 0;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) sum += double(expf(r[j] - mx));
  sum = block_sum_d(sum);
  const float inv = float(1.0 / sum);
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) r[j] = j <= i ? expf(r[j] - mx) * inv : 0.f;
  if (threadIdx.x == 0) lse[row] = mx + float(log(sum));
}

// One block per row (h, i): P = exp(S - lse) on j <= i; D = dO . O of that query and head.
__global__ void causal_softmax_recompute_kernel(float* SP, float* D, const float* lse, const float* dout,
                                                const float* out, int64_t nh, int64_t T, int64_t dv, int64_t os) {
  const int64_t row = blockIdx.x, h = row / T, i = row % T;
  float* r = SP + row * T;
  const float l = lse[row];
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) r[j] = j <= i ? expf(r[j] - l) : 0.f;
  const float* a = dout + i * os + h * dv;
  const float* b = out + i * os + h * dv;
  double d = 0;
  for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) d += double(a[c]) * b[c];
  d = block_sum_d(d);
  if (threadIdx.x == 0) D[row] = float(d);
}

__global__ void softmax_bwd_kernel(float* dP, const float* P, const float* D, int64_t T, int64_t n) {
  DSV3_GRID_STRIDE(k, n) {
    const int64_t row = k / T, j = k % T, i = row % T;
    dP[k] = j <= i ? P[k] * (dP[k] - D[row]) : 0.f;
  }
}

__global__ void sum_heads_kernel(float* out, const float* part, int64_t nh, int64_t n) {
  DSV3_GRID_STRIDE(k, n) {
    float acc = 0.f;
    for (int64_t h = 0; h < nh; ++h) acc += part[h * n + k];
    out[k] = acc;
  }
}

unsigned row_threads(int64_t T) { return T >= 512 ? 256 : T >= 128 ? 128 : 64; }

}  // namespace

void causal_softmax_forward(float* SP, float* lse, int64_t nh, int64_t T, cudaStream_t s) {
  if (nh * T <= 0) return;
  causal_softmax_fwd_kernel<<<unsigned(nh * T), row_threads(T), 0, s>>>(SP, lse, T);
  DSV3_CUDA_KERNEL_CHECK();
}

void causal_softmax_recompute(float* SP, float* D, const float* lse, const float* dout, const float* out, int64_t nh,
                              int64_t T, int64_t dv, int64_t os, cudaStream_t s) {
  if (nh * T <= 0) return;
  causal_softmax_recompute_kernel<<<unsigned(nh * T), row_threads(T), 0, s>>>(SP, D, lse, dout, out, nh, T, dv, os);
  DSV3_CUDA_KERNEL_CHECK();
}

void softmax_backward(float* dP, const float* P, const float* D, int64_t nh, int64_t T, cudaStream_t s) {
  const int64_t n = nh * T * T;
  if (n <= 0) return;
  softmax_bwd_kernel<<<grid_for(n), 256, 0, s>>>(dP, P, D, T, n);
  DSV3_CUDA_KERNEL_CHECK();
}

void sum_heads(float* dkpe, const float* part, int64_t nh, int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  sum_heads_kernel<<<grid_for(n), 256, 0, s>>>(dkpe, part, nh, n);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda::train
