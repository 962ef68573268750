// Checkpoint tensors into the device's flat parameter buffer (Backend::write_weights_fp8): fp8 e4m3 weights
// [N, K] are uploaded as they are stored (1 byte per element) with their fp32 block scales and dequantized here,
// one thread per element: out = float(e4m3) * scale[(r / bn) * ceil(K / bk) + c / bk], the same single fp32
// product as the host path, so both give identical bits; written as fp32 or bf16 (round to nearest even).
#include <cuda_fp8.h>

#include "ops/cuda/common.cuh"

namespace dsv3::cuda {

namespace {

template <typename Out>
__global__ void dequant_fp8_kernel(Out* out, const uint8_t* w8, const float* scale, int64_t N, int64_t K, int64_t bn,
                                   int64_t bk) {
  const int64_t sk = (K + bk - 1) / bk;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * K; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / K, c = i - r * K;
    __nv_fp8_e4m3 v;
    v.__x = w8[i];
    const float x = float(v) * scale[(r / bn) * sk + c / bk];
    if constexpr (sizeof(Out) == 4) out[i] = x;
    else out[i] = __float2bfloat16_rn(x);
  }
}

}  // namespace

void dequant_fp8(void* out, DType out_t, const uint8_t* w8, const float* scale, int64_t N, int64_t K, int64_t bn,
                 int64_t bk, cudaStream_t s) {
  if (N * K == 0) return;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((N * K + threads - 1) / threads, 65536));
  if (out_t == DType::F32)
    dequant_fp8_kernel<<<blocks, threads, 0, s>>>(static_cast<float*>(out), w8, scale, N, K, bn, bk);
  else
    dequant_fp8_kernel<<<blocks, threads, 0, s>>>(static_cast<bf16*>(out), w8, scale, N, K, bn, bk);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
