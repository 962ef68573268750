// The two DeepSeek-V4 rope tables. transformers computes the inverse frequencies in fp32
// (pos_freq_j = base^(2j / r), inv = 1 / pos_freq); YaRN (the compress table of the releases) blends
// inv / factor and inv with a linear ramp between the correction dims of beta_fast and beta_slow (floored /
// ceiled: `truncate`), and its attention factor scales cos and sin (1.0 in the releases: no mscale).
// Angles are fp32(position) * inv_freq in fp32, as the reference forms them.
#include <algorithm>
#include <cmath>

#include "model/v4_model.h"

namespace dsv3 {

std::vector<float> v4_inv_freq(const V4Rope& p, int64_t r) {
  const int64_t half = r / 2;
  const float base = float(p.theta);
  std::vector<float> pos_freq(static_cast<size_t>(half)), inv(static_cast<size_t>(half));
  for (int64_t j = 0; j < half; ++j) {
    pos_freq[size_t(j)] = std::pow(base, float(2 * j) / float(r));
    inv[size_t(j)] = 1.f / pos_freq[size_t(j)];
  }
  if (p.type != "yarn") return inv;
  auto corr = [&](double rot) {
    return double(r) * std::log(double(p.original_max_position) / (rot * 2 * M_PI)) / (2 * std::log(p.theta));
  };
  const double lo = std::max(std::floor(corr(p.beta_fast)), 0.0);
  double hi = std::min(std::ceil(corr(p.beta_slow)), double(r - 1));
  if (lo == hi) hi += 0.001;
  for (int64_t j = 0; j < half; ++j) {
    const float ramp = std::clamp(float((float(j) - lo) / (hi - lo)), 0.f, 1.f);
    const float extra = 1.f - ramp;  // weight of the original frequency
    const float inter = 1.f / (float(p.factor) * pos_freq[size_t(j)]);
    inv[size_t(j)] = inter * (1.f - extra) + inv[size_t(j)] * extra;
  }
  return inv;
}

void V4RopeTable::ensure(int64_t n_pos) {
  if (n_pos <= cap) return;
  const int64_t half = int64_t(inv_freq.size());
  const int64_t n = std::max<int64_t>(n_pos, std::max<int64_t>(2 * cap, 256));
  Tensor c = Tensor::empty(DType::F32, {n, half}, "v4_rope.cos"), s = Tensor::empty(DType::F32, {n, half}, "v4_rope.sin");
  Tensor sn = Tensor::empty(DType::F32, {n, half}, "v4_rope.sin_neg");
  for (int64_t p = 0; p < n; ++p)
    for (int64_t j = 0; j < half; ++j) {
      const float ang = float(p) * inv_freq[size_t(j)];
      c.f32()[p * half + j] = std::cos(ang) * attention_factor;
      s.f32()[p * half + j] = std::sin(ang) * attention_factor;
      sn.f32()[p * half + j] = -s.f32()[p * half + j];
    }
  cos = c;
  sin = s;
  sin_neg = sn;
  cap = n;
}

}  // namespace dsv3
