#include "core/tensor.h"

#include "core/fp8.h"

#include <cstdlib>
#include <cstring>

namespace dsv3 {

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

Tensor Tensor::empty(DType t, Shape s, std::string name) {
  Tensor r;
  r.name = std::move(name);
  r.dtype = t;
  r.shape = std::move(s);
  for (auto d : r.shape)
    if (d < 0) fail("tensor {}: negative dimension in {}", r.name, shape_str(r.shape));
  size_t bytes = (r.nbytes() + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) fail("out of memory allocating {} bytes for tensor {}", bytes, r.name);
  r.storage = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  r.data = p;
  return r;
}

Tensor Tensor::zeros(DType t, Shape s, std::string name) {
  Tensor r = empty(t, std::move(s), std::move(name));
  std::memset(r.data, 0, r.nbytes());
  return r;
}

Tensor Tensor::f32_from(const std::vector<float>& v, Shape s) {
  Tensor r = empty(DType::F32, std::move(s));
  DSV3_CHECK(size_t(r.numel()) == v.size(), "f32_from size");
  std::memcpy(r.data, v.data(), v.size() * 4);
  return r;
}

Tensor Tensor::reshape(Shape s) const {
  Tensor r = *this;
  r.shape = std::move(s);
  if (r.numel() != numel()) fail("tensor {}: cannot reshape {} to {}", name, shape_str(shape), shape_str(r.shape));
  return r;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  DSV3_CHECK(!shape.empty() && begin >= 0 && begin <= end && end <= shape[0], "rows {}..{} of {}", begin, end,
             shape_str(shape));
  Tensor r = *this;
  int64_t inner = shape[0] ? numel() / shape[0] : 0;
  r.shape[0] = end - begin;
  r.data = static_cast<char*>(data) + size_t(begin * inner) * dtype_size(dtype);
  if (scale) {  // block-scaled fp8: experts of a grouped tensor, or whole 128-row blocks of a matrix
    if (shape.size() == 3) {
      r.scale = scale + begin * fp8::tiles(shape[1]) * fp8::tiles(shape[2]);
    } else {
      DSV3_CHECK(shape.size() == 2 && begin % fp8::kTile == 0, "rows {}..{} of fp8 {} split a scale block", begin,
                 end, name);
      r.scale = scale + (begin / fp8::kTile) * fp8::tiles(shape[1]);
    }
  }
  return r;
}

Tensor Tensor::clone() const {
  DSV3_CHECK(device == Device::CPU, "clone of a device tensor");
  Tensor r = empty(dtype, shape, name);
  std::memcpy(r.data, data, nbytes());
  return r;
}

void Tensor::check_dtype(DType t) const {
  if (dtype != t) fail("tensor {}: expected dtype {}, got {}", name, dtype_name(t), dtype_name(dtype));
}

void Tensor::check_shape(const Shape& s) const {
  if (shape != s) fail("tensor {}: expected shape {}, got {}", name, shape_str(s), shape_str(shape));
}

}  // namespace dsv3
