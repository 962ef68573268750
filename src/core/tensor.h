#pragma once
// A small non-owning-or-shared tensor: dtype, shape (PyTorch order, outermost first), a data pointer, the
// device it lives on, and a shared handle that keeps the storage alive (heap, mmap'd file, device memory).
// Contiguous row-major only: views are reshapes or ranges of the outermost dimension.
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {

enum class Device : uint8_t { CPU, CUDA };

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

struct Tensor {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  void* data = nullptr;
  Device device = Device::CPU;
  std::shared_ptr<void> storage;
  // F8E4M3 weights only: their fp32 block scales in the same memory as data (kept alive by the owner of the
  // scale buffer, e.g. ModelWeights::scale_flat): [tiles(N), tiles(K)] for a matrix [N, K] and, for grouped
  // experts [E, N, K], E such grids back to back (see core/fp8.h; value = code * scale).
  const float* scale = nullptr;

  int64_t numel() const { return shape_numel(shape); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  int ndim() const { return int(shape.size()); }
  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : size_t(i)]; }
  explicit operator bool() const { return data != nullptr; }

  template <typename T> T* ptr() { return static_cast<T*>(data); }
  template <typename T> const T* ptr() const { return static_cast<const T*>(data); }
  float* f32() { check_dtype(DType::F32); return static_cast<float*>(data); }
  const float* f32() const { check_dtype(DType::F32); return static_cast<const float*>(data); }

  // Heap tensor on the CPU, 64-byte aligned. zeros() clears it.
  static Tensor empty(DType t, Shape s, std::string name = {});
  static Tensor zeros(DType t, Shape s, std::string name = {});
  static Tensor f32_from(const std::vector<float>& v, Shape s);

  Tensor reshape(Shape s) const;          // same storage, same numel
  Tensor rows(int64_t begin, int64_t end) const;  // range of the outermost dimension
  Tensor clone() const;                   // deep CPU copy

  void check_dtype(DType t) const;
  void check_shape(const Shape& s) const;  // error names the tensor
};

}  // namespace dsv3
