#include "train/optimizer.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3 {

double LrSchedule::at(int64_t step) const {
  if (warmup > 0 && step < warmup) return lr * double(step + 1) / double(warmup);
  if (kind == "constant") return lr;
  const double span = double(std::max<int64_t>(total - warmup, 1));
  const double p = std::clamp(double(step - warmup) / span, 0.0, 1.0);
  if (kind == "cosine") return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * p));
  // wsd: stable, then linear decay over the last decay_frac of all steps.
  const int64_t decay_steps = std::max<int64_t>(1, int64_t(std::llround(decay_frac * double(total))));
  const int64_t start = std::max(warmup, total - decay_steps);
  if (step < start) return lr;
  const double q = std::clamp(double(step - start + 1) / double(std::max<int64_t>(total - start, 1)), 0.0, 1.0);
  return lr + (min_lr - lr) * q;
}

void LrSchedule::validate() const {
  if (kind != "cosine" && kind != "constant" && kind != "wsd")
    fail("unknown --lr-schedule '{}' (cosine, constant or wsd)", kind);
  if (!(lr > 0) || !std::isfinite(lr)) fail("--lr must be positive, got {}", lr);
  if (min_lr < 0 || min_lr > lr) fail("--min-lr must be in [0, lr], got {}", min_lr);
  if (warmup < 0) fail("--warmup must be >= 0, got {}", warmup);
  if (decay_frac < 0 || decay_frac > 1) fail("--wsd-decay must be in [0, 1], got {}", decay_frac);
}

double sum_squares(const float* x, int64_t n) {
  const int64_t chunk = 1 << 16, nc = (n + chunk - 1) / chunk;
  std::vector<double> part(nc, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nc; ++c) {
    double s = 0;
    for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) s += double(x[i]) * x[i];
    part[c] = s;
  }
  double s = 0;
  for (double p : part) s += p;
  return s;
}

AdamW::AdamW(const ParamLayout& layout, AdamWConfig cfg) : cfg_(cfg) {
  m.assign(layout.num_params, 0.f);
  v.assign(layout.num_params, 0.f);
  // Parameters are laid out in spec order; merge neighbours with the same decay flag into segments.
  for (auto& s : layout.specs) {
    if (s.is_bias) continue;
    const bool decay = s.is_matrix() && !s.is_norm;
    const int64_t n = shape_numel(s.shape);
    if (!segs_.empty() && segs_.back().decay == decay && segs_.back().offset + segs_.back().n == s.offset)
      segs_.back().n += n;
    else
      segs_.push_back({s.offset, n, decay});
  }
}

double AdamW::step(float* params, const float* grads, double lr) {
  const int64_t n = int64_t(m.size());
  const double norm = std::sqrt(sum_squares(grads, n));
  const double clip = cfg_.clip > 0 && norm > cfg_.clip ? cfg_.clip / (norm + 1e-6) : 1.0;
  ++t;
  const float b1 = float(cfg_.beta1), b2 = float(cfg_.beta2), eps = float(cfg_.eps), gs = float(clip);
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t)), bc2 = 1.0 - std::pow(cfg_.beta2, double(t));
  const float step_size = float(lr / bc1), inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
  float* M = m.data();
  float* Vv = v.data();
  for (const Segment& s : segs_) {
    // PyTorch's AdamW: p *= 1 - lr wd; m, v updated; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
    const float decay = s.decay ? float(1.0 - lr * cfg_.weight_decay) : 1.f;
#pragma omp parallel for schedule(static)
    for (int64_t i = s.offset; i < s.offset + s.n; ++i) {
      const float g = grads[i] * gs;
      const float mi = b1 * M[i] + (1.f - b1) * g;
      const float vi = b2 * Vv[i] + (1.f - b2) * g * g;
      M[i] = mi;
      Vv[i] = vi;
      params[i] = params[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
    }
  }
  return norm;
}

}  // namespace dsv3
