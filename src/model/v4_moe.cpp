// DeepSeek-V4 MoE: routing first (which experts, which weights), expert compute second, so that expert
// parallelism can later sit between the two.
//   scores  s = sqrt(softplus(y gate^T))  (softplus as PyTorch: beta 1, identity above 20), or sigmoid
//   moe       selection = top-K of s + bias (the bias only selects)
//   hash_moe  selection = tid2eid[token id] (a fixed table; the gate still weighs the chosen experts)
//   weights   w_k = routed_scaling_factor * s_k / (sum of the chosen s + 1e-20)
// Every expert (routed and shared) is a SwiGLU whose gate is clamped above at swiglu_limit and whose up
// projection is clamped to [-limit, limit]. The routed experts of a layer are grouped tensors
// w1/w3 [E, F, d], w2 [E, d, F]; each expert runs once on the rows routed to it.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "model/v4_kernels.h"
#include "model/v4_parts.h"

namespace dsv3 {

namespace {

// out [n, d] = clamped SwiGLU of x [n, d] with gate/up [F, d] and down [d, F].
void swiglu_clamped(Backend& be, float limit, const Tensor& x, const Tensor& gate, const Tensor& up,
                    const Tensor& down, Tensor& out) {
  const int64_t n = x.dim(0), F = gate.dim(0);
  Tensor g = v4_new(be, {n, F}, "expert_gate"), u = v4_new(be, {n, F}, "expert_up");
  be.linear(g, x, gate);
  be.linear(u, x, up);
  float* gp = g.f32();
  const float* upp = u.f32();
  for (int64_t i = 0; i < n * F; ++i) {
    gp[i] = v4k::swiglu_clamped(gp[i], upp[i], limit);
  }
  be.linear(out, g, down);
}

Tensor expert(const Tensor& grouped, int64_t e) {
  Tensor t = grouped;
  t.shape = {grouped.dim(1), grouped.dim(2)};
  t.data = static_cast<char*>(grouped.data) + size_t(e * grouped.dim(1) * grouped.dim(2)) * dtype_size(grouped.dtype);
  return t;
}

}  // namespace

V4Routing v4_route(Backend& be, const V4Config& c, const V4LayerWeights& L, const Tensor& y,
                   const std::vector<int32_t>& ids) {
  const int64_t T = y.dim(0), E = c.n_routed_experts, K = c.num_experts_per_tok;
  Tensor logits = v4_new(be, {T, E}, "router_logits");
  be.linear(logits, y, L.gate);
  const bool sigmoid = c.scoring_func == "sigmoid";
  V4Routing r;
  r.K = K;
  r.idx.resize(size_t(T * K));
  r.w.resize(size_t(T * K));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> s(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      const float l = logits.f32()[t * E + e];
      s[size_t(e)] = v4k::route_score(l, sigmoid);
    }
    int32_t* idx = r.idx.data() + t * K;
    if (L.mlp == V4Mlp::Hash) {
      std::copy_n(L.tid2eid->data() + int64_t(ids[size_t(t)]) * K, K, idx);
    } else {
      v4k::route_select(idx, s.data(), L.gate_bias.f32(), E, K);
    }
    std::vector<float> sk(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) sk[size_t(k)] = s[size_t(idx[k])];
    v4k::route_weights(r.w.data() + t * K, sk.data(), K, float(c.routed_scaling_factor));
  }
  return r;
}

void v4_experts_acc(Backend& be, const V4Config& c, const V4LayerWeights& L, const Tensor& y, const V4Routing& r,
                    Tensor& out) {
  const int64_t T = y.dim(0), E = c.n_routed_experts, K = r.K, d = c.hidden_size;
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(E));  // assignments (t * K + k) per expert, in token order
  for (int64_t a = 0; a < T * K; ++a) rows[size_t(r.idx[size_t(a)])].push_back(a);
  for (int64_t e = 0; e < E; ++e) {
    const auto& as = rows[size_t(e)];
    if (as.empty()) continue;
    const int64_t n = int64_t(as.size());
    Tensor x = v4_new(be, {n, d}, "expert_in"), o = v4_new(be, {n, d}, "expert_out");
    for (int64_t i = 0; i < n; ++i) std::copy_n(y.f32() + (as[size_t(i)] / K) * d, d, x.f32() + i * d);
    swiglu_clamped(be, float(c.swiglu_limit), x, expert(L.w1, e), expert(L.w3, e), expert(L.w2, e), o);
    for (int64_t i = 0; i < n; ++i) {
      const float wt = r.w[size_t(as[size_t(i)])];
      float* dst = out.f32() + (as[size_t(i)] / K) * d;
      const float* src = o.f32() + i * d;
      for (int64_t j = 0; j < d; ++j) dst[j] += src[j] * wt;
    }
  }
}

void v4_shared_expert(Backend& be, const V4Config& c, const V4LayerWeights& L, const Tensor& y, Tensor& out) {
  swiglu_clamped(be, float(c.swiglu_limit), y, L.sw1, L.sw3, L.sw2, out);
}

}  // namespace dsv3
