// Muon and the host AdamW of DeepSeek-V4 training (see muon.h).
#include "train/muon.h"

#include <cmath>

#include "core/error.h"
#include "ops/cpu/blas.h"

namespace dsv3 {

namespace {

bool is_indexer(const std::string& n) { return n.find("attn.indexer.") != std::string::npos; }

double global_norm(const float* g, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(g[i]) * double(g[i]);
  return std::sqrt(s);
}

// One AdamW update of a segment (PyTorch semantics), gradient scaled by gs.
void adamw_segment(float* p, const float* g, float* m, float* v, int64_t n, const AdamWConfig& ac, double lr,
                   int64_t t, float gs, bool decay) {
  const float b1 = float(ac.beta1), b2 = float(ac.beta2), eps = float(ac.eps);
  const double bc1 = 1.0 - std::pow(ac.beta1, double(t)), bc2 = 1.0 - std::pow(ac.beta2, double(t));
  const float step = float(lr / bc1), isb = float(1.0 / std::sqrt(bc2));
  const float dec = decay ? float(1.0 - lr * ac.weight_decay) : 1.f;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gs;
    m[i] = b1 * m[i] + (1 - b1) * gi;
    v[i] = b2 * v[i] + (1 - b2) * gi * gi;
    p[i] = p[i] * dec - step * m[i] / (std::sqrt(v[i]) * isb + eps);
  }
}

}  // namespace

void newton_schulz(float* X, int64_t rows, int64_t cols, int steps) {
  const bool tall = rows > cols;
  const int64_t r = tall ? cols : rows, c = tall ? rows : cols;  // work on the wide r x c orientation
  std::vector<float> x(static_cast<size_t>(r * c)), A(static_cast<size_t>(r * r)), Bm(static_cast<size_t>(r * r)),
      y(static_cast<size_t>(r * c));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) x[static_cast<size_t>(tall ? j * c + i : i * c + j)] = X[i * cols + j];
  double nrm = 0;
  for (float v : x) nrm += double(v) * double(v);
  const float inv = float(1.0 / (std::sqrt(nrm) + 1e-7));
  for (float& v : x) v *= inv;
  for (int it = 0; it < steps; ++it) {
    const bool quintic = it < steps - 2;
    const float a = quintic ? 3.4445f : 2.f, b = quintic ? -4.7750f : -1.5f, cc = quintic ? 2.0315f : 0.5f;
    cpu::gemm(false, true, r, r, c, 1.f, x.data(), c, x.data(), c, 0.f, A.data(), r);  // A = X X^T
    cpu::gemm(false, false, r, r, r, cc, A.data(), r, A.data(), r, 0.f, Bm.data(), r);  // B = c A^2 + b A
    for (int64_t i = 0; i < r * r; ++i) Bm[static_cast<size_t>(i)] += b * A[static_cast<size_t>(i)];
    y = x;
    cpu::gemm(false, false, r, c, r, 1.f, Bm.data(), r, x.data(), c, a, y.data(), c);  // X = a X + B X
    x.swap(y);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) X[i * cols + j] = x[static_cast<size_t>(tall ? j * c + i : i * c + j)];
}

MuonPartition v4_muon_partition(const V4Config& c, const ParamLayout& layout) {
  MuonPartition part;
  for (const auto& s : layout.specs) {
    if (s.is_bias) continue;
    if (is_indexer(s.name)) {
      part.frozen.push_back(s.name);
      continue;
    }
    const bool two_d = s.shape.size() == 2;
    const bool adam = !two_d || s.is_norm || s.name == "embed.weight" || s.name == "head.weight" ||
                      (s.name.size() > 4 && s.name.compare(s.name.size() - 4, 4, ".ape") == 0);
    if (adam) {
      part.adam.push_back({s.name, s.offset, shape_numel(s.shape), two_d && !s.is_norm});
      continue;
    }
    const std::string wo_a = ".attn.wo_a.weight";
    if (s.name.size() > wo_a.size() && s.name.compare(s.name.size() - wo_a.size(), wo_a.size(), wo_a) == 0) {
      const int64_t g = c.o_groups, dg = s.shape[0] / g;
      for (int64_t j = 0; j < g; ++j)
        part.muon.push_back({s.name + "[group " + std::to_string(j) + "]", s.offset + j * dg * s.shape[1], dg, s.shape[1]});
      continue;
    }
    part.muon.push_back({s.name, s.offset, s.shape[0], s.shape[1]});
  }
  return part;
}

