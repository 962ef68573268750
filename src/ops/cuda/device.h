#pragma once
// Per-device state of the CUDA backend: one stream (every op and copy is ordered on it), the cuBLAS handle, a
// caching allocator and a pool of pinned host buffers. A context is created on first use and never destroyed:
// tensors hold deleters that return memory to it, and they may outlive the backend object that made them.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "ops/cuda/cuda_ops.h"

namespace dsv3::cuda {

void check_cublas(cublasStatus_t st, const char* what, const char* file, int line);
#define DSV3_CUBLAS_CHECK(x) ::dsv3::cuda::check_cublas((x), #x, __FILE__, __LINE__)

// Device memory with size classes and free lists. Freed blocks go back to a list without any CUDA call and are
// handed out again to later work on the same stream; stream order makes that safe (all kernels and copies of
// the backend run on one stream, and host reads of device memory synchronize first). A cudaMalloc per
// activation would cost microseconds and synchronize the device; decode allocates ~30 tensors per layer.
// Blocks of 1 GiB and more (weights) bypass the lists.
class DeviceAllocator {
 public:
  void* alloc(size_t bytes, size_t* rounded);
  void release(void* p, size_t rounded);
  void trim();  // synchronizes the device and frees every cached block
  size_t cached_bytes() const { return cached_; }

 private:
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

// Pinned host buffers for device-to-host results (logits are 0.5 MB per sequence per step): a copy into
// pinned memory runs at the link's speed and returns no later than the data lands.
class PinnedPool {
 public:
  void* get(size_t bytes, size_t* cap);
  void put(void* p, size_t cap);

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
};

struct DeviceContext {
  int dev = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  void* blas_ws = nullptr;  // cuBLAS workspace (Hopper kernels want 32 MiB)
  cublasLtHandle_t lt = nullptr;  // cuBLASLt (block-scaled FP8 products), sharing blas_ws: one stream orders both
  cudaDeviceProp prop{};
  DeviceAllocator alloc;
  PinnedPool pinned;
  static DeviceContext& get(int dev);
};

// Fails with a one-line message unless device `dev` exists (no GPU, no driver, or an index out of range).
void require_device(int dev);

// An uninitialized device tensor from the context's allocator.
Tensor device_tensor(DeviceContext& ctx, DType t, Shape s, std::string name);
// A host tensor whose storage is pinned (returned to the pool when the last reference goes).
Tensor pinned_tensor(DeviceContext& ctx, DType t, Shape s, std::string name);

}  // namespace dsv3::cuda
