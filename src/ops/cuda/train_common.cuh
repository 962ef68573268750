#pragma once
// Small helpers shared by the training kernels (train_*.cu): launch sizes and block reductions in fp64.
// The training kernels use plain launches (no programmatic dependent launch): they interleave with cuBLAS
// calls, and a step has a few hundred launches, not thousands.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ops/cuda/common.cuh"

namespace dsv3::cuda::train {

// Blocks for a grid-stride loop over n elements with `threads` per block.
inline unsigned grid_for(int64_t n, int threads = 256) {
  return unsigned(std::clamp<int64_t>((n + threads - 1) / threads, 1, 65536));
}

#define DSV3_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide fp64 sum, blockDim.x a multiple of 32; every thread gets the result. The tree is fixed by the
// block size, so the result is deterministic.
__device__ __forceinline__ double block_sum_d(double v) {
  __shared__ double part_d[32];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32, nw = blockDim.x / 32;
  v = warp_sum_d(v);
  __syncthreads();  // part_d may still be read by a previous call
  if (lane == 0) part_d[w] = v;
  __syncthreads();
  double s = lane < nw ? part_d[lane] : 0.0;
  return warp_sum_d(s);
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float part_m[32];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32, nw = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) part_m[w] = v;
  __syncthreads();
  float s = lane < nw ? part_m[lane] : -INFINITY;
  return warp_max(s);
}

}  // namespace dsv3::cuda::train
