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

AdamW::AdamW(TrainBackend& be, const ParamLayout& layout, AdamWConfig cfg)
    : be_(be), n_(layout.num_params), m_(&be), v_(&be), cfg_(cfg) {
  be_.fill(m_.resize(size_t(n_)), 0.f, n_);
  be_.fill(v_.resize(size_t(n_)), 0.f, n_);
  // Parameters are laid out in spec order; merge neighbours with the same decay flag into segments.
  for (auto& s : layout.specs) {
    if (s.is_bias) continue;
    // The DeepSeek-V3.2 indexer gets no gradient (transformers runs it under no_grad, so PyTorch's AdamW skips
    // it): no segment, no update, no weight decay.
    if (s.name.find(".self_attn.indexer.") != std::string::npos) continue;
    const bool decay = s.is_matrix() && !s.is_norm;
    const int64_t n = shape_numel(s.shape);
    if (!segs_.empty() && segs_.back().decay == decay && segs_.back().offset + segs_.back().n == s.offset)
      segs_.back().n += n;
    else
      segs_.push_back({s.offset, n, decay});
  }
}

void AdamW::get_moments(std::vector<float>& m, std::vector<float>& v) {
  m.resize(size_t(n_)), v.resize(size_t(n_));
  be_.download(m.data(), m_.data(), size_t(n_) * sizeof(float));
  be_.download(v.data(), v_.data(), size_t(n_) * sizeof(float));
}

void AdamW::set_moments(const std::vector<float>& m, const std::vector<float>& v) {
  if (int64_t(m.size()) != n_ || int64_t(v.size()) != n_)
    fail("optimizer state has {} / {} values, the model has {} parameters", m.size(), v.size(), n_);
  be_.upload(m_.data(), m.data(), size_t(n_) * sizeof(float));
  be_.upload(v_.data(), v.data(), size_t(n_) * sizeof(float));
}

double AdamW::step(float* params, const float* grads, double lr) {
  const double norm = std::sqrt(be_.sum_squares(grads, n_));
  const double clip = cfg_.clip > 0 && norm > cfg_.clip ? cfg_.clip / (norm + 1e-6) : 1.0;
  ++t;
  const float b1 = float(cfg_.beta1), b2 = float(cfg_.beta2), eps = float(cfg_.eps), gs = float(clip);
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t)), bc2 = 1.0 - std::pow(cfg_.beta2, double(t));
  const float step_size = float(lr / bc1), inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
  for (const Segment& s : segs_) {
    const float decay = s.decay ? float(1.0 - lr * cfg_.weight_decay) : 1.f;
    be_.adamw_update(params, grads, m_.data(), v_.data(), s.offset, s.n, b1, b2, eps, gs, decay, step_size,
                     inv_sqrt_bc2);
  }
  return norm;
}

}  // namespace dsv3
