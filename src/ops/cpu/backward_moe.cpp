// DeepSeekMoE for training: router (forward with saved scores, backward through the selected weights),
// the sequence-wise balance loss, and the routed experts as grouped tensors.
// Accumulation: route_backward overwrites dlogits; balance_loss overwrites dscores; experts_backward
// dx +=, dWg/dWu/dWd +=, dw overwritten.
// Determinism: experts run in parallel (dynamic schedule) but each writes only its own rows and weight
// slices; per-token sums over the K assignments are done afterwards in k order.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "ops/cpu/blas.h"
#include "ops/cpu/fp8_linear.h"
#include "ops/cpu/train_ops.h"

namespace dsv3::cpu {

namespace {

// Indices of the k largest values, descending; ties to the lower index (as moe_route).
template <typename T>
void topk_desc(const T* v, int64_t n, int64_t k, int32_t* out, int32_t* scratch) {
  std::iota(scratch, scratch + n, 0);
  std::partial_sort(scratch, scratch + k, scratch + n,
                    [&](int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  std::copy(scratch, scratch + k, out);
}

// The selected-weight normalization: w_k = c * s_k / (sum_j s_j + 1e-20) when `norm`, else c * s_k.
struct WeightRule {
  bool norm;
  double c;
};
WeightRule weight_rule(const RouteParams& p) {
  if (p.sigmoid) return {p.norm_topk_prob, p.scaling};
  if (p.norm_topk_prob && p.top_k > 1) return {true, 1.0};  // DeepSeek-V2: normalized weights are not scaled
  return {false, p.scaling};
}

}  // namespace

template <typename T>
void route_forward(int32_t* idx, T* w, T* scores, const T* logits, const float* bias, int64_t N,
                   const RouteParams& p) {
  const int64_t E = p.n_experts, K = p.top_k, G = p.n_group, per = E / std::max<int64_t>(G, 1);
  const WeightRule rule = weight_rule(p);
#pragma omp parallel
  {
    std::vector<T> sel(E), gscore(G);
    std::vector<int32_t> scratch(E), keep(std::max<int64_t>(p.topk_group, 1));
    std::vector<char> allowed(G);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      const T* l = logits + t * E;
      T* s = scores + t * E;
      if (p.sigmoid) {
        for (int64_t e = 0; e < E; ++e) s[e] = T(1) / (T(1) + std::exp(-l[e]));
      } else {
        T mx = *std::max_element(l, l + E);
        double sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(l[e] - mx));
        for (int64_t e = 0; e < E; ++e) s[e] = T(s[e] / sum);
      }
      for (int64_t e = 0; e < E; ++e) sel[e] = s[e] + (p.noaux_bias && bias ? T(bias[e]) : T(0));
      if (p.group_limited && G > 1) {
        for (int64_t g = 0; g < G; ++g) {
          const T* v = sel.data() + g * per;
          if (p.noaux_bias) {
            int32_t top2[2];
            const int64_t k2 = std::min<int64_t>(2, per);
            topk_desc(v, per, k2, top2, scratch.data());
            gscore[g] = 0;
            for (int64_t i = 0; i < k2; ++i) gscore[g] += v[top2[i]];
          } else {
            gscore[g] = *std::max_element(v, v + per);
          }
        }
        topk_desc(gscore.data(), G, p.topk_group, keep.data(), scratch.data());
        std::fill(allowed.begin(), allowed.end(), 0);
        for (int64_t i = 0; i < p.topk_group; ++i) allowed[keep[i]] = 1;
        for (int64_t e = 0; e < E; ++e)
          if (!allowed[e / per]) sel[e] = T(0);  // transformers' masked_fill(0.0)
      }
      int32_t* it = idx + t * K;
      topk_desc(sel.data(), E, K, it, scratch.data());
      T* wt = w + t * K;
      double sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += (wt[k] = s[it[k]]);
      for (int64_t k = 0; k < K; ++k) wt[k] = rule.norm ? T(wt[k] / (sum + 1e-20) * rule.c) : T(wt[k] * rule.c);
    }
  }
}

// Forward: w_k = c s_{i_k} / (S + 1e-20), S = sum_m s_{i_m} (or w_k = c s_{i_k} without normalization);
//          s = sigmoid(z) (or softmax(z)).
// Backward: ds_{i_k} = c (dw_k / (S + 1e-20) - sum_m dw_m s_{i_m} / (S + 1e-20)^2), plus dscores_extra;
//           dz = ds * s (1 - s) for sigmoid, s * (ds - sum_e ds_e s_e) for softmax.
template <typename T>
void route_backward(T* dlogits, const T* dw, const T* dscores_extra, const T* scores, const int32_t* idx, int64_t N,
                    const RouteParams& p) {
  const int64_t E = p.n_experts, K = p.top_k;
  const WeightRule rule = weight_rule(p);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    const T* s = scores + t * E;
    T* dz = dlogits + t * E;
    for (int64_t e = 0; e < E; ++e) dz[e] = dscores_extra ? dscores_extra[t * E + e] : T(0);  // dz holds ds for now
    const int32_t* it = idx + t * K;
    const T* g = dw + t * K;
    if (rule.norm) {
      double S = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) S += s[it[k]], dot += double(g[k]) * s[it[k]];
      const double den = S + 1e-20;
      for (int64_t k = 0; k < K; ++k) dz[it[k]] += T(rule.c * (g[k] / den - dot / (den * den)));
    } else {
      for (int64_t k = 0; k < K; ++k) dz[it[k]] += T(rule.c * g[k]);
    }
    if (p.sigmoid) {
      for (int64_t e = 0; e < E; ++e) dz[e] *= s[e] * (T(1) - s[e]);
    } else {
      T dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += dz[e] * s[e];
      for (int64_t e = 0; e < E; ++e) dz[e] = s[e] * (dz[e] - dot);
    }
  }
}

