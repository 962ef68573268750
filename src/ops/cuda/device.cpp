#include "ops/cuda/device.h"

#include <cstdio>
#include <memory>

namespace dsv3::cuda {

void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line) {
  throw Error(fmt::format("CUDA error {} ({}) in {} at {}:{}", cudaGetErrorName(e), cudaGetErrorString(e), what, file,
                          line));
}

void check_cublas(cublasStatus_t st, const char* what, const char* file, int line) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw Error(fmt::format("cuBLAS error {} ({}) in {} at {}:{}", int(st), cublasGetStatusString(st), what, file, line));
}

namespace {

constexpr size_t kBigBlock = size_t(1) << 30;

// Size classes: 1 KiB minimum, then steps of 1/8 of the power of two below (at most 12.5% slack).
size_t round_size(size_t b) {
  if (b <= 1024) return 1024;
  size_t p = 1;
  while (p * 2 <= b) p *= 2;
  const size_t step = p / 8;
  return (b + step - 1) / step * step;
}

}  // namespace

void* DeviceAllocator::alloc(size_t bytes, size_t* rounded) {
  const size_t r = round_size(bytes);
  *rounded = r;
  if (r < kBigBlock) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = free_.find(r);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= r;
      return p;
    }
  }
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, r);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    trim();
    e = cudaMalloc(&p, r);
  }
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    fail("out of GPU memory allocating {} MiB ({} MiB free of {} MiB)", r >> 20, fr >> 20, tot >> 20);
  }
  return p;
}

void DeviceAllocator::release(void* p, size_t rounded) {
  if (rounded >= kBigBlock) {
    cudaFree(p);  // synchronizes the device: only for weight-sized blocks
    return;
  }
  std::lock_guard<std::mutex> lk(mu_);
  free_[rounded].push_back(p);
  cached_ += rounded;
}

void DeviceAllocator::trim() {
  cudaDeviceSynchronize();
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& [sz, v] : free_)
    for (void* p : v) cudaFree(p);
  free_.clear();
  cached_ = 0;
}

void* PinnedPool::get(size_t bytes, size_t* cap) {
  size_t c = 65536;
  while (c < bytes) c *= 2;
  {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = free_.find(c);
    if (it != free_.end()) {
      void* p = it->second;
      free_.erase(it);
      *cap = c;
      return p;
    }
  }
  void* p = nullptr;
  DSV3_CUDA_CHECK(cudaMallocHost(&p, c));
  *cap = c;
  return p;
}

void PinnedPool::put(void* p, size_t cap) {
  std::lock_guard<std::mutex> lk(mu_);
  free_.emplace(cap, p);
}

void require_device(int dev) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    (void)cudaGetLastError();
    fail("no CUDA device is available ({}); use --device cpu", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
  }
  if (dev < 0 || dev >= n) fail("CUDA device {} does not exist ({} present)", dev, n);
}

DeviceContext& DeviceContext::get(int dev) {
  static std::mutex mu;
  static std::map<int, DeviceContext*> ctxs;  // never freed, see device.h
  std::lock_guard<std::mutex> lk(mu);
  auto it = ctxs.find(dev);
  if (it != ctxs.end()) return *it->second;
  auto* c = new DeviceContext;
  c->dev = dev;
  DSV3_CUDA_CHECK(cudaSetDevice(dev));
  DSV3_CUDA_CHECK(cudaGetDeviceProperties(&c->prop, dev));
  DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  DSV3_CUBLAS_CHECK(cublasCreate(&c->blas));
  DSV3_CUBLAS_CHECK(cublasSetStream(c->blas, c->stream));
  const size_t ws = size_t(32) << 20;
  DSV3_CUDA_CHECK(cudaMalloc(&c->blas_ws, ws));
  DSV3_CUBLAS_CHECK(cublasSetWorkspace(c->blas, c->blas_ws, ws));
  DSV3_CUBLAS_CHECK(cublasLtCreate(&c->lt));
  ctxs[dev] = c;
  return *c;
}

Tensor device_tensor(DeviceContext& ctx, DType t, Shape s, std::string name) {
  Tensor r;
  r.name = std::move(name);
  r.dtype = t;
  r.shape = std::move(s);
  r.device = Device::CUDA;
  for (auto d : r.shape)
    if (d < 0) fail("tensor {}: negative dimension in {}", r.name, shape_str(r.shape));
  size_t rounded = 0;
  void* p = ctx.alloc.alloc(std::max<size_t>(r.nbytes(), 1), &rounded);
  DeviceAllocator* a = &ctx.alloc;
  r.storage = std::shared_ptr<void>(p, [a, rounded](void* q) { a->release(q, rounded); });
  r.data = p;
  return r;
}

Tensor pinned_tensor(DeviceContext& ctx, DType t, Shape s, std::string name) {
  Tensor r;
  r.name = std::move(name);
  r.dtype = t;
  r.shape = std::move(s);
  r.device = Device::CPU;
  size_t cap = 0;
  void* p = ctx.pinned.get(std::max<size_t>(r.nbytes(), 1), &cap);
  PinnedPool* pool = &ctx.pinned;
  r.storage = std::shared_ptr<void>(p, [pool, cap](void* q) { pool->put(q, cap); });
  r.data = p;
  return r;
}

}  // namespace dsv3::cuda
