// The optimizer's kernels over the flat parameter buffer (math of train/optimizer.cpp): the sum of squares of
// the gradients (for clipping) and one fused AdamW update.
// Determinism: sum_squares uses a fixed grid (kSumSquaresBlocks x 256 threads) whatever the device, each thread
// a fixed set of elements, a fixed reduction tree per block, and the host adds the block sums in order.
#include "ops/cuda/train_common.cuh"
#include "ops/cuda/train_kernels.h"

namespace dsv3::cuda::train {

namespace {

__global__ void sum_squares_kernel(const float* x, int64_t n, double* part) {
  double s = 0;
  DSV3_GRID_STRIDE(i, n) s += double(x[i]) * x[i];
  s = block_sum_d(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// PyTorch's AdamW: m, v updated; p = p decay - step_size m / (sqrt(v) inv_sqrt_bc2 + eps).
__global__ void adamw_kernel(float* p, const float* grads, float* m, float* v, int64_t n, float b1, float b2, float eps,
                             float gs, float decay, float step_size, float inv_sqrt_bc2) {
  DSV3_GRID_STRIDE(i, n) {
    const float g = grads[i] * gs;
    const float mi = b1 * m[i] + (1.f - b1) * g;
    const float vi = b2 * v[i] + (1.f - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
  }
}

}  // namespace

void sum_squares(const float* x, int64_t n, double* part, cudaStream_t s) {
  sum_squares_kernel<<<kSumSquaresBlocks, 256, 0, s>>>(x, n, part);
  DSV3_CUDA_KERNEL_CHECK();
}

void adamw(float* params, const float* grads, float* m, float* v, int64_t n, float b1, float b2, float eps,
           float grad_scale, float decay, float step_size, float inv_sqrt_bc2, cudaStream_t s) {
  if (n <= 0) return;
  adamw_kernel<<<grid_for(n), 256, 0, s>>>(params, grads, m, v, n, b1, b2, eps, grad_scale, decay, step_size,
                                           inv_sqrt_bc2);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda::train
