// DeepSeek-V4 attention, one layer, one sequence's new tokens. One shared key=value head of width c serves
// all H query heads (MQA); keys are the window branch (the W most recent tokens, a ring in the cache) plus,
// in CSA / HCA layers, compressed entries (HCA: every closed entry; CSA: the indexer's top-k). Each head has
// a learned sink logit that only enlarges the softmax denominator. Because values are the (rotated) keys,
// the output's rope dims are rotated back by minus the query position before the grouped output projection:
// heads are split into g groups, each projected to d_g by its own block of wo_a, then wo_b mixes all groups.
//   q   = rope(rms_per_head(rmsnorm(x wq_a^T, q_norm) wq_b^T))        [T, H, c]
//   kv  = rope(rmsnorm(x wkv^T, kv_norm))                              [T, c]
//   o_h = softmax_with_sink(q_h . keys / sqrt(c)) values               [T, H, c]
//   out = concat_j(rope^-1(o)_group_j wo_a_j^T) wo_b^T                 [T, d]
#include <algorithm>
#include <cmath>

#include "model/v4_kernels.h"
#include "model/v4_parts.h"

namespace dsv3 {

Tensor v4_attention(Backend& be, const V4Config& c, const V4LayerWeights& L, const Tensor& xa,
                    const std::vector<int32_t>& pos, V4LayerCache& lc, const V4RopeTable& rope) {
  const int64_t T = xa.dim(0), H = c.num_attention_heads, hd = c.head_dim, r = c.qk_rope_head_dim,
                W = c.sliding_window, g = c.o_groups, dg = c.o_lora_rank;
  const float eps = float(c.rms_norm_eps);
  // Queries.
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

  // Window keys: the ring's positions [pos0 - prev, pos0) in order, then the new tokens.
  const int64_t pos0 = pos[0], ring = W - 1, prev = std::min(pos0, ring);
  std::vector<float> win(size_t((prev + T) * hd));
  for (int64_t i = 0; i < prev; ++i) {
    const int64_t p = pos0 - prev + i;
    std::copy_n(lc.window.data() + (p % ring) * hd, hd, win.data() + i * hd);
  }
  std::copy_n(kv.f32(), T * hd, win.data() + prev * hd);
  if (ring > 0) {
    if (lc.window.empty()) lc.window.assign(size_t(ring * hd), 0.f);
    for (int64_t t = std::max<int64_t>(0, T - ring); t < T; ++t)
      std::copy_n(kv.f32() + t * hd, hd, lc.window.data() + ((pos0 + t) % ring) * hd);
  }

  // Compressed entries and which of them each query sees.
  const float* ent = nullptr;
  int64_t n_ent = 0, k = 0, m = 0;
  std::vector<int32_t> sel;
  if (L.type != V4Attn::Sliding) {
    m = L.type == V4Attn::CSA ? c.compress_rate_csa : c.compress_rate_hca;
    v4_compress(be, c, L.comp, xa, m, /*overlap=*/L.type == V4Attn::CSA, hd, rope, lc.comp);
    if (L.type == V4Attn::CSA) sel = v4_index_select(be, c, L.idx, xa, qa, pos, lc.index, rope, &k);
    ent = lc.comp.kv.data();
    n_ent = lc.comp.entries;
  }

  // Core attention with sinks.
  Tensor o = v4_new(be, {T, H * hd}, "attn_o");
  const float scale = 1.f / std::sqrt(float(hd));
  const float* sinks = L.sink.f32();
#pragma omp parallel for collapse(2) schedule(dynamic) if (T * H > 1)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t p = pos[size_t(t)];
      const float* qh = q.f32() + (t * H + h) * hd;
      // Visible keys: window positions (p - W, p], then entries (HCA: closed by p; CSA: selected).
      std::vector<const float*> keys;
      const int64_t w_hi = prev + t;  // index of position p in win
      for (int64_t j = std::max<int64_t>(0, w_hi - W + 1); j <= w_hi; ++j) keys.push_back(win.data() + j * hd);
      if (L.type == V4Attn::HCA) {
        const int64_t vis = std::min(n_ent, (p + 1) / m);
        for (int64_t e = 0; e < vis; ++e) keys.push_back(ent + e * hd);
      } else if (L.type == V4Attn::CSA) {
        for (int64_t j = 0; j < k; ++j)
          if (sel[size_t(t * k + j)] >= 0) keys.push_back(ent + int64_t(sel[size_t(t * k + j)]) * hd);
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
