// The materialized attention path for training (fp32 mode, DSV3_CUDA_TRAIN_ATTN=naive, and head dims the fused
// kernels of train_flash_attention.cu do not instantiate). The non-GEMM parts of the causal MLA attention core
// (the products are cuBLAS calls in cuda_train_backend.cpp; the math is ops/cpu/backward_attention.cpp). The
// softmax kernels work on one sequence of T tokens with all nh heads at once: scores S/P [nh, T, T] (row (h, i)
// at (h T + i) T), lse and D [nh, T].
// The keys are concatenated per head, Kc [n, nh, dn + dr] = [k_nope | k_pe], so that S = Q Kc^T, dQ = dS Kc and
// dKc = dS^T Q are one product each (every product reads the T x T matrix once, and those passes dominate).
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

// Kc[t, h, :] = [kv[t, h, :dn] | kpe[t, :]] for t < n.
__global__ void concat_keys_kernel(float* Kc, const float* kv, const float* kpe, int64_t n, int64_t nh, int64_t dn,
                                   int64_t dr, int64_t dv) {
  const int64_t w = dn + dr;
  DSV3_GRID_STRIDE(i, n * nh * w) {
    const int64_t c = i % w, th = i / w, t = th / nh, h = th % nh;
    Kc[i] = c < dn ? kv[t * nh * (dn + dv) + h * (dn + dv) + c] : kpe[t * dr + c - dn];
  }
}

// From dKc [T, nh, dn + dr]: dkv[t, h, :dn] = dKc[t, h, :dn] (the v part is written elsewhere) and
// dkpe[t, j] = sum over h of dKc[t, h, dn + j], in head order.
__global__ void split_key_grads_kernel(float* dkv, float* dkpe, const float* dKc, int64_t T, int64_t nh, int64_t dn,
                                       int64_t dr, int64_t dv) {
  const int64_t w = dn + dr, cols = nh * dn + dr;
  DSV3_GRID_STRIDE(i, T * cols) {
    const int64_t t = i / cols, c = i % cols;
    const float* src = dKc + t * nh * w;
    if (c < nh * dn) {
      const int64_t h = c / dn, j = c % dn;
      dkv[t * nh * (dn + dv) + h * (dn + dv) + j] = src[h * w + j];
    } else {
      const int64_t j = c - nh * dn;
      float acc = 0.f;
      for (int64_t h = 0; h < nh; ++h) acc += src[h * w + dn + j];
      dkpe[t * dr + j] = acc;
    }
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

void concat_keys(float* Kc, const float* kv, const float* kpe, int64_t n, int64_t nh, int64_t dn, int64_t dr,
                 int64_t dv, cudaStream_t s) {
  if (n * nh * (dn + dr) <= 0) return;
  concat_keys_kernel<<<grid_for(n * nh * (dn + dr)), 256, 0, s>>>(Kc, kv, kpe, n, nh, dn, dr, dv);
  DSV3_CUDA_KERNEL_CHECK();
}

void split_key_grads(float* dkv, float* dkpe, const float* dKc, int64_t T, int64_t nh, int64_t dn, int64_t dr,
                     int64_t dv, cudaStream_t s) {
  if (T * (nh * dn + dr) <= 0) return;
  split_key_grads_kernel<<<grid_for(T * (nh * dn + dr)), 256, 0, s>>>(dkv, dkpe, dKc, T, nh, dn, dr, dv);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda::train
