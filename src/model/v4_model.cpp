// The DeepSeek-V4 model, top level (see v4_model.h for the reading order):
//   X      = embed[ids] copied into N streams                  [T, N, d]
//   layer  (post, comb, u) = hc_attn(X);  X = post a + comb^T X  with a = attention(rmsnorm(u, attn_norm))
//          (post, comb, u) = hc_ffn(X);   X = post f + comb^T X  with f = moe(rmsnorm(u, ffn_norm), ids)
//   logits = rmsnorm(hc_head(X), norm) head^T                   [rows, V]
#include "model/v4_model.h"

#include <algorithm>

#include "model/v4_parts.h"

namespace dsv3 {

V4Model::V4Model(V4Weights w, Backend& be) : w_(std::move(w)), be_(be) {
  if (be_.device() != Device::CPU || be_.act_dtype() != DType::F32)
    fail("DeepSeek-V4 runs on the CPU backend in fp32 for now (got backend {})", be_.name());
  const V4Config& c = w_.cfg;
  auto v = [&](const std::string& n) { return w_.view(n); };
  embed_ = v("embed.weight");
  final_norm_ = v("norm.weight");
  head_ = v("head.weight");
  hc_head_fn_ = v("hc_head_fn");
  hc_head_base_ = v("hc_head_base");
  hc_head_scale_ = v("hc_head_scale");
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) layers_.push_back(make_layer(l));
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const std::string p = "mtp." + std::to_string(k) + ".";
    V4MtpWeights m;
    m.e_proj = v(p + "e_proj.weight");
    m.h_proj = v(p + "h_proj.weight");
    m.enorm = v(p + "enorm.weight");
    m.hnorm = v(p + "hnorm.weight");
    m.norm = v(p + "norm.weight");
    m.hc_fn = v(p + "hc_head_fn");
    m.hc_base = v(p + "hc_head_base");
    m.hc_scale = v(p + "hc_head_scale");
    m.block = make_layer(c.num_hidden_layers + k);
    mtp_.push_back(std::move(m));
  }
  rope_main_.inv_freq = v4_inv_freq(c.rope_main, c.qk_rope_head_dim);
  rope_main_.attention_factor = float(c.rope_main.attention_factor);
  rope_compress_.inv_freq = v4_inv_freq(c.rope_compress, c.qk_rope_head_dim);
  rope_compress_.attention_factor = float(c.rope_compress.attention_factor);
}

V4LayerWeights V4Model::make_layer(int64_t l) const {
  const V4Config& c = w_.cfg;
  auto v = [&](const std::string& n) { return w_.view(n); };
  const int64_t E = c.n_routed_experts, F = c.moe_intermediate_size, d = c.hidden_size;
  const std::string p = c.block_prefix(l);
  V4LayerWeights L;
  L.index = l;
  L.type = c.attn_type(l);
  L.mlp = c.mlp_type(l);
  L.attn_norm = v(p + "attn_norm.weight");
  L.ffn_norm = v(p + "ffn_norm.weight");
  L.hc_attn = {v(p + "hc_attn_fn"), v(p + "hc_attn_base"), v(p + "hc_attn_scale")};
  L.hc_ffn = {v(p + "hc_ffn_fn"), v(p + "hc_ffn_base"), v(p + "hc_ffn_scale")};
  L.sink = v(p + "attn.attn_sink");
  L.wq_a = v(p + "attn.wq_a.weight");
  L.q_norm = v(p + "attn.q_norm.weight");
  L.wq_b = v(p + "attn.wq_b.weight");
  L.wkv = v(p + "attn.wkv.weight");
  L.kv_norm = v(p + "attn.kv_norm.weight");
  L.wo_a = v(p + "attn.wo_a.weight");
  L.wo_b = v(p + "attn.wo_b.weight");
  if (L.type != V4Attn::Sliding) {
    const std::string q = p + "attn.compressor.";
    L.comp = {v(q + "wkv.weight"), v(q + "wgate.weight"), v(q + "ape"), v(q + "norm.weight")};
  }
  if (L.type == V4Attn::CSA) {
    const std::string q = p + "attn.indexer.";
    L.idx.wq_b = v(q + "wq_b.weight");
    L.idx.weights_proj = v(q + "weights_proj.weight");
    L.idx.comp = {v(q + "compressor.wkv.weight"), v(q + "compressor.wgate.weight"), v(q + "compressor.ape"),
                  v(q + "compressor.norm.weight")};
  }
  L.gate = v(p + "ffn.gate.weight");
  if (L.mlp == V4Mlp::Moe) L.gate_bias = v(p + "ffn.gate.bias");
  else L.tid2eid = &w_.tid2eid[size_t(l)];
  // The layout stores each kind of expert matrix for experts 0..E-1 back to back: one grouped tensor.
  auto grouped = [&](const char* k, Shape s) {
    Tensor t = v(p + "ffn.experts.0." + k + ".weight");
    t.shape = std::move(s);
    t.name = p + "ffn.experts." + k;
    return t;
  };
  L.w1 = grouped("w1", {E, F, d});
  L.w3 = grouped("w3", {E, F, d});
  L.w2 = grouped("w2", {E, d, F});
  L.sw1 = v(p + "ffn.shared_experts.w1.weight");
  L.sw3 = v(p + "ffn.shared_experts.w3.weight");
  L.sw2 = v(p + "ffn.shared_experts.w2.weight");
  return L;
}

