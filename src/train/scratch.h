#pragma once
// Small helpers shared by the training model's files: fp32 views of parameters/gradients and reusable
// scratch vectors sized on demand (activations are planned per shape and reused across steps).
#include <algorithm>
#include <vector>

#include "core/tensor.h"

namespace dsv3 {
namespace {  // internal linkage in each training source file
inline const float* P(const Tensor& t) { return t.ptr<float>(); }
inline float* G(Tensor& t) { return t.ptr<float>(); }
template <typename V>
inline auto* buf(V& v, size_t n) {
  if (v.size() != n) v.resize(n);
  return v.data();
}
inline void zero(std::vector<float>& v, size_t n) {
  buf(v, n);
  std::fill(v.begin(), v.end(), 0.f);
}
}  // namespace
}  // namespace dsv3
