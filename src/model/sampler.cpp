#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace dsv3 {

void validate_sampling(const SamplingParams& p) {
  if (!(p.temperature >= 0) || p.temperature > 100) fail("temperature must be in [0, 100], got {}", p.temperature);
  if (!(p.top_p > 0) || p.top_p > 1) fail("top_p must be in (0, 1], got {}", p.top_p);
  if (p.top_k < 0) fail("top_k must be >= 0, got {}", p.top_k);
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) { validate_sampling(p); }

int32_t Sampler::argmax(const float* l, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (l[i] > l[best]) best = i;
  return int32_t(best);
}

int32_t Sampler::sample(const float* l, int64_t V) {
  if (p_.temperature <= 0) return argmax(l, V);
  // Candidates sorted by logit (only the top-k when set), softmax at temperature, then the top-p nucleus.
  std::vector<int32_t> ix(V);
  std::iota(ix.begin(), ix.end(), 0);
  int64_t k = p_.top_k > 0 ? std::min<int64_t>(p_.top_k, V) : V;
  auto cmp = [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };
  if (k < V) std::partial_sort(ix.begin(), ix.begin() + k, ix.end(), cmp);
  else std::sort(ix.begin(), ix.end(), cmp);
  ix.resize(k);
  std::vector<double> pr(k);
  const double mx = l[ix[0]];
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += (pr[i] = std::exp((l[ix[i]] - mx) / p_.temperature));
  int64_t keep = k;
  if (p_.top_p < 1.0) {
    double c = 0;
    for (int64_t i = 0; i < k; ++i) {
      c += pr[i] / sum;
      if (c >= p_.top_p) { keep = i + 1; break; }
    }
  }
  double tot = 0;
  for (int64_t i = 0; i < keep; ++i) tot += pr[i];
  double u = rng_.uniform() * tot;
  for (int64_t i = 0; i < keep; ++i) {
    u -= pr[i];
    if (u < 0) return ix[i];
  }
  return ix[keep - 1];
}

}  // namespace dsv3
