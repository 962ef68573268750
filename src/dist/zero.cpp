#include "dist/zero.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3 {

ShardedAdamW::ShardedAdamW(TrainBackend& be, const ParamLayout& layout, const Parallel& par, AdamWConfig cfg)
    : be_(be), par_(par), groups_(make_param_groups(layout, par)), num_params_(layout.num_params), cfg_(cfg) {
  shards_.resize(groups_.size());
  for (size_t i = 0; i < groups_.size(); ++i) {
    const int64_t n = groups_[i].shard_n();
    Shard& s = shards_[i];
    for (TBuf<float>* b : {&s.m, &s.v, &s.g, &s.p, &s.packed}) b->bind(&be);
    be.fill(s.m.resize(size_t(n)), 0.f, n);
    be.fill(s.v.resize(size_t(n)), 0.f, n);
    s.g.resize(size_t(n)), s.p.resize(size_t(n));
    if (!groups_[i].contiguous()) s.packed.resize(size_t(groups_[i].n));
  }
}

int64_t ShardedAdamW::state_elements() const {
  int64_t s = 0;
  for (auto& sh : shards_) s += int64_t(sh.m.size() + sh.v.size());
  return s;
}

void ShardedAdamW::pack_dev(const ParamGroup& g, const float* flat, float* packed) {
  for (const ParamPiece& p : g.pieces) be_.copy(packed, flat + p.offset, p.n), packed += p.n;
}
void ShardedAdamW::unpack_dev(const ParamGroup& g, const float* packed, float* flat) {
  for (const ParamPiece& p : g.pieces) be_.copy(flat + p.offset, packed, p.n), packed += p.n;
}

double ShardedAdamW::step(float* params, float* grads, double lr) {
  double sq = 0;
  for (size_t i = 0; i < groups_.size(); ++i) {
    const ParamGroup& g = groups_[i];
    Shard& s = shards_[i];
    const float* in = g.contiguous() ? grads + g.pieces[0].offset : s.packed.data();
    if (!g.contiguous()) pack_dev(g, grads, s.packed.data());
    be_.synchronize();  // a device transport (NCCL) runs on its own stream: the gradients must be complete
    g.bulk->reduce_scatter_sum(s.g.data(), in, g.counts, CommType::F32);
    sq += be_.sum_squares(s.g.data(), int64_t(s.g.size()));
  }
  sq = par_.world->sum(sq);
  const double norm = std::sqrt(sq);
  const double clip = cfg_.clip > 0 && norm > cfg_.clip ? cfg_.clip / (norm + 1e-6) : 1.0;
  ++t;
  const float b1 = float(cfg_.beta1), b2 = float(cfg_.beta2), eps = float(cfg_.eps), gs = float(clip);
  const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t)), bc2 = 1.0 - std::pow(cfg_.beta2, double(t));
  const float step_size = float(lr / bc1), inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
  const float decay_on = float(1.0 - lr * cfg_.weight_decay);
  for (size_t i = 0; i < groups_.size(); ++i) {
    const ParamGroup& g = groups_[i];
    Shard& s = shards_[i];
    const int64_t lo = g.shard_lo, hi = g.shard_lo + g.shard_n();
    if (g.contiguous()) {
      be_.copy(s.p.data(), params + g.pieces[0].offset + lo, hi - lo);
    } else {
      pack_dev(g, params, s.packed.data());
      be_.copy(s.p.data(), s.packed.data() + lo, hi - lo);
    }
    // The decay spans overlapping the shard.
    for (const DecaySpan& d : g.decay) {
      const int64_t a = std::max(d.at, lo), b = std::min(d.at + d.n, hi);
      if (a < b)
        be_.adamw_update(s.p.data() + (a - lo), s.g.data() + (a - lo), s.m.data() + (a - lo), s.v.data() + (a - lo),
                         0, b - a, b1, b2, eps, gs, d.decay ? decay_on : 1.f, step_size, inv_sqrt_bc2);
    }
    be_.synchronize();
    if (g.contiguous()) {
      g.bulk->all_gather(params + g.pieces[0].offset, s.p.data(), g.counts, CommType::F32);
    } else {
      g.bulk->all_gather(s.packed.data(), s.p.data(), g.counts, CommType::F32);
      unpack_dev(g, s.packed.data(), params);
    }
  }
  return norm;
}

void ShardedAdamW::get_moments(std::vector<float>& m, std::vector<float>& v) {
  m.assign(num_params_, 0.f), v.assign(num_params_, 0.f);
  for (size_t i = 0; i < groups_.size(); ++i) {
    const ParamGroup& g = groups_[i];
    Shard& s = shards_[i];
    TBuf<float> packed(&be_);
    packed.resize(size_t(g.n));
    std::vector<float> host(g.n);
    for (auto [moment, out] : {std::pair{&s.m, &m}, std::pair{&s.v, &v}}) {
      be_.synchronize();
      g.bulk->all_gather(packed.data(), moment->data(), g.counts, CommType::F32);
      be_.download(host.data(), packed.data(), host.size() * sizeof(float));
      unpack(g, host.data(), out->data());
    }
  }
}

void ShardedAdamW::set_moments(const std::vector<float>& m, const std::vector<float>& v) {
  if (int64_t(m.size()) != num_params_ || int64_t(v.size()) != num_params_)
    fail("optimizer state has {} / {} values, the model has {} parameters", m.size(), v.size(), num_params_);
  for (size_t i = 0; i < groups_.size(); ++i) {
    const ParamGroup& g = groups_[i];
    Shard& s = shards_[i];
    const int64_t lo = g.shard_lo, n = g.shard_n();
    std::vector<float> packed(g.n);
    pack(g, m.data(), packed.data());
    be_.upload(s.m.data(), packed.data() + lo, size_t(n) * sizeof(float));
    pack(g, v.data(), packed.data());
    be_.upload(s.v.data(), packed.data() + lo, size_t(n) * sizeof(float));
  }
}

}  // namespace dsv3