// Forward: L = alpha/B sum_b sum_i f_i P_i with f_i = E/(K Tq) count_i (constant), P_i = 1/Tq sum_t s_it/S_t,
//          S_t = sum_j s_jt.
// Backward: dL/ds_jt = alpha/(B Tq) (f_j / S_t - sum_i f_i s_it / S_t^2).
template <typename T>
double balance_loss(T* dscores, const T* scores, const int32_t* idx, int64_t B, int64_t Tq, int64_t E, int64_t K,
                    double alpha, double grad_scale) {
  std::vector<double> per_seq(B, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> f(E, 0.0), P(E, 0.0);
    for (int64_t t = b * Tq; t < (b + 1) * Tq; ++t)
      for (int64_t k = 0; k < K; ++k) f[idx[t * K + k]] += 1.0;
    for (auto& v : f) v *= double(E) / double(K * Tq);
    for (int64_t t = b * Tq; t < (b + 1) * Tq; ++t) {
      const T* s = scores + t * E;
      double S = 0, fs = 0;
      for (int64_t e = 0; e < E; ++e) S += s[e], fs += f[e] * s[e];
      for (int64_t e = 0; e < E; ++e) P[e] += s[e] / S / double(Tq);
      T* d = dscores + t * E;
      const double k = alpha / double(B * Tq) * grad_scale;
      for (int64_t e = 0; e < E; ++e) d[e] = T(k * (f[e] / S - fs / (S * S)));
    }
    double l = 0;
    for (int64_t e = 0; e < E; ++e) l += f[e] * P[e];
    per_seq[b] = alpha * l / double(B);
  }
  double total = 0;
  for (double v : per_seq) total += v;
  return total;
}

// FP8 expert products (fp8 = true, float only): every expert's three products with the recipe's tiles
// (cpu/fp8_linear.h); the 128x1 Wgrad tiles run over that expert's tokens.
template <typename T>
void expert_linear_forward(bool fp8, T* y, const T* x, const T* W, int64_t M, int64_t N, int64_t K) {
  if constexpr (std::is_same_v<T, float>)
    if (fp8) return fp8_linear_forward(y, x, W, M, N, K);
  linear_forward(y, x, W, M, N, K);
}
template <typename T>
void expert_linear_backward(bool fp8, T* dx, bool acc, T* dW, const T* dy, const T* x, const T* W, int64_t M,
                            int64_t N, int64_t K) {
  if constexpr (std::is_same_v<T, float>)
    if (fp8) return fp8_linear_backward(dx, acc, dW, dy, x, W, M, N, K);
  linear_backward(dx, acc, dW, dy, x, W, M, N, K);
}

