#include "model/model.h"

#include <algorithm>

#include "model/v32_indexer.h"

namespace dsv3 {

struct Model::Step {
  int64_t T = 0;
  std::vector<int32_t> ids;    // [T] token ids, in row order
  std::vector<int32_t> pos;    // [T] positions
  std::vector<SeqSlice> seqs;  // decode slices (one token each) first, then prefill sequences
  int64_t n_decode = 0;        // leading slices that take the absorbed single-token path
  std::vector<std::vector<int64_t>> rows_of;  // batch entry -> its rows, in token order
};

// A sequence adding at most this many tokens takes the absorbed path token by token (decode steps and
// speculative verification); longer ones decompress keys and values (prefill).
static constexpr int64_t kMaxAbsorbedTokens = 4;

Model::Model(ModelConfig cfg, ModelWeights w, Backend& be) : cfg_(std::move(cfg)), w_(std::move(w)), be_(be) {
  Tensor c, s;
  make_rope_tables(cfg_, cfg_.max_position_embeddings, &c, &s);
  rope_cos_ = be_.upload(c);
  rope_sin_ = be_.upload(s);
  route_ = RouteParams::from_config(cfg_);
}

Model::Step Model::prepare(std::vector<BatchSeq>& batch, KvCache& cache, bool absorb) {
  Step st;
  for (auto& b : batch) {
    if (!b.cache) fail("forward: a sequence has no cache");
    if (b.tokens.empty()) fail("forward: a sequence has no tokens");
    const int64_t pos0 = b.cache->len, len = int64_t(b.tokens.size());
    if (pos0 + len > cfg_.max_position_embeddings)
      fail("sequence of {} tokens exceeds max_position_embeddings = {}", pos0 + len, cfg_.max_position_embeddings);
    for (auto id : b.tokens)
      if (id < 0 || id >= cfg_.vocab_size) fail("token id {} is out of range for vocab_size {}", id, cfg_.vocab_size);
    if (!cache.reserve(*b.cache, pos0 + len))
      fail("the KV cache is full ({} blocks of {} tokens): cannot hold {} more tokens", cache.total_blocks(),
           cache.spec().block_size, len);
  }
  // Rows: every token of short sequences first (absorbed path, one slice per token), then long sequences.
  st.rows_of.resize(batch.size());
  auto add_rows = [&](size_t i, bool split) {
    BatchSeq& b = batch[i];
    const int64_t pos0 = b.cache->len, len = int64_t(b.tokens.size());
    SeqSlice s;
    s.blocks = b.cache->blocks.data();
    s.num_blocks = int64_t(b.cache->blocks.size());
    for (int64_t j = 0; j < len; ++j) {
      if (split || j == 0) {
        s.row0 = st.T;
        s.pos0 = pos0 + j;
        s.len = split ? 1 : len;
        st.seqs.push_back(s);
      }
      st.rows_of[i].push_back(st.T);
      st.ids.push_back(b.tokens[j]);
      st.pos.push_back(int32_t(pos0 + j));
      ++st.T;
    }
  };
  for (size_t i = 0; i < batch.size(); ++i)
    if (absorb && int64_t(batch[i].tokens.size()) <= kMaxAbsorbedTokens) add_rows(i, true);
  st.n_decode = int64_t(st.seqs.size());
  for (size_t i = 0; i < batch.size(); ++i)
    if (!(absorb && int64_t(batch[i].tokens.size()) <= kMaxAbsorbedTokens)) add_rows(i, false);
  return st;
}

ForwardResult Model::forward(std::vector<BatchSeq>& batch, KvCache& cache, const ForwardOptions& opt) {
  if (leader_) announce(1, batch, opt, 0, nullptr, true);
  Step st = prepare(batch, cache, opt.absorb_decode);
  std::vector<int64_t> out_rows;
  for (size_t i = 0; i < st.rows_of.size(); ++i) {
    const auto& rows = st.rows_of[i];
    if (opt.all_logits || batch[i].all_logits) out_rows.insert(out_rows.end(), rows.begin(), rows.end());
    else out_rows.push_back(rows.back());
  }
  ForwardResult r;
  Tensor hn, logits;
  auto run = [&] {
    hn = hidden_states(st, cache);
    logits = logits_for(hn, out_rows);
  };
  // A pure decode step (every sequence adds one token on the absorbed path) has a fixed op sequence for its batch
  // size and block-table capacity: the backend may replay a recording of it (see Backend::begin_graph_step).
  // Steps whose hidden states leave the step (MTP) stay eager: a recording's tensors are reused by the next step.
  bool pure_decode = opt.absorb_decode && !opt.keep_hidden && st.n_decode == st.T;
  for (auto& b : batch) pure_decode = pure_decode && b.tokens.size() == 1;
  GraphStepKey key;
  if (pure_decode) {
    key.batch = st.T;
    for (auto& s : st.seqs) key.kv_blocks = std::max(key.kv_blocks, cache.blocks_for(s.pos0 + 1));
  }
  if (pure_decode && be_.begin_graph_step(key)) {
    try {
      run();
    } catch (...) {
      be_.cancel_graph_step();
      throw;
    }
    if (!be_.end_graph_step()) run();
  } else {
    run();
  }
  r.logits = be_.to_host(logits);
  if (opt.keep_hidden) r.hidden = in_batch_order(hn, st);
  for (auto& b : batch) b.cache->len += int64_t(b.tokens.size());
  return r;
}

Tensor Model::hidden_states(Step& st, KvCache& cache) {
  const int64_t H = cfg_.hidden_size;
  Tensor x = be_.alloc(be_.act_dtype(), {st.T, H}, "x");
  be_.embedding(x, w_.embed, st.ids);
  for (auto& L : w_.layers) layer_forward(L, x, st, cache, L.index);
  Tensor hn = be_.alloc(be_.act_dtype(), {st.T, H}, "hidden");
  be_.rmsnorm(hn, x, w_.final_norm, float(cfg_.rms_norm_eps));
  return hn;
}

Tensor Model::in_batch_order(const Tensor& x, const Step& st) {
  std::vector<int64_t> rows;
  for (auto& r : st.rows_of) rows.insert(rows.end(), r.begin(), r.end());
  bool identity = true;
  for (size_t i = 0; identity && i < rows.size(); ++i) identity = rows[i] == int64_t(i);
  if (identity) return x;
  Tensor y = be_.alloc(x.dtype, x.shape, "batch_order");
  be_.gather_rows(y, x, rows);
  return y;
}

Tensor Model::logits_for(const Tensor& hn, const std::vector<int64_t>& rows) {
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size, n = int64_t(rows.size());
  bool identity = n == hn.dim(0);
  for (int64_t i = 0; identity && i < n; ++i) identity = rows[i] == i;
  Tensor sel = hn;
  if (!identity) {
    sel = be_.alloc(be_.act_dtype(), {n, H}, "hidden_rows");
    be_.gather_rows(sel, hn, rows);
  }
  Tensor logits = be_.alloc(DType::F32, {n, V}, "logits");
  be_.linear(logits, sel, w_.lm_head);
  return logits;
}

void Model::layer_forward(const LayerWeights& L, Tensor& x, Step& st, KvCache& cache, int64_t slot) {
  const float eps = float(cfg_.rms_norm_eps);
  Tensor h = be_.alloc(be_.act_dtype(), x.shape, "h");
  be_.rmsnorm(h, x, L.input_norm, eps);
  Tensor a = attention(L.attn, h, st, cache, slot);
  be_.add(x, x, a);
  be_.rmsnorm(h, x, L.post_norm, eps);
  Tensor f = L.is_moe ? moe(L.moe, h) : mlp(L.mlp, h);
  be_.add(x, x, f);
}

Tensor Model::attention(const AttnWeights& A, const Tensor& h, Step& st, KvCache& cache, int64_t slot) {
  const int64_t T = st.T, nh = cfg_.num_attention_heads, dn = cfg_.qk_nope_head_dim, dr = cfg_.qk_rope_head_dim,
                dv = cfg_.v_head_dim, r = cfg_.kv_lora_rank;
  const float eps = float(cfg_.rms_norm_eps), scale = float(cfg_.softmax_scale());
  const DType at = be_.act_dtype();
  // Queries: [T, nh, dn + dr], nope part then rope part per head.
  Tensor q = be_.alloc(at, {T, nh * (dn + dr)}, "q");
  Tensor qa;  // the normed q LoRA latent (the DSA indexer reads it too)
  if (cfg_.q_lora_rank > 0) {
    qa = be_.alloc(at, {T, cfg_.q_lora_rank}, "q_a");
    be_.linear(qa, h, A.q_a_proj);
    be_.rmsnorm(qa, qa, A.q_a_norm, eps);
    be_.linear(q, qa, A.q_b_proj);
  } else {
    be_.linear(q, h, A.q_proj);
  }
  // Latent and the shared rope key: a = [c_raw (r) | k_pe (dr)].
  Tensor kva = be_.alloc(at, {T, r + dr}, "kv_a");
  be_.linear(kva, h, A.kv_a_proj);
  // Cache rows: c = norm(c_raw), k_pe = rope(k_pe_raw), written at each row's position (one fused op).
  const KvPoolSpec& spec = cache.spec();
  be_.kv_norm_rope_write(cache.pool(), spec, slot, st.seqs, kva, A.kv_a_norm, eps, st.pos, rope_cos_, rope_sin_,
                         cfg_.rope_interleave);
  // DeepSeek-V3.2: the indexer picks the keys each query attends to (sel [T, index_topk]); V3 attends to all.
  Tensor sel;
  if (A.has_indexer) sel = dsa_select_tokens(be_, cfg_, A.indexer, h, qa, cache, slot, st.seqs, st.pos, rope_cos_, rope_sin_);

  Tensor out = be_.alloc(at, {T, nh * dv}, "attn_out");
  const int64_t nd = st.n_decode;
  if (nd < T) {  // prefill rows rotate their queries in place; decode rows in mla_decode_q
    Tensor qp = q.rows(nd, T);
    const std::vector<int32_t> ppos(st.pos.begin() + nd, st.pos.end());
    be_.rope(qp, nh, dn + dr, dn, ppos, rope_cos_, rope_sin_, cfg_.rope_interleave);
  }
  if (nd > 0) {
    // Absorbed decode: scores and values in the latent space, never expanding the cache.
    Tensor qd = q.rows(0, nd).reshape({nd, nh, dn + dr});
    Tensor q_lat = be_.alloc(at, {nd, nh, r}, "q_lat");
    Tensor q_pe = be_.alloc(at, {nd * nh, dr}, "q_pe");
    const std::vector<int32_t> dpos(st.pos.begin(), st.pos.begin() + nd);
    be_.mla_decode_q(q_lat, q_pe, qd, A.kv_b_proj, nh, dn, dr, dv, dpos, rope_cos_, rope_sin_, cfg_.rope_interleave);
    Tensor o_lat = be_.alloc(at, {nd, nh, r}, "o_lat");
    std::vector<SeqSlice> dseqs(st.seqs.begin(), st.seqs.begin() + nd);
    if (sel) be_.mla_decode_sparse(o_lat, q_lat, q_pe.reshape({nd, nh, dr}), cache.pool(), spec, slot, dseqs, sel.rows(0, nd), scale);
    else be_.mla_decode(o_lat, q_lat, q_pe.reshape({nd, nh, dr}), cache.pool(), spec, slot, dseqs, scale);
    Tensor od = out.rows(0, nd);
    be_.mla_absorb_out(od, o_lat, A.kv_b_proj, nh, dn, dv);
  }
  for (size_t i = nd; i < st.seqs.size(); ++i) {
    // Prefill: decompress keys/values of the whole sequence from its cached latents.
    const SeqSlice& s = st.seqs[i];
    const int64_t n = s.pos0 + s.len;
    Tensor c_all = be_.alloc(at, {n, r}, "c_all"), kpe_all = be_.alloc(at, {n, dr}, "kpe_all");
    be_.kv_gather(c_all, kpe_all, cache.pool(), spec, slot, s, n);
    Tensor kv = be_.alloc(at, {n, nh * (dn + dv)}, "kv");
    be_.linear(kv, c_all, A.kv_b_proj);
    Tensor os = out.rows(s.row0, s.row0 + s.len);
    if (sel)
      be_.mla_attention_sparse(os, q.rows(s.row0, s.row0 + s.len), kv, kpe_all, sel.rows(s.row0, s.row0 + s.len), s.pos0,
                               nh, dn, dr, dv, scale);
    else
      be_.mla_attention(os, q.rows(s.row0, s.row0 + s.len), kv, kpe_all, s.pos0, nh, dn, dr, dv, scale);
  }
  Tensor o = be_.alloc(at, {T, cfg_.hidden_size}, "o");
  be_.linear(o, out, A.o_proj);
  return o;
}

Tensor Model::mlp(const MlpWeights& M, const Tensor& h) {
  const int64_t T = h.dim(0), I = M.gate.dim(0);
  Tensor g = be_.alloc(be_.act_dtype(), {T, I}, "mlp_act");
  be_.linear_swiglu(g, h, M.gate, M.up);
  Tensor d = be_.alloc(be_.act_dtype(), {T, cfg_.hidden_size}, "mlp_down");
  be_.linear(d, g, M.down);
  return d;
}

Tensor Model::moe(const MoeWeights& M, const Tensor& h) {
  const int64_t T = h.dim(0), E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok;
  Tensor logits = be_.alloc(DType::F32, {T, E}, "router_logits");
  be_.linear(logits, h, M.router);
  Tensor idx = be_.alloc(DType::I32, {T, K}, "topk_idx"), wts = be_.alloc(DType::F32, {T, K}, "topk_w");
  be_.moe_route(idx, wts, logits, M.bias, route_);
  Tensor out;
  if (M.has_shared) {
    out = mlp(M.shared, h);
  } else {
    out = be_.alloc(be_.act_dtype(), {T, cfg_.hidden_size}, "moe_out");
    be_.zero(out);
  }
  if (ep_) return moe_expert_parallel(M, h, idx, wts, out);
  be_.moe_experts_acc(out, h, idx, wts, M.gate, M.up, M.down);
  return out;
}

void Model::set_expert_parallel(Communicator* comm) {
  if (comm && comm->size() > 1) {
    if (be_.device() != Device::CPU) fail("expert-parallel inference runs on CPU ranks for now");
    if (w_.layout.expert_n * comm->size() != cfg_.n_routed_experts)
      fail("internal: {} ranks with {} experts each do not hold the model's {} experts", comm->size(),
           w_.layout.expert_n, cfg_.n_routed_experts);
  }
  ep_ = comm && comm->size() > 1 ? comm : nullptr;
}

// The assignments (t, k) whose expert is local, compacted to rows [A, H] with K = 1, run through the backend's
// grouped experts; their weighted outputs are added to this rank's share of out (rank 0's share starts with
// the shared experts, the others' at zero), then the shares are summed over the ranks.
Tensor Model::moe_expert_parallel(const MoeWeights& M, const Tensor& h, const Tensor& idx, const Tensor& wts,
                                  Tensor& out) {
  const int64_t T = h.dim(0), H = cfg_.hidden_size, K = cfg_.num_experts_per_tok;
  const int64_t lo = w_.layout.expert_lo, El = w_.layout.expert_n;
  if (out.dtype != DType::F32 || h.dtype != DType::F32) fail("internal: expert-parallel inference needs fp32 activations");
  if (ep_->rank() != 0) be_.zero(out);
  const int32_t* ip = idx.ptr<int32_t>();
  const float* wp = wts.ptr<float>();
  std::vector<int64_t> rows;  // assignment a = t*K + k of the local experts, in (t, k) order
  for (int64_t a = 0; a < T * K; ++a)
    if (ip[a] >= lo && ip[a] < lo + El) rows.push_back(a);
  const int64_t A = int64_t(rows.size());
  if (A > 0) {
    Tensor xa = be_.alloc(DType::F32, {A, H}, "ep_x"), ya = be_.alloc(DType::F32, {A, H}, "ep_y");
    Tensor ia = be_.alloc(DType::I32, {A, 1}, "ep_idx"), wa = be_.alloc(DType::F32, {A, 1}, "ep_w");
    for (int64_t i = 0; i < A; ++i) {
      std::copy_n(h.ptr<float>() + (rows[i] / K) * H, H, xa.ptr<float>() + i * H);
      ia.ptr<int32_t>()[i] = ip[rows[i]] - int32_t(lo);
      wa.ptr<float>()[i] = wp[rows[i]];
    }
    be_.zero(ya);
    be_.moe_experts_acc(ya, xa, ia, wa, M.gate, M.up, M.down);
    float* o = out.ptr<float>();
    for (int64_t i = 0; i < A; ++i) {
      const float* y = ya.ptr<float>() + i * H;
      float* ot = o + (rows[i] / K) * H;
      for (int64_t j = 0; j < H; ++j) ot[j] += y[j];
    }
  }
  ep_->all_reduce_sum(out.ptr<float>(), T * H, CommType::F32);
  return out;
}

Tensor Model::mtp_forward(int64_t k, const Tensor& h_prev, std::vector<BatchSeq>& batch, KvCache& cache,
                          Tensor* logits_out) {
  if (k < 1 || k > cfg_.num_nextn_predict_layers) fail("model has no MTP module {}", k);
  if (leader_) announce(2, batch, {}, k, &h_prev, logits_out != nullptr);
  // Positions: MTP rows continue from the sequence's MTP-cache length, kept in a shadow SeqCache len.
  Step st = prepare(batch, cache, true);
  const MtpWeights& M = w_.mtp[k - 1];
  const int64_t H = cfg_.hidden_size;
  const float eps = float(cfg_.rms_norm_eps);
  Tensor emb = be_.alloc(be_.act_dtype(), {st.T, H}, "mtp_emb");
  be_.embedding(emb, w_.embed, st.ids);
  be_.rmsnorm(emb, emb, M.enorm, eps);
  // h_prev arrives in batch order; rows here are in the step's internal order.
  std::vector<int64_t> src(st.T);
  {
    int64_t i = 0;
    for (auto& rows : st.rows_of)
      for (int64_t r : rows) src[r] = i++;
  }
  Tensor hin = be_.alloc(be_.act_dtype(), {st.T, H}, "mtp_hin");
  be_.gather_rows(hin, h_prev, src);
  Tensor hp = be_.alloc(be_.act_dtype(), {st.T, H}, "mtp_h");
  be_.rmsnorm(hp, hin, M.hnorm, eps);
  Tensor cat = be_.alloc(be_.act_dtype(), {st.T, 2 * H}, "mtp_cat");
  be_.concat_cols(cat, emb, hp);  // embedding first, as the released weights expect
  Tensor x = be_.alloc(be_.act_dtype(), {st.T, H}, "mtp_x");
  be_.linear(x, cat, M.eh_proj);
  layer_forward(M.layer, x, st, cache, M.layer.index);
  if (logits_out) {
    Tensor hn = be_.alloc(be_.act_dtype(), {st.T, H}, "mtp_hn");
    be_.rmsnorm(hn, x, M.head_norm, eps);
    std::vector<int64_t> rows;
    for (auto& r : st.rows_of) rows.insert(rows.end(), r.begin(), r.end());
    *logits_out = be_.to_host(logits_for(hn, rows));
  }
  for (auto& b : batch) b.cache->len += int64_t(b.tokens.size());
  return in_batch_order(x, st);
}

int64_t Model::total_params() const {
  int64_t n = 0;
  for (auto& s : w_.layout.specs)
    if (!s.is_bias && s.name.rfind("model.layers.", 0) == 0) {
      int64_t li = std::stoll(s.name.substr(13));
      if (li < cfg_.num_hidden_layers) n += shape_numel(s.shape);
    } else if (!s.is_bias) {
      n += shape_numel(s.shape);
    }
  return n;
}

int64_t Model::mtp_params() const {
  int64_t n = 0;
  for (auto& s : w_.layout.specs) n += s.is_bias ? 0 : shape_numel(s.shape);
  return n - total_params();
}

int64_t Model::active_params() const {
  int64_t idle_experts = 0;
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
    if (cfg_.is_moe_layer(l))
      idle_experts += (cfg_.n_routed_experts - cfg_.num_experts_per_tok) * 3 * cfg_.moe_intermediate_size * cfg_.hidden_size;
  // The embedding is a row lookup, not a matrix product: count one row.
  return total_params() - idle_experts - (cfg_.vocab_size - 1) * cfg_.hidden_size;
}

}  // namespace dsv3
