#pragma once
// Side streams for independent products that are each too small to fill the GPU: the prefill MoE runs one
// GEMM per active expert, and an expert with 50 tokens covers a tenth of the SMs. The fan forks from the
// backend's stream (an event), spreads work over its side streams, each with its own cuBLAS handle and
// workspace (a handle's workspace must not be shared by concurrent kernels), and joins back (events), so
// the backend's one-stream ordering still holds for everything before and after.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <vector>

namespace dsv3::cuda {

class StreamFan {
 public:
  StreamFan(int dev, int n);  // n side streams on device dev
  ~StreamFan();
  StreamFan(const StreamFan&) = delete;
  StreamFan& operator=(const StreamFan&) = delete;

  int size() const { return int(streams_.size()); }
  cublasHandle_t blas(int i) const { return blas_[size_t(i)]; }
  void fork(cudaStream_t main);  // side streams wait for the work issued on main so far
  void join(cudaStream_t main);  // main waits for the work issued on the side streams so far

 private:
  std::vector<cudaStream_t> streams_;
  std::vector<cublasHandle_t> blas_;
  std::vector<void*> ws_;
  std::vector<cudaEvent_t> done_;
  cudaEvent_t forked_ = nullptr;
};

}  // namespace dsv3::cuda
