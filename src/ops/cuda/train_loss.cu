// Cross-entropy with its gradient in one kernel (ops/cpu/backward_loss.cpp): one block per row of logits.
// loss_t = max + log(sum exp(z - max)) - z_target; dz = scale (softmax(z) - onehot(target)); rows with a
// negative target get a zero gradient and no loss. dlogits may alias logits: every element is read and written
// by the same thread, and z_target is read before the first barrier, before anything is written.
// The per-row losses and hits go to device arrays the host adds in row order (deterministic).
#include "ops/cuda/train_common.cuh"
#include "ops/cuda/train_kernels.h"

namespace dsv3::cuda::train {

namespace {

__global__ void cross_entropy_kernel(float* dz, const float* z, const int32_t* targets, int64_t V, double scale,
                                     double* row_loss, int32_t* hit) {
  const int64_t t = blockIdx.x;
  const float* zr = z + t * V;
  float* dr = dz + t * V;
  const int32_t y = targets[t];
  if (y < 0 || y >= V) {  // the whole block takes this branch (no barrier skipped)
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) dr[v] = 0.f;
    if (threadIdx.x == 0) row_loss[t] = 0, hit[t] = 0;
    return;
  }
  const float zy = zr[y];
  float mx = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, zr[v]);
  mx = block_max(mx);
  double sum = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) sum += double(expf(zr[v] - mx));
  sum = block_sum_d(sum);
  const float k = float(scale / sum);
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float e = expf(zr[v] - mx) * k;
    dr[v] = v == y ? e - float(scale) : e;
  }
  if (threadIdx.x == 0) {
    row_loss[t] = double(mx) + log(sum) - double(zy);
    hit[t] = zy == mx;  // the target is (one of) the argmax, as the CPU counts it
  }
}

}  // namespace

void cross_entropy(float* dlogits, const float* logits, const int32_t* targets, int64_t N, int64_t V, double scale,
                   double* row_loss, int32_t* hit, cudaStream_t s) {
  if (N <= 0) return;
  cross_entropy_kernel<<<unsigned(N), 512, 0, s>>>(dlogits, logits, targets, V, scale, row_loss, hit);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda::train