template <typename T>
void experts_forward(T* out, MoeSaved<T>& s, const T* x, const int32_t* idx, const T* w, const T* Wg, const T* Wu,
                     const T* Wd, int64_t N, int64_t K, int64_t H, int64_t I, int64_t E, bool fp8) {
  const int64_t NK = N * K;
  s.offsets.assign(E + 1, 0);
  for (int64_t i = 0; i < NK; ++i) s.offsets[idx[i] + 1]++;
  for (int64_t e = 0; e < E; ++e) s.offsets[e + 1] += s.offsets[e];
  s.order.resize(NK);
  s.where.resize(NK);
  std::vector<int64_t> fill(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t i = 0; i < NK; ++i) {
    s.order[fill[idx[i]]] = i;
    s.where[i] = fill[idx[i]]++;
  }
  s.G.resize(NK * I);
  s.U.resize(NK * I);
  s.Y.resize(NK * H);
#pragma omp parallel
  {
    std::vector<T> xe, a;
#pragma omp for schedule(dynamic)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = s.offsets[e], n = s.offsets[e + 1] - o;
      if (n == 0) continue;
      xe.resize(n * H);
      a.resize(n * I);
      for (int64_t i = 0; i < n; ++i) std::copy_n(x + (s.order[o + i] / K) * H, H, xe.data() + i * H);
      T* G = s.G.data() + o * I;
      T* U = s.U.data() + o * I;
      expert_linear_forward(fp8, G, xe.data(), Wg + e * I * H, n, I, H);
      expert_linear_forward(fp8, U, xe.data(), Wu + e * I * H, n, I, H);
      swiglu_forward(a.data(), G, U, n * I);
      expert_linear_forward(fp8, s.Y.data() + o * H, a.data(), Wd + e * H * I, n, H, I);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    T* o = out + t * H;
    for (int64_t k = 0; k < K; ++k) {
      const T wk = w[t * K + k];
      const T* y = s.Y.data() + s.where[t * K + k] * H;
      for (int64_t j = 0; j < H; ++j) o[j] += wk * y[j];
    }
  }
}

// Forward: out_t += sum_k w_tk y_tk, y = Wd (silu(Wg x) * Wu x).
// Backward: dw_tk = dout_t . y_tk; dy_tk = w_tk dout_t; dWd += dy^T a; da = dy Wd; (dg, du) = swiglu';
//           dWg += dg^T x; dWu += du^T x; dx_t += sum_k (dg Wg + du Wu)_tk.
template <typename T>
void experts_backward(T* dx, T* dw, T* dWg, T* dWu, T* dWd, const T* dout, MoeSaved<T>& s, const T* x,
                      const int32_t* idx, const T* w, const T* Wg, const T* Wu, const T* Wd, int64_t N, int64_t K,
                      int64_t H, int64_t I, int64_t E, bool fp8) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const T* y = s.Y.data() + s.where[t * K + k] * H;
      const T* g = dout + t * H;
      T d = 0;
      for (int64_t j = 0; j < H; ++j) d += g[j] * y[j];
      dw[t * K + k] = d;
    }
  // Y is dead now: reuse it for the per-assignment input gradients dx_tk.
  T* DX = s.Y.data();
#pragma omp parallel
  {
    std::vector<T> xe, a, dy, da, dg, du;
#pragma omp for schedule(dynamic)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = s.offsets[e], n = s.offsets[e + 1] - o;
      if (n == 0) continue;
      xe.resize(n * H);
      a.resize(n * I);
      dy.resize(n * H);
      da.resize(n * I);
      dg.resize(n * I);
      du.resize(n * I);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t tk = s.order[o + i], t = tk / K;
        std::copy_n(x + t * H, H, xe.data() + i * H);
        const T wk = w[tk];
        for (int64_t j = 0; j < H; ++j) dy[i * H + j] = wk * dout[t * H + j];
      }
      const T* G = s.G.data() + o * I;
      const T* U = s.U.data() + o * I;
      swiglu_forward(a.data(), G, U, n * I);
      expert_linear_backward(fp8, da.data(), false, dWd + e * H * I, dy.data(), a.data(), Wd + e * H * I, n, H, I);
      swiglu_backward(dg.data(), du.data(), da.data(), G, U, n * I);
      expert_linear_backward(fp8, DX + o * H, false, dWg + e * I * H, dg.data(), xe.data(), Wg + e * I * H, n, I, H);
      expert_linear_backward(fp8, DX + o * H, true, dWu + e * I * H, du.data(), xe.data(), Wu + e * I * H, n, I, H);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    T* d = dx + t * H;
    for (int64_t k = 0; k < K; ++k) {
      const T* src = DX + s.where[t * K + k] * H;
      for (int64_t j = 0; j < H; ++j) d[j] += src[j];
    }
  }
}

#define DSV3_INSTANTIATE(T)                                                                                     \
  template void route_forward<T>(int32_t*, T*, T*, const T*, const float*, int64_t, const RouteParams&);        \
  template void route_backward<T>(T*, const T*, const T*, const T*, const int32_t*, int64_t, const RouteParams&); \
  template double balance_loss<T>(T*, const T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, double,     \
                                  double);                                                                      \
  template void experts_forward<T>(T*, MoeSaved<T>&, const T*, const int32_t*, const T*, const T*, const T*,    \
                                   const T*, int64_t, int64_t, int64_t, int64_t, int64_t, bool);                \
  template void experts_backward<T>(T*, T*, T*, T*, T*, const T*, MoeSaved<T>&, const T*, const int32_t*,       \
                                    const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                                    int64_t, bool);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)
#undef DSV3_INSTANTIATE

}  // namespace dsv3::cpu
