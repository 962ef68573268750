#pragma once
// Raw device copies for the kernel-level CUDA tests (test_cuda_grouped_gemm.cpp, test_cuda_fp8.cpp), which call the
// kernels' host entry points directly instead of going through a backend. Include only under DSV3_HAVE_CUDA.
// The allocations are left to the process (tests are short).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

namespace dsv3::test {

template <typename T>
T* dev_copy(const std::vector<T>& h) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  // A copy from pageable memory may return before its DMA lands, and the backend's stream does not wait for the
  // legacy stream: finish it before a kernel on that stream reads the buffer.
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return d;
}
template <typename T>
std::vector<T> host_copy(const T* d, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

}  // namespace dsv3::test
