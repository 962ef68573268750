// RoPE / YaRN tables, computed once per model on the CPU and uploaded by each backend.
// Follows transformers' _compute_yarn_parameters: inverse frequencies in fp32, YaRN ramp between the
// interpolated (freq / s) and original frequencies, cos/sin scaled by mscale(s, mscale) / mscale(s, mscale_all_dim).
#include <algorithm>
#include <cmath>

#include "model/config.h"
#include "ops/backend.h"

namespace dsv3 {

namespace {
double get_mscale(double s, double m) { return s <= 1 ? 1.0 : 0.1 * m * std::log(s) + 1.0; }
}  // namespace

void make_rope_tables(const ModelConfig& cfg, int64_t max_pos, Tensor* cos_t, Tensor* sin_t) {
  const int64_t d = cfg.qk_rope_head_dim, half = d / 2;
  const double base = cfg.rope_theta;
  std::vector<float> inv_freq(half);
  for (int64_t j = 0; j < half; ++j) inv_freq[j] = float(1.0 / std::pow(base, double(2 * j) / double(d)));
  double attn = 1.0;
  if (cfg.yarn.enabled) {
    const auto& y = cfg.yarn;
    const double s = y.rope_factor;
    auto corr = [&](double rot) {
      return double(d) * std::log(double(y.original_max_position) / (rot * 2 * M_PI)) / (2 * std::log(base));
    };
    double low = std::max(std::floor(corr(y.beta_fast)), 0.0);
    double high = std::min(std::ceil(corr(y.beta_slow)), double(d - 1));
    if (low == high) high += 0.001;
    for (int64_t j = 0; j < half; ++j) {
      float ramp = std::clamp(float((double(j) - low) / (high - low)), 0.f, 1.f);
      float extra = 1.f - ramp;  // weight of the original (extrapolated) frequency
      float f_inter = float(1.0 / (s * std::pow(base, double(2 * j) / double(d))));
      inv_freq[j] = f_inter * (1.f - extra) + inv_freq[j] * extra;
    }
    if (y.mscale != 0 && y.mscale_all_dim != 0) attn = get_mscale(s, y.mscale) / get_mscale(s, y.mscale_all_dim);
    else attn = get_mscale(s, 1.0);
  }
  *cos_t = Tensor::empty(DType::F32, {max_pos, half}, "rope.cos");
  *sin_t = Tensor::empty(DType::F32, {max_pos, half}, "rope.sin");
  float* c = cos_t->f32();
  float* s = sin_t->f32();
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t j = 0; j < half; ++j) {
      float ang = float(p) * inv_freq[j];  // fp32 product, as the reference computes it
      c[p * half + j] = float(std::cos(double(ang)) * attn);
      s[p * half + j] = float(std::sin(double(ang)) * attn);
    }
}

}  // namespace dsv3
