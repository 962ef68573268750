#pragma once
// The unbiased pass@k estimator of Chen et al. 2021 (HumanEval): with n samples of which c pass,
// pass@k = 1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i) for stability.
#include <cstdint>

namespace dsv3 {

inline double pass_at_k(int64_t n, int64_t c, int64_t k) {
  if (n - c < k) return 1.0;
  double prod = 1.0;
  for (int64_t i = n - c + 1; i <= n; ++i) prod *= 1.0 - double(k) / double(i);
  return 1.0 - prod;
}

}  // namespace dsv3
