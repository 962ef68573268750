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

V4IndexSelection v4_index_select(Backend& be, const V4Config& c, const V4IndexerWeights& w, const Tensor& xa,
                                 const Tensor& qa, const V4Rows& rows, const std::vector<V4CompressorState*>& st,
                                 const V4RopeTable& rope) {
  const int64_t T = xa.dim(0), HI = c.index_n_heads, cI = c.index_head_dim, m = c.compress_rate_csa,
                r = c.qk_rope_head_dim, S = rows.seqs();
  v4_compress(be, c, w.comp, xa, rows, m, /*overlap=*/true, cI, rope, st);
  V4IndexSelection out;
  out.k.resize(size_t(S));
  out.sel.resize(size_t(S));
  bool any = false;
  std::vector<int64_t> seq_of(static_cast<size_t>(T));
  for (int64_t s = 0; s < S; ++s) {
    const int64_t k = std::min(c.index_topk, st[size_t(s)]->entries);
    out.k[size_t(s)] = k;
    out.sel[size_t(s)].assign(size_t(rows.count(s) * k), -1);
    any = any || k > 0;
    for (int64_t t = rows.begin(s); t < rows.begin(s) + rows.count(s); ++t) seq_of[size_t(t)] = s;
  }
  if (!any) return out;
  // Query and head-weight projections of every row at once; scoring reads each row's own sequence's keys.
  Tensor q = v4_new(be, {T, HI * cI}, "index_q");
  be.linear(q, qa, w.wq_b);
  be.rope(q, HI, cI, cI - r, rows.pos, rope.cos, rope.sin, /*interleave=*/true);
  Tensor hw = v4_new(be, {T, HI}, "index_weights");
  be.linear(hw, xa, w.weights_proj);
  const float q_scale = 1.f / std::sqrt(float(cI)), w_scale = 1.f / std::sqrt(float(HI));
#pragma omp parallel for schedule(dynamic) if (T > 1)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = seq_of[size_t(t)], n = st[size_t(s)]->entries, k = out.k[size_t(s)];
    if (k == 0) continue;
    const float* K = st[size_t(s)]->kv.data();
    const int64_t visible = (int64_t(rows.pos[size_t(t)]) + 1) / m;
    std::vector<float> score(size_t(n), -INFINITY);
    for (int64_t e = 0; e < std::min(visible, n); ++e) {
      float sc = 0;
      for (int64_t h = 0; h < HI; ++h) {
        const float* qh = q.f32() + (t * HI + h) * cI;
        const float* ke = K + e * cI;
        float dot = 0;
        for (int64_t i = 0; i < cI; ++i) dot += qh[i] * ke[i];
        sc += std::max(dot, 0.f) * q_scale * (hw.f32()[t * HI + h] * w_scale);
      }
      score[size_t(e)] = sc;
    }
    std::vector<int32_t> ix(static_cast<size_t>(n));
    std::iota(ix.begin(), ix.end(), 0);
    std::partial_sort(ix.begin(), ix.begin() + k, ix.end(), [&](int32_t a, int32_t b) {
      return score[size_t(a)] > score[size_t(b)] || (score[size_t(a)] == score[size_t(b)] && a < b);
    });
    int32_t* sel = out.sel[size_t(s)].data() + (t - rows.begin(s)) * k;
    for (int64_t j = 0; j < k; ++j) sel[j] = ix[size_t(j)] < visible ? ix[size_t(j)] : -1;
  }
  return out;
}

std::vector<int32_t> v4_index_select(Backend& be, const V4Config& c, const V4IndexerWeights& w, const Tensor& xa,
                                     const Tensor& qa, const std::vector<int32_t>& pos, V4CompressorState& st,
                                     const V4RopeTable& rope, int64_t* k_out) {
  V4Rows rows;
  rows.off = {0, xa.dim(0)};
  rows.pos = pos;
  V4IndexSelection r = v4_index_select(be, c, w, xa, qa, rows, {&st}, rope);
  *k_out = r.k[0];
  return std::move(r.sel[0]);
}

}  // namespace dsv3
