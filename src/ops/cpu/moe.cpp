// DeepSeekMoE on the CPU: routing (sigmoid + bias + group-limited top-k, or V2's softmax variants) and the
// routed experts as grouped tensors. Routing is separate from expert compute so expert parallelism can sit
// between them later.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/fp8.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/gemm.h"

namespace dsv3::cpu {

namespace {

// Indices of the k largest values, descending; ties go to the lower index (torch.topk on CPU agrees for
// distinct values, which is all that random fp32 data produces).
void topk_desc(const float* v, int64_t n, int64_t k, int32_t* out) {
  std::vector<int32_t> ix(n);
  std::iota(ix.begin(), ix.end(), 0);
  std::partial_sort(ix.begin(), ix.begin() + k, ix.end(), [&](int32_t a, int32_t b) {
    return v[a] > v[b] || (v[a] == v[b] && a < b);
  });
  std::copy(ix.begin(), ix.begin() + k, out);
}

}  // namespace

void moe_route(int32_t* idx, float* w, const float* logits, const float* bias, int64_t T, const RouteParams& p,
               float* scores_out) {
  const int64_t E = p.n_experts, K = p.top_k, G = p.n_group, per = E / std::max<int64_t>(G, 1);
#pragma omp parallel for schedule(static) if (T > 16)
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> s(E), sel(E);
    const float* l = logits + t * E;
    if (p.sigmoid) {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.f / (1.f + std::exp(-l[e]));
    } else {
      float mx = *std::max_element(l, l + E);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) s[e] = float(s[e] / sum);
    }
    if (scores_out) std::copy(s.begin(), s.end(), scores_out + t * E);
    for (int64_t e = 0; e < E; ++e) sel[e] = s[e] + (p.noaux_bias && bias ? bias[e] : 0.f);
    if (p.group_limited && G > 1) {
      std::vector<float> gscore(G);
      for (int64_t g = 0; g < G; ++g) {
        const float* v = sel.data() + g * per;
        if (p.noaux_bias) {  // V3: sum of the group's two best biased scores
          int32_t top2[2];
          int64_t k2 = std::min<int64_t>(2, per);
          topk_desc(v, per, k2, top2);
          gscore[g] = 0;
          for (int64_t i = 0; i < k2; ++i) gscore[g] += v[top2[i]];
        } else {  // V2 group_limited_greedy: the group's best score
          gscore[g] = *std::max_element(v, v + per);
        }
      }
      std::vector<int32_t> keep(p.topk_group);
      topk_desc(gscore.data(), G, p.topk_group, keep.data());
      std::vector<char> allowed(G, 0);
      for (auto g : keep) allowed[g] = 1;
      // Experts of dropped groups get selection score 0.0 (transformers' masked_fill), not -inf.
      for (int64_t e = 0; e < E; ++e)
        if (!allowed[e / per]) sel[e] = 0.f;
    }
    int32_t* it = idx + t * K;
    topk_desc(sel.data(), E, K, it);
    float* wt = w + t * K;
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += (wt[k] = s[it[k]]);
    if (p.sigmoid) {
      if (p.norm_topk_prob)
        for (int64_t k = 0; k < K; ++k) wt[k] = float(wt[k] / (sum + 1e-20));
      for (int64_t k = 0; k < K; ++k) wt[k] = float(wt[k] * p.scaling);
    } else if (p.norm_topk_prob && K > 1) {  // DeepSeek-V2: normalized weights are not scaled
      for (int64_t k = 0; k < K; ++k) wt[k] = float(wt[k] / (sum + 1e-20));
    } else {
      for (int64_t k = 0; k < K; ++k) wt[k] = float(wt[k] * p.scaling);
    }
  }
}

