// The lightning indexer of CSA layers: which compressed entries each query attends to. It keeps its own
// overlapped compressor at width c_I (keys K^I [T_e, c_I]) and scores
//   I[t, w] = sum_h (x_t W_w^T)_h / sqrt(H_I) * relu(q^I_{t,h} . K^I_w) / sqrt(c_I)
// with q^I = (normed q latent) W_Iq^T, [H_I, c_I] per token, rotated at the query position. Entries that have
// not closed by t (w >= floor((t + 1) / m)) are excluded; the top k = min(index_topk, T_e) remain, and picks
// beyond a query's visible entries become -1. The output is indices only: nothing here is differentiable.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "model/v4_parts.h"

namespace dsv3 {

std::vector<int32_t> v4_index_select(Backend& be, const V4Config& c, const V4IndexerWeights& w, const Tensor& xa,
                                     const Tensor& qa, const std::vector<int32_t>& pos, V4CompressorState& st,
                                     const V4RopeTable& rope, int64_t* k_out) {
  const int64_t T = xa.dim(0), HI = c.index_n_heads, cI = c.index_head_dim, m = c.compress_rate_csa,
                r = c.qk_rope_head_dim;
  v4_compress(be, c, w.comp, xa, m, /*overlap=*/true, cI, rope, st);
  const int64_t n = st.entries, k = std::min(c.index_topk, n);
  *k_out = k;
  std::vector<int32_t> sel(size_t(T * k), -1);
  if (k == 0) return sel;
  Tensor q = v4_new(be, {T, HI * cI}, "index_q");
  be.linear(q, qa, w.wq_b);
  be.rope(q, HI, cI, cI - r, pos, rope.cos, rope.sin, /*interleave=*/true);
  Tensor hw = v4_new(be, {T, HI}, "index_weights");
  be.linear(hw, xa, w.weights_proj);
  const float q_scale = 1.f / std::sqrt(float(cI)), w_scale = 1.f / std::sqrt(float(HI));
  const float* K = st.kv.data();
#pragma omp parallel for schedule(dynamic) if (T > 1)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t visible = (int64_t(pos[size_t(t)]) + 1) / m;
    std::vector<float> score(size_t(n), -INFINITY);
    for (int64_t e = 0; e < std::min(visible, n); ++e) {
      float s = 0;
      for (int64_t h = 0; h < HI; ++h) {
        const float* qh = q.f32() + (t * HI + h) * cI;
        const float* ke = K + e * cI;
        float dot = 0;
        for (int64_t i = 0; i < cI; ++i) dot += qh[i] * ke[i];
        s += std::max(dot, 0.f) * q_scale * (hw.f32()[t * HI + h] * w_scale);
      }
      score[size_t(e)] = s;
    }
    std::vector<int32_t> ix(static_cast<size_t>(n));
    std::iota(ix.begin(), ix.end(), 0);
    std::partial_sort(ix.begin(), ix.begin() + k, ix.end(), [&](int32_t a, int32_t b) {
      return score[size_t(a)] > score[size_t(b)] || (score[size_t(a)] == score[size_t(b)] && a < b);
    });
    for (int64_t j = 0; j < k; ++j) sel[size_t(t * k + j)] = ix[size_t(j)] < visible ? ix[size_t(j)] : -1;
  }
  return sel;
}

}  // namespace dsv3
