#pragma once
// Expert row counts for the grouped-GEMM benchmarks (gpu_grouped_bench, bench/sm90_tiles): T tokens each pick
// top_k distinct experts of E, uniformly or skewed (expert e drawn with weight 0.85^e, so a few experts take most
// rows, as random-weight routers do).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/rng.h"

namespace dsv3::bench {

inline std::vector<int> route_counts(int64_t T, int topk, int E, bool skewed, uint64_t seed) {
  Rng rng(seed);
  std::vector<double> w(size_t(E), 1.0);
  if (skewed)
    for (int e = 0; e < E; ++e) w[size_t(e)] = std::pow(0.85, e);
  double total = 0;
  for (double x : w) total += x;
  std::vector<int> cnt(size_t(E), 0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> pick;
    while (int(pick.size()) < topk) {
      double u = rng.uniform() * total;
      int e = 0;
      while (e + 1 < E && u >= w[size_t(e)]) u -= w[size_t(e)], ++e;
      if (std::find(pick.begin(), pick.end(), e) == pick.end()) pick.push_back(e);
    }
    for (int e : pick) ++cnt[size_t(e)];
  }
  return cnt;
}

}  // namespace dsv3::bench