std::vector<AdamSegment> v4_adamw_segments(const ParamLayout& layout) {
  std::vector<AdamSegment> out;
  for (const auto& s : layout.specs) {
    if (s.is_bias || is_indexer(s.name)) continue;
    out.push_back({s.name, s.offset, shape_numel(s.shape), s.is_matrix() && !s.is_norm});
  }
  return out;
}

Muon::Muon(MuonPartition part, int64_t num_params, MuonConfig mc, AdamWConfig ac)
    : part_(std::move(part)), mc_(mc), ac_(ac), mom_(static_cast<size_t>(num_params), 0.f),
      m_(static_cast<size_t>(num_params), 0.f), v_(static_cast<size_t>(num_params), 0.f) {
  if (mc_.ns_steps < 2) fail("Muon needs at least 2 Newton-Schulz steps, got {}", mc_.ns_steps);
}

double Muon::step(float* params, const float* grads, double lr) {
  const int64_t n = int64_t(mom_.size());
  const double norm = global_norm(grads, n);
  const float gs = float(ac_.clip > 0 && norm > ac_.clip ? ac_.clip / (norm + 1e-6) : 1.0);
  ++t;
  for (const auto& s : part_.adam)
    adamw_segment(params + s.offset, grads + s.offset, m_.data() + s.offset, v_.data() + s.offset, s.n, ac_, lr, t, gs,
                  s.decay);
  const float mu = float(mc_.momentum), dec = float(1.0 - lr * mc_.weight_decay);
  std::vector<float> u;
#pragma omp parallel for schedule(dynamic) private(u)
  for (size_t k = 0; k < part_.muon.size(); ++k) {
    const MuonMatrix& mm = part_.muon[k];
    const int64_t sz = mm.rows * mm.cols;
    float* M = mom_.data() + mm.offset;
    const float* G = grads + mm.offset;
    u.resize(static_cast<size_t>(sz));
    for (int64_t i = 0; i < sz; ++i) {
      M[i] = mu * M[i] + G[i] * gs;         // M = mu M + G
      u[static_cast<size_t>(i)] = mu * M[i] + G[i] * gs;  // Nesterov: mu M + G
    }
    newton_schulz(u.data(), mm.rows, mm.cols, mc_.ns_steps);
    const float f = float(lr * std::sqrt(double(std::max(mm.rows, mm.cols))) * mc_.rms);
    float* W = params + mm.offset;
    for (int64_t i = 0; i < sz; ++i) W[i] = W[i] * dec - f * u[static_cast<size_t>(i)];
  }
  return norm;
}

HostAdamW::HostAdamW(std::vector<AdamSegment> segs, int64_t num_params, AdamWConfig ac)
    : segs_(std::move(segs)), ac_(ac), m_(static_cast<size_t>(num_params), 0.f), v_(static_cast<size_t>(num_params), 0.f) {}

double HostAdamW::step(float* params, const float* grads, double lr) {
  const double norm = global_norm(grads, int64_t(m_.size()));
  const float gs = float(ac_.clip > 0 && norm > ac_.clip ? ac_.clip / (norm + 1e-6) : 1.0);
  ++t;
  for (const auto& s : segs_)
    adamw_segment(params + s.offset, grads + s.offset, m_.data() + s.offset, v_.data() + s.offset, s.n, ac_, lr, t, gs,
                  s.decay);
  return norm;
}

}  // namespace dsv3
