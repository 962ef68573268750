#include "ops/cuda/stream_fan.h"

#include "ops/cuda/device.h"

namespace dsv3::cuda {

StreamFan::StreamFan(int dev, int n) {
  DSV3_CUDA_CHECK(cudaSetDevice(dev));
  const size_t ws = size_t(32) << 20;  // what cuBLAS' Hopper kernels want, as for the main handle
  DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&forked_, cudaEventDisableTiming));
  for (int i = 0; i < n; ++i) {
    cudaStream_t s;
    cublasHandle_t h;
    cudaEvent_t e;
    void* w;
    DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    DSV3_CUBLAS_CHECK(cublasCreate(&h));
    DSV3_CUBLAS_CHECK(cublasSetStream(h, s));
    DSV3_CUDA_CHECK(cudaMalloc(&w, ws));
    DSV3_CUBLAS_CHECK(cublasSetWorkspace(h, w, ws));
    DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    streams_.push_back(s), blas_.push_back(h), ws_.push_back(w), done_.push_back(e);
  }
}

StreamFan::~StreamFan() {  // best effort: the fan lives as long as the backend
  for (size_t i = 0; i < streams_.size(); ++i) {
    cudaStreamSynchronize(streams_[i]);
    cublasDestroy(blas_[i]);
    cudaFree(ws_[i]);
    cudaEventDestroy(done_[i]);
    cudaStreamDestroy(streams_[i]);
  }
  if (forked_) cudaEventDestroy(forked_);
}

void StreamFan::fork(cudaStream_t main) {
  DSV3_CUDA_CHECK(cudaEventRecord(forked_, main));
  for (cudaStream_t s : streams_) DSV3_CUDA_CHECK(cudaStreamWaitEvent(s, forked_, 0));
}

void StreamFan::join(cudaStream_t main) {
  for (size_t i = 0; i < streams_.size(); ++i) {
    DSV3_CUDA_CHECK(cudaEventRecord(done_[i], streams_[i]));
    DSV3_CUDA_CHECK(cudaStreamWaitEvent(main, done_[i], 0));
  }
}

}  // namespace dsv3::cuda
