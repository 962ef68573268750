#pragma once
// Host <-> TrainBackend copies for the training-backend tests (test_cuda_train_ops.cpp, test_cuda_fp8_train.cpp).
#include <algorithm>
#include <vector>

#include "ops/train_backend.h"

namespace dsv3::test {

// A TBuf of h.size() elements holding h (one element is allocated for an empty h).
template <typename T>
TBuf<T> up(TrainBackend& be, const std::vector<T>& h) {
  TBuf<T> b(&be);
  T* p = b.resize(std::max<size_t>(h.size(), 1));
  be.upload(p, h.data(), h.size() * sizeof(T));
  b.resize(h.size());
  return b;
}
template <typename T>
std::vector<T> down(TrainBackend& be, const TBuf<T>& b) {
  std::vector<T> h(b.size());
  be.download(h.data(), b.data(), h.size() * sizeof(T));
  return h;
}

}  // namespace dsv3::test
