#include "core/bandwidth.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

namespace dsv3 {

double measure_copy_bandwidth(size_t bytes, int reps) {
  std::vector<char> a(bytes, 1), b(bytes, 2);  // touched: pages are mapped before timing
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel
    {
      const size_t nt = size_t(omp_get_num_threads()), t = size_t(omp_get_thread_num());
      const size_t lo = bytes * t / nt, hi = bytes * (t + 1) / nt;
      std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * double(bytes) / s);
    std::swap(a, b);
  }
  return best;
}

}  // namespace dsv3
