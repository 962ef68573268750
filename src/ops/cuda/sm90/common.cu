// Helpers of the sm90 grouped GEMMs that need no CUTLASS instantiation: device query and the scale layouts.
#include "ops/cuda/common.cuh"
#include "ops/cuda/sm90/grouped_impl.cuh"

namespace dsv3::cuda::sm90 {

namespace detail {
int sm_count() {
  static int cached[64] = {};
  int dev = 0;
  DSV3_CUDA_CHECK(cudaGetDevice(&dev));
  int& c = cached[dev & 63];
  if (c == 0) DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev));
  return c;
}
}  // namespace detail

size_t expert_workspace_bytes(int groups, bool fp8) {
  return fp8 ? detail::expert_workspace_bytes_fp8(groups) : detail::expert_workspace_bytes_bf16(groups);
}

bool available() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
  return major == 9 && minor == 0;  // the kernels are sm_90a only
}

namespace {

// One thread per (row, tile): the expert of row r is found by binary search over the E + 1 offsets.
__global__ void regroup_kernel(float* out, const float* in, const int* off, int E, int64_t P, int64_t kt) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= P * kt) return;
  const int64_t r = i / kt, t = i % kt;
  int lo = 0, hi = E;  // largest e with off[e] <= r
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (off[mid] <= r) lo = mid;
    else hi = mid;
  }
  const int64_t o = off[lo], n = off[lo + 1] - o;
  out[o * kt + t * n + (r - o)] = in[i];
}

__global__ void transpose_scales_kernel(float* out, const float* in, int64_t nt, int64_t kt, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / (nt * kt), rem = i % (nt * kt), n = rem / kt, k = rem % kt;
  out[b * nt * kt + k * nt + n] = in[i];
}

}  // namespace

void regroup_act_scales(float* out, const float* in, const int* offsets, int E, int64_t P, int64_t kt,
                        cudaStream_t s) {
  if (P <= 0 || kt <= 0) return;
  const int64_t n = P * kt;
  regroup_kernel<<<unsigned((n + 255) / 256), 256, 0, s>>>(out, in, offsets, E, P, kt);
  DSV3_CUDA_KERNEL_CHECK();
}

void transpose_block_scales(float* out, const float* in, int64_t batch, int64_t nt, int64_t kt, cudaStream_t s) {
  const int64_t n = batch * nt * kt;
  if (n <= 0) return;
  transpose_scales_kernel<<<unsigned((n + 255) / 256), 256, 0, s>>>(out, in, nt, kt, n);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda::sm90