void V4Rows::add(const std::vector<int32_t>& new_ids, int64_t len) {
  for (size_t t = 0; t < new_ids.size(); ++t) pos.push_back(int32_t(len + int64_t(t)));
  ids.insert(ids.end(), new_ids.begin(), new_ids.end());
  off.push_back(off.back() + int64_t(new_ids.size()));
}

V4Rows V4Model::batch_rows(const std::vector<V4Seq>& batch, int64_t mtp_block) {
  const V4Config& c = w_.cfg;
  const char* what = mtp_block < 0 ? "forward" : "mtp_forward";
  V4Rows rows;
  int64_t max_len = 0;
  std::vector<const V4Cache*> seen;
  for (const V4Seq& b : batch) {
    const int64_t T = int64_t(b.ids.size());
    if (!b.cache) fail("{}: a batch entry without a cache", what);
    if (T == 0) fail("{}: no tokens", what);
    const V4Cache& cache = *b.cache;
    if (std::find(seen.begin(), seen.end(), &cache) != seen.end()) fail("{}: one cache twice in a batch", what);
    seen.push_back(&cache);
    if (cache.layers_for != c.num_hidden_layers || int64_t(cache.layers.size()) != c.num_hidden_layers)
      fail("{}: the cache was made for a model with {} layers, this one has {}", what, cache.layers_for,
           c.num_hidden_layers);
    if (mtp_block >= 0 && int64_t(cache.mtp.size()) != mtp_depth())
      fail("mtp_forward: the cache was made for another MTP depth");
    const int64_t len = mtp_block < 0 ? cache.len : cache.mtp_len[size_t(mtp_block)];
    if (len + T > c.max_position_embeddings)
      fail("sequence of {} tokens exceeds max_position_embeddings = {}", len + T, c.max_position_embeddings);
    for (int32_t id : b.ids)
      if (id < 0 || id >= c.vocab_size) fail("token id {} is out of range for vocab_size {}", id, c.vocab_size);
    rows.add(b.ids, len);
    max_len = std::max(max_len, len + T);
  }
  rope_main_.ensure(max_len);
  rope_compress_.ensure(max_len);
  return rows;
}

Tensor V4Model::forward(const std::vector<int32_t>& ids, V4Cache& cache, bool all_logits, Tensor* streams) {
  return forward(std::vector<V4Seq>{V4Seq{ids, &cache, all_logits}}, streams);
}

Tensor V4Model::forward(const std::vector<V4Seq>& batch, Tensor* streams) {
  const V4Config& c = w_.cfg;
  const int64_t N = c.hc_mult, d = c.hidden_size, V = c.vocab_size;
  const V4Rows rows = batch_rows(batch, -1);
  const int64_t T = rows.rows(), S = rows.seqs();
  if (T == 0) {  // an empty batch
    if (streams) *streams = Tensor::f32_from({}, {0, N, d});
    return Tensor::f32_from({}, {0, V});
  }

  Tensor e = v4_new(be_, {T, d}, "embed");
  be_.embedding(e, embed_, rows.ids);
  Tensor X = v4_new(be_, {T, N, d}, "streams");
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < N; ++j) std::copy_n(e.f32() + t * d, d, X.f32() + (t * N + j) * d);
  std::vector<V4LayerCache*> lc(static_cast<size_t>(S));
  for (const auto& L : layers_) {
    for (int64_t s = 0; s < S; ++s) lc[size_t(s)] = &batch[size_t(s)].cache->layers[size_t(L.index)];
    X = layer_forward(L, X, rows, lc);
  }
  if (streams) *streams = X;

  Tensor h = v4_new(be_, {T, d}, "hc_head");
  v4_hc_head(be_, c, hc_head_fn_, hc_head_base_, hc_head_scale_, X, h);
  // The rows that give logits: each sequence's every row (all_logits) or its last.
  std::vector<int64_t> out_rows;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = batch[size_t(s)].all_logits ? 0 : rows.count(s) - 1; t < rows.count(s); ++t)
      out_rows.push_back(rows.begin(s) + t);
  const int64_t R = int64_t(out_rows.size());
  Tensor hs = v4_new(be_, {R, d}, "final_rows");
  for (int64_t i = 0; i < R; ++i) std::copy_n(h.f32() + out_rows[size_t(i)] * d, d, hs.f32() + i * d);
  Tensor hr = v4_new(be_, {R, d}, "final_hidden");
  be_.rmsnorm(hr, hs, final_norm_, float(c.rms_norm_eps));
  Tensor logits = v4_new(be_, {R, V}, "logits");
  be_.linear(logits, hr, head_);
  for (const V4Seq& b : batch) b.cache->len += int64_t(b.ids.size());
  return logits;
}

