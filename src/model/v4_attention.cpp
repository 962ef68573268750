// DeepSeek-V4 attention, one layer, the new tokens of a batch of sequences (each sequence its own cache). One
// shared key=value head of width c serves all H query heads (MQA); keys are the window branch (the W most recent
// tokens, a ring in the cache) plus, in CSA / HCA layers, compressed entries (HCA: every closed entry; CSA: the
// indexer's top-k). Each head has a learned sink logit that only enlarges the softmax denominator. Because values
// are the (rotated) keys, the output's rope dims are rotated back by minus the query position before the grouped
// output projection: heads are split into g groups, each projected to d_g by its own block of wo_a, then wo_b
// mixes all groups. The projections run over the rows of every sequence at once; the window, the compressed
// entries and the keys each query sees are its own sequence's.
//   q   = rope(rms_per_head(rmsnorm(x wq_a^T, q_norm) wq_b^T))        [T, H, c]
//   kv  = rope(rmsnorm(x wkv^T, kv_norm))                              [T, c]
//   o_h = softmax_with_sink(q_h . keys / sqrt(c)) values               [T, H, c]
//   out = concat_j(rope^-1(o)_group_j wo_a_j^T) wo_b^T                 [T, d]
#include <algorithm>
#include <cmath>

#include "model/v4_kernels.h"
#include "model/v4_parts.h"