void moe_experts_acc(float* out, const float* x, const int32_t* idx, const float* w, int64_t T, int64_t K,
                     int64_t H, const Tensor& gate, const Tensor& up, const Tensor& down) {
  const int64_t E = gate.dim(0), I = gate.dim(1);
  // FP8 experts (F8E4M3 codes with per-expert 128x128 scale grids): the token rows are quantized in 1x128 tiles
  // once for the gate and up products, the SwiGLU output once before the down product (rows are independent,
  // so quantizing them before or after bucketing is the same).
  const bool f8 = gate.dtype == DType::F8E4M3;
  DSV3_CHECK(up.dtype == gate.dtype && down.dtype == gate.dtype, "moe_experts_acc: mixed expert dtypes");
  std::vector<float> xq;
  if (f8) {
    DSV3_CHECK(gate.scale && up.scale && down.scale, "fp8 experts {} have no block scales", gate.name);
    xq.assign(x, x + T * H);
    fp8::round_trip_1x128(xq.data(), T, H, H);
    x = xq.data();
  }
  auto scales = [&](const Tensor& g, int64_t e) -> const float* {
    return f8 ? g.scale + e * fp8::tiles(g.dim(1)) * fp8::tiles(g.dim(2)) : nullptr;
  };
  auto product = [&](int64_t n, int64_t N, int64_t Kd, const float* A, const Tensor& g, int64_t e, float* C) {
    if (f8) gemm_xwT_fp8(n, N, Kd, A, Kd, static_cast<const uint8_t*>(expert_slice(g, e)), scales(g, e), C, N);
    else gemm_xwT(n, N, Kd, A, Kd, expert_slice(g, e), g.dtype, Kd, C, N);
  };
  // Bucket (token, slot) pairs by expert, in token order, so accumulation order is deterministic.
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t i = 0; i < T * K; ++i) count[idx[i] + 1]++;
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  std::vector<int64_t> order(T * K), fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < T * K; ++i) order[fill[idx[i]]++] = i;
  int64_t maxn = 0;
  for (int64_t e = 0; e < E; ++e) maxn = std::max(maxn, count[e + 1] - count[e]);
  if (maxn <= kSmallM) {
    // Decode-sized batches: every active expert's gate and up products in one parallel pass, then every
    // down product in another (weights stream without a fork/join per small matrix).
    std::vector<float> xs(T * K * H), gs(T * K * I), us(T * K * I), ys(T * K * H);
    for (int64_t i = 0; i < T * K; ++i) {
      const int64_t row = order[i];
      std::copy(x + (row / K) * H, x + (row / K + 1) * H, xs.data() + i * H);
    }
    std::vector<GemvJob> jobs;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = count[e + 1] - count[e], o = count[e];
      if (n == 0) continue;
      jobs.push_back({expert_slice(gate, e), gate.dtype, I, H, H, xs.data() + o * H, H, gs.data() + o * I, I, n,
                      scales(gate, e)});
      jobs.push_back({expert_slice(up, e), up.dtype, I, H, H, xs.data() + o * H, H, us.data() + o * I, I, n,
                      scales(up, e)});
    }
    gemv_multi(jobs);
    for (int64_t i = 0; i < T * K * I; ++i) gs[i] = gs[i] / (1.f + std::exp(-gs[i])) * us[i];
    if (f8) fp8::round_trip_1x128(gs.data(), T * K, I, I);
    jobs.clear();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = count[e + 1] - count[e], o = count[e];
      if (n == 0) continue;
      jobs.push_back({expert_slice(down, e), down.dtype, H, I, I, gs.data() + o * I, I, ys.data() + o * H, H, n,
                      scales(down, e)});
    }
    gemv_multi(jobs);
    for (int64_t i = 0; i < T * K; ++i) {
      float* o = out + (order[i] / K) * H;
      const float wk = w[order[i]];
      const float* yr = ys.data() + i * H;
      for (int64_t j = 0; j < H; ++j) o[j] += wk * yr[j];
    }
    return;
  }
  std::vector<float> xe(maxn * H), g(maxn * I), u(maxn * I), y(maxn * H);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = count[e + 1] - count[e];
    if (n == 0) continue;  // experts without tokens cost nothing
    const int64_t* rows = order.data() + count[e];
    for (int64_t i = 0; i < n; ++i) std::copy(x + (rows[i] / K) * H, x + (rows[i] / K + 1) * H, xe.data() + i * H);
    product(n, I, H, xe.data(), gate, e, g.data());
    product(n, I, H, xe.data(), up, e, u.data());
    for (int64_t i = 0; i < n * I; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    if (f8) fp8::round_trip_1x128(g.data(), n, I, I);
    product(n, H, I, g.data(), down, e, y.data());
    for (int64_t i = 0; i < n; ++i) {
      float* o = out + (rows[i] / K) * H;
      const float wk = w[rows[i]];
      const float* yr = y.data() + i * H;
      for (int64_t j = 0; j < H; ++j) o[j] += wk * yr[j];
    }
  }
}

}  // namespace dsv3::cpu