Tensor V4Model::layer_forward(const V4LayerWeights& L, const Tensor& X, const V4Rows& rows,
                              const std::vector<V4LayerCache*>& lc) {
  const V4Config& c = w_.cfg;
  const int64_t T = X.dim(0), d = c.hidden_size;
  const float eps = float(c.rms_norm_eps);
  const V4RopeTable& rope = L.type == V4Attn::Sliding ? rope_main_ : rope_compress_;
  std::vector<float> post, comb;
  Tensor u, xn = v4_new(be_, {T, d}, "block_in");
  // Attention block.
  v4_hc_pre(be_, c, L.hc_attn, X, u, post, comb);
  be_.rmsnorm(xn, u, L.attn_norm, eps);
  Tensor a = v4_attention(be_, c, L, xn, rows, lc, rope);
  Tensor X1 = v4_new(be_, X.shape, "streams");
  v4_hc_post(c, X1, X, a, post, comb);
  // MoE block: routing over every row of the batch, then the routed experts on top of the shared expert.
  v4_hc_pre(be_, c, L.hc_ffn, X1, u, post, comb);
  be_.rmsnorm(xn, u, L.ffn_norm, eps);
  V4Routing r = v4_route(be_, c, L, xn, rows.ids);
  Tensor f = v4_new(be_, {T, d}, "moe_out");
  v4_shared_expert(be_, c, L, xn, f);
  v4_experts_acc(be_, c, L, xn, r, f);
  Tensor X2 = v4_new(be_, X.shape, "streams");
  v4_hc_post(c, X2, X1, f, post, comb);
  return X2;
}

Tensor V4Model::mtp_forward(int64_t k, const Tensor& X, const std::vector<int32_t>& next_ids, V4Cache& cache,
                            Tensor* streams_out) {
  return mtp_forward(k, X, std::vector<V4Seq>{V4Seq{next_ids, &cache, true}}, streams_out);
}

Tensor V4Model::mtp_forward(int64_t k, const Tensor& X, const std::vector<V4Seq>& batch, Tensor* streams_out) {
  const V4Config& c = w_.cfg;
  const int64_t N = c.hc_mult, d = c.hidden_size, V = c.vocab_size;
  if (k < 0 || k >= mtp_depth()) fail("this model has no MTP block {} (it has {})", k, mtp_depth());
  const V4Rows rows = batch_rows(batch, k);
  const int64_t T = rows.rows(), S = rows.seqs();
  if (X.shape != Shape{T, N, d}) fail("mtp_forward: streams {} for {} tokens", shape_str(X.shape), T);
  if (T == 0) {
    if (streams_out) *streams_out = Tensor::f32_from({}, {0, N, d});
    return Tensor::f32_from({}, {0, V});
  }
  const V4MtpWeights& M = mtp_[size_t(k)];
  const float eps = float(c.rms_norm_eps);
  // X0_j = rmsnorm(X_j, hnorm) h_proj^T + rmsnorm(embed[next], enorm) e_proj^T
  Tensor e = v4_new(be_, {T, d}, "mtp_embed"), en = v4_new(be_, {T, d}, "mtp_enorm"), pe = v4_new(be_, {T, d}, "mtp_e_proj");
  be_.embedding(e, embed_, rows.ids);
  be_.rmsnorm(en, e, M.enorm, eps);
  be_.linear(pe, en, M.e_proj);
  Tensor Xs = X.reshape({T * N, d});
  Tensor xh = v4_new(be_, {T * N, d}, "mtp_hnorm");
  be_.rmsnorm(xh, Xs, M.hnorm, eps);
  Tensor X0 = v4_new(be_, {T, N, d}, "mtp_streams");
  Tensor X0r = X0.reshape({T * N, d});
  be_.linear(X0r, xh, M.h_proj);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t i = 0; i < d; ++i) X0.f32()[(t * N + j) * d + i] += pe.f32()[t * d + i];
  std::vector<V4LayerCache*> lc(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) lc[size_t(s)] = &batch[size_t(s)].cache->mtp[size_t(k)];
  Tensor X1 = layer_forward(M.block, X0, rows, lc);
  if (streams_out) *streams_out = X1;
  Tensor h = v4_new(be_, {T, d}, "mtp_hc_head"), hn = v4_new(be_, {T, d}, "mtp_hidden");
  v4_hc_head(be_, c, M.hc_fn, M.hc_base, M.hc_scale, X1, h);
  be_.rmsnorm(hn, h, M.norm, eps);
  Tensor logits = v4_new(be_, {T, V}, "mtp_logits");
  be_.linear(logits, hn, head_);
  for (const V4Seq& b : batch) b.cache->mtp_len[size_t(k)] += int64_t(b.ids.size());
  return logits;
}

int64_t V4Cache::values() const {
  int64_t n = 0;
  for (const auto& l : layers)
    n += int64_t(l.window.size() + l.comp.kv.size() + l.comp.buf_kv.size() + l.comp.buf_gate.size() +
                 l.comp.prev_kv.size() + l.comp.prev_gate.size() + l.index.kv.size() + l.index.buf_kv.size() +
                 l.index.buf_gate.size() + l.index.prev_kv.size() + l.index.prev_gate.size());
  return n;
}

}  // namespace dsv3
