#include "model/logprobs.h"

#include <cmath>

namespace dsv3 {

std::vector<double> token_logprobs(const Tensor& logits, const std::vector<int32_t>& ids, int64_t B, int64_t T) {
  logits.check_dtype(DType::F32);
  DSV3_CHECK(logits.ndim() == 3 && logits.dim(0) == B && logits.dim(1) == T, "logits {} for B={} T={}",
             shape_str(logits.shape), B, T);
  DSV3_CHECK(int64_t(ids.size()) == B * T, "{} ids for B={} T={}", ids.size(), B, T);
  const int64_t V = logits.dim(2);
  std::vector<double> out(size_t(B * (T - 1 > 0 ? T - 1 : 0)));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T - 1; ++t) {
      const float* row = logits.ptr<float>() + (b * T + t) * V;
      double mx = row[0];
      for (int64_t v = 1; v < V; ++v) mx = std::max(mx, double(row[v]));
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
      const int32_t next = ids[size_t(b * T + t + 1)];
      out[size_t(b * (T - 1) + t)] = double(row[next]) - mx - std::log(sum);
    }
  return out;
}

}  // namespace dsv3