namespace dsv3 {

Tensor v4_attention(Backend& be, const V4Config& c, const V4LayerWeights& L, const Tensor& xa, const V4Rows& rows,
                    const std::vector<V4LayerCache*>& lc, const V4RopeTable& rope) {
  const int64_t T = xa.dim(0), H = c.num_attention_heads, hd = c.head_dim, r = c.qk_rope_head_dim,
                W = c.sliding_window, g = c.o_groups, dg = c.o_lora_rank, S = rows.seqs();
  const float eps = float(c.rms_norm_eps);
  const std::vector<int32_t>& pos = rows.pos;
  // Queries (every row of the batch).
  Tensor qa = v4_new(be, {T, c.q_lora_rank}, "q_a");
  be.linear(qa, xa, L.wq_a);
  be.rmsnorm(qa, qa, L.q_norm, eps);
  Tensor q = v4_new(be, {T, H * hd}, "q");
  be.linear(q, qa, L.wq_b);
  v4_rms_unweighted(q.f32(), T * H, hd, eps);
  be.rope(q, H, hd, hd - r, pos, rope.cos, rope.sin, /*interleave=*/true);
  // The new key/value vectors.
  Tensor kv = v4_new(be, {T, hd}, "kv");
  be.linear(kv, xa, L.wkv);
  be.rmsnorm(kv, kv, L.kv_norm, eps);
  be.rope(kv, 1, hd, hd - r, pos, rope.cos, rope.sin, /*interleave=*/true);

  // Per sequence: window keys (the ring's positions [pos0 - prev, pos0) in order, then its new tokens), and
  // the ring updated with the new tokens.
  const int64_t ring = W - 1;
  std::vector<std::vector<float>> win(static_cast<size_t>(S));
  std::vector<int64_t> prev(static_cast<size_t>(S)), seq_of(static_cast<size_t>(T));
  for (int64_t s = 0; s < S; ++s) {
    V4LayerCache& ls = *lc[size_t(s)];
    const int64_t t0 = rows.begin(s), T_s = rows.count(s), pos0 = pos[size_t(t0)], pv = std::min(pos0, ring);
    prev[size_t(s)] = pv;
    std::vector<float>& w = win[size_t(s)];
    w.resize(size_t((pv + T_s) * hd));
    for (int64_t i = 0; i < pv; ++i) {
      const int64_t p = pos0 - pv + i;
      std::copy_n(ls.window.data() + (p % ring) * hd, hd, w.data() + i * hd);
    }
    std::copy_n(kv.f32() + t0 * hd, T_s * hd, w.data() + pv * hd);
    if (ring > 0) {
      if (ls.window.empty()) ls.window.assign(size_t(ring * hd), 0.f);
      for (int64_t t = std::max<int64_t>(0, T_s - ring); t < T_s; ++t)
        std::copy_n(kv.f32() + (t0 + t) * hd, hd, ls.window.data() + ((pos0 + t) % ring) * hd);
    }
    for (int64_t t = t0; t < t0 + T_s; ++t) seq_of[size_t(t)] = s;
  }

  // Compressed entries and which of them each query sees (the compressor and indexer projections over every
  // row, their state per sequence).
  int64_t m = 0;
  V4IndexSelection sel;
  if (L.type != V4Attn::Sliding) {
    m = L.type == V4Attn::CSA ? c.compress_rate_csa : c.compress_rate_hca;
    std::vector<V4CompressorState*> comp(static_cast<size_t>(S)), index(static_cast<size_t>(S));
    for (int64_t s = 0; s < S; ++s) comp[size_t(s)] = &lc[size_t(s)]->comp, index[size_t(s)] = &lc[size_t(s)]->index;
    v4_compress(be, c, L.comp, xa, rows, m, /*overlap=*/L.type == V4Attn::CSA, hd, rope, comp);
    if (L.type == V4Attn::CSA) sel = v4_index_select(be, c, L.idx, xa, qa, rows, index, rope);
  }

  // Core attention with sinks, every (row, head) of the batch over its own sequence's keys.
  Tensor o = v4_new(be, {T, H * hd}, "attn_o");
  const float scale = 1.f / std::sqrt(float(hd));
  const float* sinks = L.sink.f32();
#pragma omp parallel for collapse(2) schedule(dynamic) if (T * H > 1)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t s = seq_of[size_t(t)], ts = t - rows.begin(s), p = pos[size_t(t)];
      const float* qh = q.f32() + (t * H + h) * hd;
      const float* wk = win[size_t(s)].data();
      const float* ent = lc[size_t(s)]->comp.kv.data();
      // Visible keys: window positions (p - W, p], then entries (HCA: closed by p; CSA: selected).
      std::vector<const float*> keys;
      const int64_t w_hi = prev[size_t(s)] + ts;  // index of position p in win
      for (int64_t j = std::max<int64_t>(0, w_hi - W + 1); j <= w_hi; ++j) keys.push_back(wk + j * hd);
      if (L.type == V4Attn::HCA) {
        const int64_t vis = std::min(lc[size_t(s)]->comp.entries, (p + 1) / m);
        for (int64_t e = 0; e < vis; ++e) keys.push_back(ent + e * hd);
      } else if (L.type == V4Attn::CSA) {
        const int64_t k = sel.k[size_t(s)];
        const int32_t* st = sel.sel[size_t(s)].data() + ts * k;
        for (int64_t j = 0; j < k; ++j)
          if (st[j] >= 0) keys.push_back(ent + int64_t(st[j]) * hd);
      }
      std::vector<float> pr(keys.size());
      v4k::sink_attention(o.f32() + (t * H + h) * hd, pr.data(), qh, keys.data(), int64_t(keys.size()), sinks[h],
                          scale, hd);
    }
  // Undo the values' rotation at the query position (rotation by minus the angle).
  be.rope(o, H, hd, hd - r, pos, rope.cos, rope.sin_neg, /*interleave=*/true);

  // Grouped output projection: group j = heads [j H/g, (j + 1) H/g), its own rows of wo_a.
  const int64_t gw = H * hd / g;
  Tensor y = v4_new(be, {T, g * dg}, "o_groups");
  Tensor xg = v4_new(be, {T, gw}, "o_group_in"), yg = v4_new(be, {T, dg}, "o_group_out");
  for (int64_t j = 0; j < g; ++j) {
    for (int64_t t = 0; t < T; ++t) std::copy_n(o.f32() + t * H * hd + j * gw, gw, xg.f32() + t * gw);
    Tensor wj = L.wo_a.rows(j * dg, (j + 1) * dg);
    be.linear(yg, xg, wj);
    for (int64_t t = 0; t < T; ++t) std::copy_n(yg.f32() + t * dg, dg, y.f32() + t * g * dg + j * dg);
  }
  Tensor out = v4_new(be, {T, c.hidden_size}, "attn_out");
  be.linear(out, y, L.wo_b);
  return out;
}

}  // namespace dsv3
