#pragma once
// Shared helpers for the C++ tests.
#include <cmath>
#include <string>

#include "core/tensor.h"

namespace dsv3::test {

inline std::string data_dir(const std::string& sub = "") { return std::string(DSV3_TEST_DATA) + (sub.empty() ? "" : "/" + sub); }

// ||a - b|| / ||b|| over n floats.
inline double rel_err(const float* a, const float* b, int64_t n) {
  double d = 0, r = 0;
  for (int64_t i = 0; i < n; ++i) {
    d += double(a[i] - b[i]) * (a[i] - b[i]);
    r += double(b[i]) * b[i];
  }
  return std::sqrt(d / (r > 0 ? r : 1));
}

}  // namespace dsv3::test
