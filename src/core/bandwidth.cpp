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
    best = std::max(best, double(bytes) / s);
    std::swap(a, b);
  }
  return best;
}

double measure_read_bandwidth(size_t bytes, int reps) {
  const size_t n = bytes / sizeof(float);
  std::vector<float> a(n, 1.f);
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      const size_t nt = size_t(omp_get_num_threads()), t = size_t(omp_get_thread_num());
      const size_t lo = n * t / nt, hi = n * (t + 1) / nt;
      float s[16] = {0};  // 16 independent sums: the loop is bound by loads, not by add latency
      size_t i = lo;
      for (; i + 16 <= hi; i += 16)
#pragma omp simd
        for (int k = 0; k < 16; ++k) s[k] += a[i + k];
      for (; i < hi; ++i) s[0] += a[i];
      for (float v : s) total += v;
    }
    sink = total;
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(bytes) / sec);
  }
  (void)sink;
  return best;
}

}  // namespace dsv3
