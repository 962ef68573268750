// The DeepSeek-V4 training model (see v4_train_model.h). One sequence at a time: forward (saving), loss, backward,
// so only one sequence's activations exist at once. Reading order: helpers, mHC, attention (with the compressor),
// MoE, the layer, the model.
//   X      = embed[ids] copied into N streams                                         [T, N, d]
//   layer  (pre, post, comb) = weights(fn . rms(X)); a = attn(rmsnorm(sum_j pre_j X_j)); X1 = post a + comb^T X
//          the same with the ffn weights and the MoE on X1 -> X2
//   loss   = CE(rmsnorm(hc_head(X)) head^T, next tokens)
// Backward functions restate the forward line they differentiate; weight gradients always accumulate (+=).
#include "train/v4_train_model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "model/v4_kernels.h"
#include "model/v4_parts.h"
#include "ops/cpu/blas.h"
#include "ops/cpu/train_ops.h"

namespace dsv3 {

namespace {

template <typename T>
using Vec = std::vector<T>;

// y [M, N] (row stride ldy) = x [M, K] (stride ldx) W [N, K]^T.
template <typename T>
void lin(T* y, int64_t ldy, const T* x, int64_t ldx, const T* W, int64_t M, int64_t N, int64_t K) {
  cpu::gemm(false, true, M, N, K, T(1), x, ldx, W, K, T(0), y, ldy);
}
// dx [M, K] (= or +=) dy [M, N] W;  dW [N, K] += dy^T x.
template <typename T>
void lin_bwd(T* dx, int64_t ldx_d, bool acc, T* dW, const T* dy, int64_t ldy, const T* x, int64_t ldx, const T* W,
             int64_t M, int64_t N, int64_t K) {
  if (dx) cpu::gemm(false, false, M, K, N, T(1), dy, ldy, W, K, acc ? T(1) : T(0), dx, ldx_d);
  if (dW) cpu::gemm(true, false, N, K, M, T(1), dy, ldy, x, ldx, T(1), dW, K);
}

Tensor host_f32(Vec<float>& v, Shape s, const char* name) {
  Tensor t;
  t.name = name;
  t.dtype = DType::F32;
  t.shape = std::move(s);
  t.data = v.data();
  return t;
}

}  // namespace

template <typename T>
struct V4TrainModel<T>::Impl {
  // Offsets of one layer's tensors in the flat layout.
  struct Off {
    int64_t attn_norm, ffn_norm, ha_fn, ha_base, ha_scale, hf_fn, hf_base, hf_scale;
    int64_t sink, wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b;
    int64_t c_wkv = -1, c_wgate = -1, c_ape = -1, c_norm = -1;
    int64_t gate, bias = -1, w1, w3, w2, sw1, sw3, sw2;
  };
  struct Hc {  // one mHC collapse + the block's input norm
    Vec<T> X, rstd, xhat, mu, pre, post, comb, u, rn, xn;
  };
  struct Attn {
    Vec<T> qa_raw, rstd_qa, qa, q_raw, rstd_q, q, kv_raw, rstd_kv, kv, C, Z, pooled, rstd_e, ent, o, y, out;
    int64_t nw = 0, k = 0;
    std::vector<int32_t> sel;  // CSA: [T, k] entry ids (-1: none)
  };
  struct Moe {
    Vec<T> logits, s, w, sg, su, sh, out;
    Vec<T> dbal;                               // [T, E] d(balance loss)/ds (empty: none)
    std::vector<int32_t> idx;                  // [T, K]
    std::vector<std::vector<int64_t>> rows;    // per expert: assignments t * K + k
    std::vector<Vec<T>> g, u, h, eo;           // per expert: [n, F], [n, F], [n, F], [n, d]
  };
  struct Layer {
    Hc ha, hf;
    Attn at;
    Moe mo;
  };

  const V4Weights& w;
  const V4Config& c;
  const T* P;
  T* G;
  std::vector<Off> off;
  std::vector<Layer> L;
  std::unique_ptr<Backend> be;  // the indexer (inference code, fp32)
  V4RopeTable rope_main, rope_comp;
  std::vector<V4IndexerWeights> idxw;
  struct HeadOff {
    int64_t fn, base, scale, norm;  // hc_head_fn / base / scale and the norm after it
  };
  struct MtpOff {
    int64_t e_proj, h_proj, enorm, hnorm;
    HeadOff head;
  };
  struct Mtp {  // saved state of MTP block k: input streams, embedding and its norm, normed streams, output streams
    Vec<T> Xin, e, rstd_e, en, xh, rstd_h, X;
  };
  int64_t o_embed, o_head;
  HeadOff main_head;
  std::vector<MtpOff> mtp_off;
  std::vector<Mtp> mtp;
  std::vector<int32_t> pos;
  double bal_alpha = 0, bal_scale = 0, bal_sum = 0;  // balance loss: alpha, gradient scale, sum of this run

  Impl(const V4Weights& w_, const T* P_, T* G_) : w(w_), c(w_.cfg), P(P_), G(G_) {
    auto at = [&](const std::string& n) { return w.layout.at(n).offset; };
    o_embed = at("embed.weight"), o_head = at("head.weight");
    main_head = {at("hc_head_fn"), at("hc_head_base"), at("hc_head_scale"), at("norm.weight")};
    for (int64_t l = 0; l < c.num_blocks(); ++l) {
      const std::string p = c.block_prefix(l);
      Off o;
      o.attn_norm = at(p + "attn_norm.weight"), o.ffn_norm = at(p + "ffn_norm.weight");
      o.ha_fn = at(p + "hc_attn_fn"), o.ha_base = at(p + "hc_attn_base"), o.ha_scale = at(p + "hc_attn_scale");
      o.hf_fn = at(p + "hc_ffn_fn"), o.hf_base = at(p + "hc_ffn_base"), o.hf_scale = at(p + "hc_ffn_scale");
      o.sink = at(p + "attn.attn_sink"), o.wq_a = at(p + "attn.wq_a.weight"), o.q_norm = at(p + "attn.q_norm.weight");
      o.wq_b = at(p + "attn.wq_b.weight"), o.wkv = at(p + "attn.wkv.weight"), o.kv_norm = at(p + "attn.kv_norm.weight");
      o.wo_a = at(p + "attn.wo_a.weight"), o.wo_b = at(p + "attn.wo_b.weight");
      const V4Attn t = c.attn_type(l);
      if (t != V4Attn::Sliding) {
        const std::string q = p + "attn.compressor.";
        o.c_wkv = at(q + "wkv.weight"), o.c_wgate = at(q + "wgate.weight"), o.c_ape = at(q + "ape");
        o.c_norm = at(q + "norm.weight");
      }
      V4IndexerWeights iw;
      if (t == V4Attn::CSA) {
        const std::string q = p + "attn.indexer.";
        iw.wq_b = w.view(q + "wq_b.weight");
        iw.weights_proj = w.view(q + "weights_proj.weight");
        iw.comp = {w.view(q + "compressor.wkv.weight"), w.view(q + "compressor.wgate.weight"),
                   w.view(q + "compressor.ape"), w.view(q + "compressor.norm.weight")};
      }
      idxw.push_back(iw);
      o.gate = at(p + "ffn.gate.weight");
      if (c.mlp_type(l) == V4Mlp::Moe) o.bias = at(p + "ffn.gate.bias");
      o.w1 = at(p + "ffn.experts.0.w1.weight"), o.w3 = at(p + "ffn.experts.0.w3.weight");
      o.w2 = at(p + "ffn.experts.0.w2.weight");
      o.sw1 = at(p + "ffn.shared_experts.w1.weight"), o.sw3 = at(p + "ffn.shared_experts.w3.weight");
      o.sw2 = at(p + "ffn.shared_experts.w2.weight");
      off.push_back(o);
    }
    for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
      const std::string p = "mtp." + std::to_string(k) + ".";
      mtp_off.push_back({at(p + "e_proj.weight"), at(p + "h_proj.weight"), at(p + "enorm.weight"), at(p + "hnorm.weight"),
                         {at(p + "hc_head_fn"), at(p + "hc_head_base"), at(p + "hc_head_scale"), at(p + "norm.weight")}});
    }
    L.resize(static_cast<size_t>(c.num_blocks()));
    mtp.resize(static_cast<size_t>(c.num_nextn_predict_layers));
    be = make_cpu_backend();
    rope_main.inv_freq = v4_inv_freq(c.rope_main, c.qk_rope_head_dim);
    rope_main.attention_factor = float(c.rope_main.attention_factor);
    rope_comp.inv_freq = v4_inv_freq(c.rope_compress, c.qk_rope_head_dim);
    rope_comp.attention_factor = float(c.rope_compress.attention_factor);
  }

  const T* p(int64_t o) const { return P + o; }
  T* g(int64_t o) const { return G + o; }
  double eps() const { return c.rms_norm_eps; }

  // ---------------------------------------------------------------- mHC
  // s.X = X; mu = rms(X) fn^T; (pre, post, comb) = hc_weights(mu); u = sum_j pre_j X_j; xn = rmsnorm(u, normw).
  void hc_fwd(Hc& s, const T* X, int64_t Tn, int64_t fn, int64_t base, int64_t scale, int64_t normw) {
    const int64_t N = c.hc_mult, d = c.hidden_size, Nd = N * d, R = (2 + N) * N;
    s.X.assign(X, X + Tn * Nd);
    s.rstd.resize(static_cast<size_t>(Tn)), s.xhat.resize(static_cast<size_t>(Tn * Nd)), s.mu.resize(static_cast<size_t>(Tn * R));
    s.pre.resize(static_cast<size_t>(Tn * N)), s.post.resize(static_cast<size_t>(Tn * N)), s.comb.resize(static_cast<size_t>(Tn * N * N));
    s.u.resize(static_cast<size_t>(Tn * d)), s.rn.resize(static_cast<size_t>(Tn)), s.xn.resize(static_cast<size_t>(Tn * d));
    for (int64_t t = 0; t < Tn; ++t) s.rstd[static_cast<size_t>(t)] = v4k::rms_row(s.xhat.data() + t * Nd, X + t * Nd, Nd, eps());
    lin(s.mu.data(), R, s.xhat.data(), Nd, p(fn), Tn, R, Nd);
    for (int64_t t = 0; t < Tn; ++t) {
      v4k::hc_weights(s.pre.data() + t * N, s.post.data() + t * N, s.comb.data() + t * N * N, s.mu.data() + t * R,
                      p(base), p(scale), N, c.hc_sinkhorn_iters, T(c.hc_eps));
      v4k::hc_collapse(s.u.data() + t * d, s.pre.data() + t * N, X + t * Nd, N, d);
    }
    cpu::rmsnorm_forward(s.xn.data(), s.rn.data(), s.u.data(), d, p(normw), Tn, d, eps());
  }
  // From dxn (the block input's gradient), dpost, dcomb: dX += the gradient through u and through mu.
  void hc_bwd(const Hc& s, T* dX, const T* dxn, const T* dpost, const T* dcomb, int64_t Tn, int64_t fn, int64_t base,
              int64_t scale, int64_t normw) {
    const int64_t N = c.hc_mult, d = c.hidden_size, Nd = N * d, R = (2 + N) * N;
    Vec<T> du(static_cast<size_t>(Tn * d), T(0)), dpre(static_cast<size_t>(N)), dmu(static_cast<size_t>(Tn * R)), dxhat(static_cast<size_t>(Tn * Nd));
    cpu::rmsnorm_backward(du.data(), d, g(normw), dxn, s.u.data(), d, s.rn.data(), p(normw), Tn, d);
    for (int64_t t = 0; t < Tn; ++t) {
      v4k::hc_collapse_backward(dpre.data(), dX + t * Nd, du.data() + t * d, s.pre.data() + t * N,
                                s.X.data() + t * Nd, N, d);
      v4k::hc_weights_backward(dmu.data() + t * R, g(base), g(scale), dpre.data(), dpost + t * N, dcomb + t * N * N,
                               s.mu.data() + t * R, p(base), p(scale), N, c.hc_sinkhorn_iters, T(c.hc_eps));
    }
    lin_bwd(dxhat.data(), Nd, false, g(fn), dmu.data(), R, s.xhat.data(), Nd, p(fn), Tn, R, Nd);
    for (int64_t t = 0; t < Tn; ++t)
      v4k::rms_row_backward(dX + t * Nd, dxhat.data() + t * Nd, s.X.data() + t * Nd, s.rstd[static_cast<size_t>(t)], Nd);
  }

  // ---------------------------------------------------------------- attention
  // The compressor slots of entry w, channel ch: (value, gate) of each slot and its source (row, column) in C / Z;
  // row -1 for the empty lookahead slots of window 0 (value 0, gate -inf).
  int64_t slots(const Attn& a, bool csa, int64_t m, int64_t cols, int64_t hd, int64_t wi, int64_t ch, const T* ape,
                T* v, T* z, int64_t* row, int64_t* col) const {
    int64_t n = 0;
    auto put = [&](int64_t r, int64_t cc, int64_t i) {
      row[n] = r, col[n] = cc;
      v[n] = r < 0 ? T(0) : a.C[static_cast<size_t>(r * cols + cc)];
      z[n] = r < 0 ? T(-INFINITY) : a.Z[static_cast<size_t>(r * cols + cc)] + ape[i * cols + cc];
      ++n;
    };
    if (csa) {
      for (int64_t i = 0; i < m; ++i) put(wi > 0 ? (wi - 1) * m + i : -1, ch, i);
      for (int64_t i = 0; i < m; ++i) put(wi * m + i, hd + ch, i);
    } else {
      for (int64_t i = 0; i < m; ++i) put(wi * m + i, ch, i);
    }
    return n;
  }
  // Keys of query t: window positions (t - W, t], then the entries it sees (HCA: closed by t; CSA: selected).
  void keys_of(const Attn& a, V4Attn type, int64_t m, int64_t t, std::vector<int64_t>& kw, std::vector<int64_t>& ke) const {
    kw.clear(), ke.clear();
    for (int64_t j = std::max<int64_t>(0, t - c.sliding_window + 1); j <= t; ++j) kw.push_back(j);
    if (type == V4Attn::HCA) {
      for (int64_t e = 0; e < std::min(a.nw, (t + 1) / m); ++e) ke.push_back(e);
    } else if (type == V4Attn::CSA) {
      for (int64_t j = 0; j < a.k; ++j)
        if (a.sel[static_cast<size_t>(t * a.k + j)] >= 0) ke.push_back(a.sel[static_cast<size_t>(t * a.k + j)]);
    }
  }

  void attn_fwd(int64_t l, Attn& a, const T* xa, int64_t Tn) {
    const Off& o = off[static_cast<size_t>(l)];
    const V4Attn type = c.attn_type(l);
    const int64_t H = c.num_attention_heads, hd = c.head_dim, r = c.qk_rope_head_dim, dc = c.q_lora_rank,
                  g_ = c.o_groups, dg = c.o_lora_rank, gw = H * hd / g_, d = c.hidden_size;
    const V4RopeTable& rope = type == V4Attn::Sliding ? rope_main : rope_comp;
    // q = rope(rms_per_head(rmsnorm(x wq_a^T, q_norm) wq_b^T))
    a.qa_raw.resize(static_cast<size_t>(Tn * dc)), a.qa.resize(static_cast<size_t>(Tn * dc)), a.rstd_qa.resize(static_cast<size_t>(Tn));
    lin(a.qa_raw.data(), dc, xa, d, p(o.wq_a), Tn, dc, d);
    cpu::rmsnorm_forward(a.qa.data(), a.rstd_qa.data(), a.qa_raw.data(), dc, p(o.q_norm), Tn, dc, eps());
    a.q_raw.resize(static_cast<size_t>(Tn * H * hd)), a.q.resize(static_cast<size_t>(Tn * H * hd)), a.rstd_q.resize(static_cast<size_t>(Tn * H));
    lin(a.q_raw.data(), H * hd, a.qa.data(), dc, p(o.wq_b), Tn, H * hd, dc);
    for (int64_t i = 0; i < Tn * H; ++i) a.rstd_q[static_cast<size_t>(i)] = v4k::rms_row(a.q.data() + i * hd, a.q_raw.data() + i * hd, hd, eps());
    cpu::rope_forward(a.q.data(), Tn, H, hd, hd - r, r, pos.data(), rope.cos.f32(), rope.sin.f32(), true);
    // kv = rope(rmsnorm(x wkv^T, kv_norm))
    a.kv_raw.resize(static_cast<size_t>(Tn * hd)), a.kv.resize(static_cast<size_t>(Tn * hd)), a.rstd_kv.resize(static_cast<size_t>(Tn));
    lin(a.kv_raw.data(), hd, xa, d, p(o.wkv), Tn, hd, d);
    cpu::rmsnorm_forward(a.kv.data(), a.rstd_kv.data(), a.kv_raw.data(), hd, p(o.kv_norm), Tn, hd, eps());
    cpu::rope_forward(a.kv.data(), Tn, 1, hd, hd - r, r, pos.data(), rope.cos.f32(), rope.sin.f32(), true);
    // Compressed entries: K_w = rope_{m w}(rmsnorm(pool(slots of window w))).
    a.nw = 0, a.k = 0;
    int64_t m = 0;
    if (type != V4Attn::Sliding) {
      const bool csa = type == V4Attn::CSA;
      m = csa ? c.compress_rate_csa : c.compress_rate_hca;
      const int64_t cols = csa ? 2 * hd : hd, ns = csa ? 2 * m : m;
      a.C.resize(static_cast<size_t>(Tn * cols)), a.Z.resize(static_cast<size_t>(Tn * cols));
      lin(a.C.data(), cols, xa, d, p(o.c_wkv), Tn, cols, d);
      lin(a.Z.data(), cols, xa, d, p(o.c_wgate), Tn, cols, d);
      a.nw = Tn / m;
      a.pooled.resize(static_cast<size_t>(a.nw * hd)), a.ent.resize(static_cast<size_t>(a.nw * hd)), a.rstd_e.resize(static_cast<size_t>(a.nw));
      Vec<T> v(static_cast<size_t>(ns)), z(static_cast<size_t>(ns)), P_(static_cast<size_t>(ns));
      std::vector<int64_t> row(static_cast<size_t>(ns)), col(static_cast<size_t>(ns));
      for (int64_t wi = 0; wi < a.nw; ++wi)
        for (int64_t ch = 0; ch < hd; ++ch) {
          const int64_t n = slots(a, csa, m, cols, hd, wi, ch, p(o.c_ape), v.data(), z.data(), row.data(), col.data());
          a.pooled[static_cast<size_t>(wi * hd + ch)] = v4k::pool(P_.data(), v.data(), z.data(), n);
        }
      if (a.nw > 0) {
        cpu::rmsnorm_forward(a.ent.data(), a.rstd_e.data(), a.pooled.data(), hd, p(o.c_norm), a.nw, hd, eps());
        std::vector<int32_t> epos(static_cast<size_t>(a.nw));
        for (int64_t wi = 0; wi < a.nw; ++wi) epos[static_cast<size_t>(wi)] = int32_t(wi * m);
        cpu::rope_forward(a.ent.data(), a.nw, 1, hd, hd - r, r, epos.data(), rope.cos.f32(), rope.sin.f32(), true);
      }
      if (csa) {  // the indexer's selection (no gradient): the inference code on fp32 copies of its inputs
        Vec<float> xf(xa, xa + Tn * d), qf(a.qa.begin(), a.qa.end());
        V4CompressorState st;
        a.sel = v4_index_select(*be, c, idxw[static_cast<size_t>(l)], host_f32(xf, {Tn, d}, "xa"), host_f32(qf, {Tn, dc}, "qa"),
                                std::vector<int32_t>(pos.begin(), pos.begin() + Tn), st, rope_comp, &a.k);
      }
    }
    // Sink attention per query head, then the values' rotation undone at the query position.
    a.o.assign(static_cast<size_t>(Tn * H * hd), T(0));
    const T scale = T(1) / std::sqrt(T(hd));
    std::vector<int64_t> kw, ke;
    std::vector<const T*> keys;
    Vec<T> pr;
    for (int64_t t = 0; t < Tn; ++t) {
      keys_of(a, type, m, t, kw, ke);
      keys.clear();
      for (int64_t j : kw) keys.push_back(a.kv.data() + j * hd);
      for (int64_t e : ke) keys.push_back(a.ent.data() + e * hd);
      pr.resize(keys.size());
      for (int64_t hh = 0; hh < H; ++hh)
        v4k::sink_attention(a.o.data() + (t * H + hh) * hd, pr.data(), a.q.data() + (t * H + hh) * hd, keys.data(),
                            int64_t(keys.size()), p(o.sink)[hh], scale, hd);
    }
    cpu::rope_forward(a.o.data(), Tn, H, hd, hd - r, r, pos.data(), rope.cos.f32(), rope.sin_neg.f32(), true);
    // Grouped output projection, then wo_b.
    a.y.resize(static_cast<size_t>(Tn * g_ * dg)), a.out.resize(static_cast<size_t>(Tn * d));
    for (int64_t j = 0; j < g_; ++j)
      lin(a.y.data() + j * dg, g_ * dg, a.o.data() + j * gw, H * hd, p(o.wo_a) + j * dg * gw, Tn, dg, gw);
    lin(a.out.data(), d, a.y.data(), g_ * dg, p(o.wo_b), Tn, d, g_ * dg);
  }

  // dxa (=) from da = dL/d(attention output).
  void attn_bwd(int64_t l, const Attn& a, const T* xa, const T* da, T* dxa, int64_t Tn) {
    const Off& o = off[static_cast<size_t>(l)];
    const V4Attn type = c.attn_type(l);
    const int64_t H = c.num_attention_heads, hd = c.head_dim, r = c.qk_rope_head_dim, dc = c.q_lora_rank,
                  g_ = c.o_groups, dg = c.o_lora_rank, gw = H * hd / g_, d = c.hidden_size;
    const V4RopeTable& rope = type == V4Attn::Sliding ? rope_main : rope_comp;
    // out = y wo_b^T;  y_j = o_j wo_a_j^T
    Vec<T> dy(static_cast<size_t>(Tn * g_ * dg)), dO(static_cast<size_t>(Tn * H * hd));
    lin_bwd(dy.data(), g_ * dg, false, g(o.wo_b), da, d, a.y.data(), g_ * dg, p(o.wo_b), Tn, d, g_ * dg);
    for (int64_t j = 0; j < g_; ++j)
      lin_bwd(dO.data() + j * gw, H * hd, false, g(o.wo_a) + j * dg * gw, dy.data() + j * dg, g_ * dg,
              a.o.data() + j * gw, H * hd, p(o.wo_a) + j * dg * gw, Tn, dg, gw);
    // o = rope_{-t}(o_pre)
    cpu::rope_backward(dO.data(), Tn, H, hd, hd - r, r, pos.data(), rope.cos.f32(), rope.sin_neg.f32(), true);
    // o_pre = sink attention over keys (window kv, entries)
    int64_t m = type == V4Attn::CSA ? c.compress_rate_csa : type == V4Attn::HCA ? c.compress_rate_hca : 0;
    Vec<T> dq(static_cast<size_t>(Tn * H * hd), T(0)), dkv(static_cast<size_t>(Tn * hd), T(0)), dent(static_cast<size_t>(a.nw * hd), T(0));
    const T scale = T(1) / std::sqrt(T(hd));
    std::vector<int64_t> kw, ke;
    std::vector<const T*> keys;
    std::vector<T*> dkeys;
    Vec<T> pr, otmp(static_cast<size_t>(hd));
    for (int64_t t = 0; t < Tn; ++t) {
      keys_of(a, type, m, t, kw, ke);
      keys.clear(), dkeys.clear();
      for (int64_t j : kw) keys.push_back(a.kv.data() + j * hd), dkeys.push_back(dkv.data() + j * hd);
      for (int64_t e : ke) keys.push_back(a.ent.data() + e * hd), dkeys.push_back(dent.data() + e * hd);
      pr.resize(keys.size());
      for (int64_t hh = 0; hh < H; ++hh) {
        const T* qh = a.q.data() + (t * H + hh) * hd;
        const T ps = v4k::sink_attention(otmp.data(), pr.data(), qh, keys.data(), int64_t(keys.size()), p(o.sink)[hh],
                                         scale, hd);
        v4k::sink_attention_backward(dq.data() + (t * H + hh) * hd, dkeys.data(), g(o.sink) + hh,
                                     dO.data() + (t * H + hh) * hd, pr.data(), ps, qh, keys.data(),
                                     int64_t(keys.size()), scale, hd);
      }
    }
    // q = rope(rms_per_head(q_raw)); q_raw = qa wq_b^T; qa = rmsnorm(qa_raw, q_norm); qa_raw = x wq_a^T
    cpu::rope_backward(dq.data(), Tn, H, hd, hd - r, r, pos.data(), rope.cos.f32(), rope.sin.f32(), true);
    Vec<T> dq_raw(static_cast<size_t>(Tn * H * hd), T(0)), dqa(static_cast<size_t>(Tn * dc)), dqa_raw(static_cast<size_t>(Tn * dc), T(0));
    for (int64_t i = 0; i < Tn * H; ++i)
      v4k::rms_row_backward(dq_raw.data() + i * hd, dq.data() + i * hd, a.q_raw.data() + i * hd, a.rstd_q[static_cast<size_t>(i)], hd);
    lin_bwd(dqa.data(), dc, false, g(o.wq_b), dq_raw.data(), H * hd, a.qa.data(), dc, p(o.wq_b), Tn, H * hd, dc);
    cpu::rmsnorm_backward(dqa_raw.data(), dc, g(o.q_norm), dqa.data(), a.qa_raw.data(), dc, a.rstd_qa.data(),
                          p(o.q_norm), Tn, dc);
    lin_bwd(dxa, d, false, g(o.wq_a), dqa_raw.data(), dc, xa, d, p(o.wq_a), Tn, dc, d);
    // kv = rope(rmsnorm(x wkv^T, kv_norm))
    cpu::rope_backward(dkv.data(), Tn, 1, hd, hd - r, r, pos.data(), rope.cos.f32(), rope.sin.f32(), true);
    Vec<T> dkv_raw(static_cast<size_t>(Tn * hd), T(0));
    cpu::rmsnorm_backward(dkv_raw.data(), hd, g(o.kv_norm), dkv.data(), a.kv_raw.data(), hd, a.rstd_kv.data(),
                          p(o.kv_norm), Tn, hd);
    lin_bwd(dxa, d, true, g(o.wkv), dkv_raw.data(), hd, xa, d, p(o.wkv), Tn, hd, d);
    if (type == V4Attn::Sliding) return;
    // K_w = rope_{m w}(rmsnorm(pooled_w)); pooled = per-channel softmax pooling of the slots; C = x wkv^T, Z = x wgate^T
    const bool csa = type == V4Attn::CSA;
    const int64_t cols = csa ? 2 * hd : hd, ns = csa ? 2 * m : m;
    Vec<T> dC(static_cast<size_t>(Tn * cols), T(0)), dZ(static_cast<size_t>(Tn * cols), T(0));
    if (a.nw > 0) {
      std::vector<int32_t> epos(static_cast<size_t>(a.nw));
      for (int64_t wi = 0; wi < a.nw; ++wi) epos[static_cast<size_t>(wi)] = int32_t(wi * m);
      cpu::rope_backward(dent.data(), a.nw, 1, hd, hd - r, r, epos.data(), rope.cos.f32(), rope.sin.f32(), true);
      Vec<T> dpool(static_cast<size_t>(a.nw * hd), T(0));
      cpu::rmsnorm_backward(dpool.data(), hd, g(o.c_norm), dent.data(), a.pooled.data(), hd, a.rstd_e.data(),
                            p(o.c_norm), a.nw, hd);
      Vec<T> v(static_cast<size_t>(ns)), z(static_cast<size_t>(ns)), P_(static_cast<size_t>(ns)), dv(static_cast<size_t>(ns)), dz(static_cast<size_t>(ns));
      std::vector<int64_t> row(static_cast<size_t>(ns)), col(static_cast<size_t>(ns));
      T* dape = g(o.c_ape);
      for (int64_t wi = 0; wi < a.nw; ++wi)
        for (int64_t ch = 0; ch < hd; ++ch) {
          const int64_t n = slots(a, csa, m, cols, hd, wi, ch, p(o.c_ape), v.data(), z.data(), row.data(), col.data());
          const T out = v4k::pool(P_.data(), v.data(), z.data(), n);
          v4k::pool_backward(dv.data(), dz.data(), dpool[static_cast<size_t>(wi * hd + ch)], P_.data(), v.data(), out, n);
          for (int64_t i = 0; i < n; ++i) {
            if (row[static_cast<size_t>(i)] < 0) continue;
            const int64_t e = row[static_cast<size_t>(i)] * cols + col[static_cast<size_t>(i)];
            dC[static_cast<size_t>(e)] += dv[static_cast<size_t>(i)], dZ[static_cast<size_t>(e)] += dz[static_cast<size_t>(i)];
            dape[(row[static_cast<size_t>(i)] % m) * cols + col[static_cast<size_t>(i)]] += dz[static_cast<size_t>(i)];
          }
        }
    }
    lin_bwd(dxa, d, true, g(o.c_wkv), dC.data(), cols, xa, d, p(o.c_wkv), Tn, cols, d);
    lin_bwd(dxa, d, true, g(o.c_wgate), dZ.data(), cols, xa, d, p(o.c_wgate), Tn, cols, d);
  }

  // ---------------------------------------------------------------- MoE
  // w [E, F, d] / [E, d, F] grouped: expert e's matrix at offset + e * F * d.
  void swiglu_fwd(Vec<T>& gr, Vec<T>& ur, Vec<T>& h, const T* x, int64_t n, const T* W1, const T* W3, int64_t F) {
    const int64_t d = c.hidden_size;
    const T lim = T(c.swiglu_limit);
    gr.resize(static_cast<size_t>(n * F)), ur.resize(static_cast<size_t>(n * F)), h.resize(static_cast<size_t>(n * F));
    lin(gr.data(), F, x, d, W1, n, F, d);
    lin(ur.data(), F, x, d, W3, n, F, d);
    for (int64_t i = 0; i < n * F; ++i) h[static_cast<size_t>(i)] = v4k::swiglu_clamped(gr[static_cast<size_t>(i)], ur[static_cast<size_t>(i)], lim);
  }
  // out = h W2^T, h = swiglu(x W1^T, x W3^T): dx (=) and the weight gradients from dout.
  void swiglu_bwd(T* dx, const T* dout, const T* x, const Vec<T>& gr, const Vec<T>& ur, const Vec<T>& h, int64_t n,
                  int64_t o1, int64_t o3, int64_t o2, int64_t F) {
    const int64_t d = c.hidden_size;
    const T lim = T(c.swiglu_limit);
    Vec<T> dh(static_cast<size_t>(n * F)), dg(static_cast<size_t>(n * F)), du(static_cast<size_t>(n * F));
    lin_bwd(dh.data(), F, false, g(o2), dout, d, h.data(), F, p(o2), n, d, F);
    for (int64_t i = 0; i < n * F; ++i)
      v4k::swiglu_clamped_backward(&dg[static_cast<size_t>(i)], &du[static_cast<size_t>(i)], dh[static_cast<size_t>(i)], gr[static_cast<size_t>(i)], ur[static_cast<size_t>(i)], lim);
    lin_bwd(dx, d, false, g(o1), dg.data(), F, x, d, p(o1), n, F, d);
    lin_bwd(dx, d, true, g(o3), du.data(), F, x, d, p(o3), n, F, d);
  }

  void moe_fwd(int64_t l, Moe& mo, const T* y, const int32_t* ids, int64_t Tn, std::vector<int64_t>* load) {
    const Off& o = off[static_cast<size_t>(l)];
    const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, d = c.hidden_size, F = c.moe_intermediate_size;
    const bool sig = c.scoring_func == "sigmoid", hash = c.mlp_type(l) == V4Mlp::Hash;
    mo.logits.resize(static_cast<size_t>(Tn * E)), mo.s.resize(static_cast<size_t>(Tn * E)), mo.w.resize(static_cast<size_t>(Tn * K));
    mo.idx.resize(static_cast<size_t>(Tn * K));
    lin(mo.logits.data(), E, y, d, p(o.gate), Tn, E, d);
    for (int64_t i = 0; i < Tn * E; ++i) mo.s[static_cast<size_t>(i)] = v4k::route_score(mo.logits[static_cast<size_t>(i)], sig);
    // Selection (as v4_route): hash layers tid2eid[id], moe layers top-K of score + bias.
    const float* bias = hash ? nullptr : w.bias_flat.f32() + o.bias;
    Vec<T> sk(static_cast<size_t>(K));
    for (int64_t t = 0; t < Tn; ++t) {
      int32_t* idx = mo.idx.data() + t * K;
      const T* s = mo.s.data() + t * E;
      if (hash) {
        std::copy_n(w.tid2eid[static_cast<size_t>(l)].data() + int64_t(ids[t]) * K, K, idx);
      } else {
        v4k::route_select(idx, s, bias, E, K);
      }
      for (int64_t k = 0; k < K; ++k) sk[static_cast<size_t>(k)] = s[idx[k]];
      v4k::route_weights(mo.w.data() + t * K, sk.data(), K, T(c.routed_scaling_factor));
      if (load)
        for (int64_t k = 0; k < K; ++k) ++(*load)[static_cast<size_t>(idx[k])];
    }
    if (!hash && bal_alpha > 0) {
      mo.dbal.resize(static_cast<size_t>(Tn * E));
      bal_sum += cpu::balance_loss(mo.dbal.data(), mo.s.data(), mo.idx.data(), 1, Tn, E, K, bal_alpha, bal_scale);
    } else {
      mo.dbal.clear();
    }
    // Shared expert, then the routed experts on top.
    mo.out.resize(static_cast<size_t>(Tn * d));
    swiglu_fwd(mo.sg, mo.su, mo.sh, y, Tn, p(o.sw1), p(o.sw3), F);
    lin(mo.out.data(), d, mo.sh.data(), F, p(o.sw2), Tn, d, F);
    mo.rows.assign(static_cast<size_t>(E), {});
    for (int64_t a = 0; a < Tn * K; ++a) mo.rows[static_cast<size_t>(mo.idx[static_cast<size_t>(a)])].push_back(a);
    mo.g.assign(static_cast<size_t>(E), {}), mo.u.assign(static_cast<size_t>(E), {}), mo.h.assign(static_cast<size_t>(E), {}), mo.eo.assign(static_cast<size_t>(E), {});
    Vec<T> xe;
    for (int64_t e = 0; e < E; ++e) {
      const auto& as = mo.rows[static_cast<size_t>(e)];
      const int64_t n = int64_t(as.size());
      if (n == 0) continue;
      xe.resize(static_cast<size_t>(n * d));
      for (int64_t i = 0; i < n; ++i) std::copy_n(y + (as[static_cast<size_t>(i)] / K) * d, d, xe.data() + i * d);
      swiglu_fwd(mo.g[static_cast<size_t>(e)], mo.u[static_cast<size_t>(e)], mo.h[static_cast<size_t>(e)], xe.data(), n, p(o.w1) + e * F * d,
                 p(o.w3) + e * F * d, F);
      mo.eo[static_cast<size_t>(e)].resize(static_cast<size_t>(n * d));
      lin(mo.eo[static_cast<size_t>(e)].data(), d, mo.h[static_cast<size_t>(e)].data(), F, p(o.w2) + e * d * F, n, d, F);
      for (int64_t i = 0; i < n; ++i) {
        const T wt = mo.w[static_cast<size_t>(as[static_cast<size_t>(i)])];
        T* dst = mo.out.data() + (as[static_cast<size_t>(i)] / K) * d;
        const T* src = mo.eo[static_cast<size_t>(e)].data() + i * d;
        for (int64_t j = 0; j < d; ++j) dst[j] += src[j] * wt;
      }
    }
  }

  // dy (=) from df = dL/d(MoE output).
  void moe_bwd(int64_t l, const Moe& mo, const T* y, const T* df, T* dy, int64_t Tn) {
    const Off& o = off[static_cast<size_t>(l)];
    const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok, d = c.hidden_size, F = c.moe_intermediate_size;
    const bool sig = c.scoring_func == "sigmoid";
    swiglu_bwd(dy, df, y, mo.sg, mo.su, mo.sh, Tn, o.sw1, o.sw3, o.sw2, F);
    // out[t] += w[t, k] eo_e[i]:  dw[t, k] = <df[t], eo_e[i]>,  d eo_e[i] = w[t, k] df[t]
    Vec<T> dw(static_cast<size_t>(Tn * K), T(0)), xe, deo, dxe;
    for (int64_t e = 0; e < E; ++e) {
      const auto& as = mo.rows[static_cast<size_t>(e)];
      const int64_t n = int64_t(as.size());
      if (n == 0) continue;
      xe.resize(static_cast<size_t>(n * d)), deo.resize(static_cast<size_t>(n * d)), dxe.resize(static_cast<size_t>(n * d));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t a = as[static_cast<size_t>(i)], t = a / K;
        std::copy_n(y + t * d, d, xe.data() + i * d);
        T s = 0;
        for (int64_t j = 0; j < d; ++j) {
          s += df[t * d + j] * mo.eo[static_cast<size_t>(e)][static_cast<size_t>(i * d + j)];
          deo[static_cast<size_t>(i * d + j)] = mo.w[static_cast<size_t>(a)] * df[t * d + j];
        }
        dw[static_cast<size_t>(a)] = s;
      }
      swiglu_bwd(dxe.data(), deo.data(), xe.data(), mo.g[static_cast<size_t>(e)], mo.u[static_cast<size_t>(e)], mo.h[static_cast<size_t>(e)], n,
                 o.w1 + e * F * d, o.w3 + e * F * d, o.w2 + e * d * F, F);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = as[static_cast<size_t>(i)] / K;
        for (int64_t j = 0; j < d; ++j) dy[t * d + j] += dxe[static_cast<size_t>(i * d + j)];
      }
    }
    // w = route_weights(s[sel]); s = score(logits); logits = y gate^T
    Vec<T> dlog(static_cast<size_t>(Tn * E), T(0)), sk(static_cast<size_t>(K)), ds(static_cast<size_t>(K));
    for (int64_t t = 0; t < Tn; ++t) {
      const int32_t* idx = mo.idx.data() + t * K;
      for (int64_t k = 0; k < K; ++k) sk[static_cast<size_t>(k)] = mo.s[static_cast<size_t>(t * E + idx[k])];
      v4k::route_weights_backward(ds.data(), dw.data() + t * K, sk.data(), K, T(c.routed_scaling_factor));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = t * E + idx[k];
        dlog[static_cast<size_t>(e)] += ds[static_cast<size_t>(k)] * v4k::route_score_grad(mo.logits[static_cast<size_t>(e)], mo.s[static_cast<size_t>(e)], sig);
      }
      if (!mo.dbal.empty())  // the balance loss reaches every expert's score
        for (int64_t e = t * E; e < (t + 1) * E; ++e)
          dlog[static_cast<size_t>(e)] += mo.dbal[static_cast<size_t>(e)] *
                                          v4k::route_score_grad(mo.logits[static_cast<size_t>(e)], mo.s[static_cast<size_t>(e)], sig);
    }
    lin_bwd(dy, d, true, g(o.gate), dlog.data(), E, y, d, p(o.gate), Tn, E, d);
  }

  // ---------------------------------------------------------------- layer
  void layer_fwd(int64_t l, Vec<T>& X, const int32_t* ids, int64_t Tn, std::vector<int64_t>* load) {
    const Off& o = off[static_cast<size_t>(l)];
    Layer& S = L[static_cast<size_t>(l)];
    const int64_t N = c.hc_mult, d = c.hidden_size;
    hc_fwd(S.ha, X.data(), Tn, o.ha_fn, o.ha_base, o.ha_scale, o.attn_norm);
    attn_fwd(l, S.at, S.ha.xn.data(), Tn);
    for (int64_t t = 0; t < Tn; ++t)  // X1 = post a + comb^T X
      v4k::hc_expand(X.data() + t * N * d, S.ha.X.data() + t * N * d, S.at.out.data() + t * d, S.ha.post.data() + t * N,
                     S.ha.comb.data() + t * N * N, N, d);
    hc_fwd(S.hf, X.data(), Tn, o.hf_fn, o.hf_base, o.hf_scale, o.ffn_norm);
    moe_fwd(l, S.mo, S.hf.xn.data(), ids, Tn, load);
    for (int64_t t = 0; t < Tn; ++t)  // X2 = post f + comb^T X1
      v4k::hc_expand(X.data() + t * N * d, S.hf.X.data() + t * N * d, S.mo.out.data() + t * d, S.hf.post.data() + t * N,
                     S.hf.comb.data() + t * N * N, N, d);
  }
  // dX: gradient w.r.t. the layer output in, w.r.t. its input out.
  void layer_bwd(int64_t l, Vec<T>& dX, int64_t Tn) {
    const Off& o = off[static_cast<size_t>(l)];
    const Layer& S = L[static_cast<size_t>(l)];
    const int64_t N = c.hc_mult, d = c.hidden_size;
    Vec<T> dX1(dX.size()), df(static_cast<size_t>(Tn * d)), dpost(static_cast<size_t>(Tn * N)), dcomb(static_cast<size_t>(Tn * N * N)), dy(static_cast<size_t>(Tn * d));
    for (int64_t t = 0; t < Tn; ++t)
      v4k::hc_expand_backward(dX1.data() + t * N * d, df.data() + t * d, dpost.data() + t * N, dcomb.data() + t * N * N,
                              dX.data() + t * N * d, S.hf.X.data() + t * N * d, S.mo.out.data() + t * d,
                              S.hf.post.data() + t * N, S.hf.comb.data() + t * N * N, N, d);
    moe_bwd(l, S.mo, S.hf.xn.data(), df.data(), dy.data(), Tn);
    hc_bwd(S.hf, dX1.data(), dy.data(), dpost.data(), dcomb.data(), Tn, o.hf_fn, o.hf_base, o.hf_scale, o.ffn_norm);
    for (int64_t t = 0; t < Tn; ++t)
      v4k::hc_expand_backward(dX.data() + t * N * d, df.data() + t * d, dpost.data() + t * N, dcomb.data() + t * N * N,
                              dX1.data() + t * N * d, S.ha.X.data() + t * N * d, S.at.out.data() + t * d,
                              S.ha.post.data() + t * N, S.ha.comb.data() + t * N * N, N, d);
    attn_bwd(l, S.at, S.ha.xn.data(), df.data(), dy.data(), Tn);
    hc_bwd(S.ha, dX.data(), dy.data(), dpost.data(), dcomb.data(), Tn, o.ha_fn, o.ha_base, o.ha_scale, o.attn_norm);
  }

  // ---------------------------------------------------------------- the output head (main model and MTP blocks)
  // logits = rmsnorm(h, norm) head^T with h = sum_j pre_j X_j, pre = sigmoid(scale . (fn . rms(X)) + base) + eps;
  // CE against tg (-1: no target). Returns the summed CE; when backward, dX (=) d(scale * sum CE)/dX and the
  // head's weight gradients (+=).
  double head(const HeadOff& o, const T* X, int64_t Tn, const int32_t* tg, double scale, bool backward, int64_t* correct,
              T* dX) {
    const int64_t N = c.hc_mult, d = c.hidden_size, Nd = N * d, V = c.vocab_size;
    Vec<T> rstd(static_cast<size_t>(Tn)), xhat(static_cast<size_t>(Tn * Nd)), mu(static_cast<size_t>(Tn * N)),
        pre(static_cast<size_t>(Tn * N)), h(static_cast<size_t>(Tn * d)), rstd_fin(static_cast<size_t>(Tn)),
        hn(static_cast<size_t>(Tn * d));
    for (int64_t t = 0; t < Tn; ++t) rstd[static_cast<size_t>(t)] = v4k::rms_row(xhat.data() + t * Nd, X + t * Nd, Nd, eps());
    lin(mu.data(), N, xhat.data(), Nd, p(o.fn), Tn, N, Nd);
    for (int64_t t = 0; t < Tn; ++t) {
      v4k::hc_head_weights(pre.data() + t * N, mu.data() + t * N, p(o.base), p(o.scale), N, T(c.hc_eps));
      v4k::hc_collapse(h.data() + t * d, pre.data() + t * N, X + t * Nd, N, d);
    }
    cpu::rmsnorm_forward(hn.data(), rstd_fin.data(), h.data(), d, p(o.norm), Tn, d, eps());
    Vec<T> logits(static_cast<size_t>(Tn * V));
    lin(logits.data(), V, hn.data(), d, p(o_head), Tn, V, d);
    int64_t hits = 0;  // (the kernel overwrites its count)
    const double loss = cpu::cross_entropy_forward_backward(logits.data(), logits.data(), tg, Tn, V, scale, &hits);
    *correct += hits;
    if (!backward) return loss;
    // logits = hn head^T;  hn = rmsnorm(h, norm)
    Vec<T> dhn(static_cast<size_t>(Tn * d)), dh(static_cast<size_t>(Tn * d), T(0));
    lin_bwd(dhn.data(), d, false, g(o_head), logits.data(), V, hn.data(), d, p(o_head), Tn, V, d);
    cpu::rmsnorm_backward(dh.data(), d, g(o.norm), dhn.data(), h.data(), d, rstd_fin.data(), p(o.norm), Tn, d);
    // h = sum_j pre_j X_j with pre from mu = fn . rms(X)
    std::fill(dX, dX + Tn * Nd, T(0));
    Vec<T> dpre(static_cast<size_t>(N)), dmu(static_cast<size_t>(Tn * N)), dxhat(static_cast<size_t>(Tn * Nd));
    for (int64_t t = 0; t < Tn; ++t) {
      v4k::hc_collapse_backward(dpre.data(), dX + t * Nd, dh.data() + t * d, pre.data() + t * N, X + t * Nd, N, d);
      v4k::hc_head_weights_backward(dmu.data() + t * N, g(o.base), g(o.scale), dpre.data(), mu.data() + t * N,
                                    p(o.base), p(o.scale), N);
    }
    lin_bwd(dxhat.data(), Nd, false, g(o.fn), dmu.data(), N, xhat.data(), Nd, p(o.fn), Tn, N, Nd);
    for (int64_t t = 0; t < Tn; ++t)
      v4k::rms_row_backward(dX + t * Nd, dxhat.data() + t * Nd, X + t * Nd, rstd[static_cast<size_t>(t)], Nd);
    return loss;
  }

  // ---------------------------------------------------------------- MTP block k (0-based), rows i < Tk
  // X0_j = rmsnorm(Xin_j, hnorm) h_proj^T + rmsnorm(embed[tok], enorm) e_proj^T (every stream j), X = block(X0).
  void mtp_fwd(int64_t k, const T* Xin, const int32_t* tok, int64_t Tk, std::vector<int64_t>* load) {
    const MtpOff& o = mtp_off[static_cast<size_t>(k)];
    Mtp& m = mtp[static_cast<size_t>(k)];
    const int64_t N = c.hc_mult, d = c.hidden_size, Nd = N * d;
    m.Xin.assign(Xin, Xin + Tk * Nd);
    m.e.resize(static_cast<size_t>(Tk * d)), m.en.resize(static_cast<size_t>(Tk * d)), m.rstd_e.resize(static_cast<size_t>(Tk));
    m.xh.resize(static_cast<size_t>(Tk * Nd)), m.rstd_h.resize(static_cast<size_t>(Tk * N));
    m.X.resize(static_cast<size_t>(Tk * Nd));
    cpu::embedding_forward(m.e.data(), p(o_embed), tok, Tk, d);
    cpu::rmsnorm_forward(m.en.data(), m.rstd_e.data(), m.e.data(), d, p(o.enorm), Tk, d, eps());
    cpu::rmsnorm_forward(m.xh.data(), m.rstd_h.data(), Xin, d, p(o.hnorm), Tk * N, d, eps());
    Vec<T> pe(static_cast<size_t>(Tk * d));
    lin(pe.data(), d, m.en.data(), d, p(o.e_proj), Tk, d, d);
    lin(m.X.data(), d, m.xh.data(), d, p(o.h_proj), Tk * N, d, d);
    for (int64_t t = 0; t < Tk; ++t)
      for (int64_t j = 0; j < N; ++j)
        for (int64_t i = 0; i < d; ++i) m.X[static_cast<size_t>((t * N + j) * d + i)] += pe[static_cast<size_t>(t * d + i)];
    layer_fwd(c.num_hidden_layers + k, m.X, tok, Tk, load);
  }
  // dX: the gradient w.r.t. the block's output streams in (destroyed); dXin (=) the gradient w.r.t. its input streams.
  void mtp_bwd(int64_t k, Vec<T>& dX, const int32_t* tok, int64_t Tk, T* dXin) {
    const MtpOff& o = mtp_off[static_cast<size_t>(k)];
    const Mtp& m = mtp[static_cast<size_t>(k)];
    const int64_t N = c.hc_mult, d = c.hidden_size;
    layer_bwd(c.num_hidden_layers + k, dX, Tk);  // dX is now dL/dX0
    // X0_j = xh_j h_proj^T + en e_proj^T
    Vec<T> dxh(static_cast<size_t>(Tk * N * d)), dpe(static_cast<size_t>(Tk * d), T(0)), den(static_cast<size_t>(Tk * d)),
        de(static_cast<size_t>(Tk * d), T(0));
    lin_bwd(dxh.data(), d, false, g(o.h_proj), dX.data(), d, m.xh.data(), d, p(o.h_proj), Tk * N, d, d);
    for (int64_t t = 0; t < Tk; ++t)
      for (int64_t j = 0; j < N; ++j)
        for (int64_t i = 0; i < d; ++i) dpe[static_cast<size_t>(t * d + i)] += dX[static_cast<size_t>((t * N + j) * d + i)];
    lin_bwd(den.data(), d, false, g(o.e_proj), dpe.data(), d, m.en.data(), d, p(o.e_proj), Tk, d, d);
    // xh = rmsnorm(Xin, hnorm) per stream; en = rmsnorm(embed[tok], enorm)
    std::fill(dXin, dXin + Tk * N * d, T(0));
    cpu::rmsnorm_backward(dXin, d, g(o.hnorm), dxh.data(), m.Xin.data(), d, m.rstd_h.data(), p(o.hnorm), Tk * N, d);
    cpu::rmsnorm_backward(de.data(), d, g(o.enorm), den.data(), m.e.data(), d, m.rstd_e.data(), p(o.enorm), Tk, d);
    cpu::embedding_backward(g(o_embed), de.data(), tok, Tk, d);
  }

  // ---------------------------------------------------------------- one sequence
  // Returns the summed CE of the rows with a target; grads += scale * d(sum CE)/dtheta when backward. MTP block k
  // (k < mtp_scale.size()) adds its summed CE to mtp_sum[k] and mtp_scale[k] * d(its sum CE)/dtheta to the grads:
  // row i < Tn - k - 2 reads the previous stage's streams of row i (block 0: the main model's final streams) and
  // token i + k + 1, and predicts token i + k + 2.
  double sequence(const int32_t* ids, int64_t Tn, double scale, bool backward, int64_t* correct,
                  std::vector<std::vector<int64_t>>& load, const std::vector<int64_t>& moe_row,
                  const std::vector<double>& mtp_scale, std::vector<double>& mtp_sum, std::vector<int64_t>& mtp_correct) {
    const int64_t N = c.hc_mult, d = c.hidden_size, Nd = N * d;
    pos.resize(static_cast<size_t>(Tn));
    std::iota(pos.begin(), pos.end(), 0);
    rope_main.ensure(Tn), rope_comp.ensure(Tn);
    auto load_of = [&](int64_t l) {
      return moe_row[static_cast<size_t>(l)] >= 0 ? &load[static_cast<size_t>(moe_row[static_cast<size_t>(l)])] : nullptr;
    };
    Vec<T> e(static_cast<size_t>(Tn * d)), X(static_cast<size_t>(Tn * Nd));
    cpu::embedding_forward(e.data(), p(o_embed), ids, Tn, d);
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t j = 0; j < N; ++j) std::copy_n(e.data() + t * d, d, X.data() + (t * N + j) * d);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) layer_fwd(l, X, ids, Tn, load_of(l));
    std::vector<int32_t> tg(static_cast<size_t>(Tn));
    for (int64_t t = 0; t < Tn; ++t) tg[static_cast<size_t>(t)] = t + 1 < Tn ? ids[t + 1] : -1;
    Vec<T> dX(static_cast<size_t>(backward ? Tn * Nd : 0));
    const double loss = head(main_head, X.data(), Tn, tg.data(), scale, backward, correct, dX.data());
    // MTP blocks: forward and head each, then backward from the last block down into the main model's streams.
    const int64_t D = int64_t(mtp_scale.size());
    std::vector<Vec<T>> dmtp(static_cast<size_t>(D));
    for (int64_t k = 0; k < D; ++k) {
      const int64_t Tk = Tn - k - 2;
      const T* Xin = k == 0 ? X.data() : mtp[static_cast<size_t>(k - 1)].X.data();
      mtp_fwd(k, Xin, ids + k + 1, Tk, load_of(c.num_hidden_layers + k));
      dmtp[static_cast<size_t>(k)].resize(static_cast<size_t>(backward ? Tk * Nd : 0));
      mtp_sum[static_cast<size_t>(k)] += head(mtp_off[static_cast<size_t>(k)].head, mtp[static_cast<size_t>(k)].X.data(), Tk,
                                              ids + k + 2, mtp_scale[static_cast<size_t>(k)], backward,
                                              &mtp_correct[static_cast<size_t>(k)], dmtp[static_cast<size_t>(k)].data());
    }
    if (!backward) return loss;
    for (int64_t k = D - 1; k >= 0; --k) {
      const int64_t Tk = Tn - k - 2;
      Vec<T> dXin(static_cast<size_t>(Tk * Nd));
      mtp_bwd(k, dmtp[static_cast<size_t>(k)], ids + k + 1, Tk, dXin.data());
      T* into = k == 0 ? dX.data() : dmtp[static_cast<size_t>(k - 1)].data();  // rows i < Tk of the previous stage
      for (int64_t i = 0; i < Tk * Nd; ++i) into[i] += dXin[static_cast<size_t>(i)];
    }
    for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) layer_bwd(l, dX, Tn);
    // X_j = embed[ids] for every stream j
    Vec<T> de(static_cast<size_t>(Tn * d), T(0));
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t j = 0; j < N; ++j)
        for (int64_t i = 0; i < d; ++i) de[static_cast<size_t>(t * d + i)] += dX[static_cast<size_t>((t * N + j) * d + i)];
    cpu::embedding_backward(g(o_embed), de.data(), ids, Tn, d);
    return loss;
  }
};

template <typename T>
V4TrainModel<T>::V4TrainModel(const V4Weights& w, const T* params, T* grads)
    : impl_(std::make_unique<Impl>(w, params, grads)) {
  for (int64_t l = 0; l < w.cfg.num_blocks(); ++l)
    if (w.cfg.mlp_type(l) == V4Mlp::Moe) moe_layers_.push_back(l);
  reset_load();
}

template <typename T>
V4TrainModel<T>::~V4TrainModel() = default;

template <typename T>
void V4TrainModel<T>::reset_load() {
  load_.assign(moe_layers_.size(), std::vector<int64_t>(static_cast<size_t>(impl_->c.n_routed_experts), 0));
}

template <typename T>
void V4TrainModel<T>::set_balance_alpha(double alpha) {
  if (!(alpha >= 0) || !std::isfinite(alpha)) fail("the balance loss weight must be finite and >= 0, got {}", alpha);
  impl_->bal_alpha = alpha;
}

template <typename T>
V4StepStats V4TrainModel<T>::run(const int32_t* ids, int64_t B, int64_t Tn, double grad_scale, bool backward,
                                 double mtp_lambda) {
  const V4Config& c = impl_->c;
  if (Tn < 2) fail("training needs sequences of at least 2 tokens, got {}", Tn);
  if (Tn > c.max_position_embeddings)
    fail("sequence length {} exceeds max_position_embeddings = {}", Tn, c.max_position_embeddings);
  for (int64_t i = 0; i < B * Tn; ++i)
    if (ids[i] < 0 || ids[i] >= c.vocab_size) fail("token id {} is out of range for vocab_size {}", ids[i], c.vocab_size);
  std::vector<int64_t> moe_row(static_cast<size_t>(c.num_blocks()), -1);
  for (size_t r = 0; r < moe_layers_.size(); ++r) moe_row[static_cast<size_t>(moe_layers_[r])] = int64_t(r);
  V4StepStats st;
  st.count = B * (Tn - 1);
  const double scale = grad_scale / double(st.count);
  // MTP: loss = main + lambda / D * sum_k mean CE_k over the blocks that have a row with a target (Tn - k - 2 > 0).
  const int64_t D = mtp_lambda > 0 ? c.num_nextn_predict_layers : 0;
  std::vector<double> mtp_scale, mtp_sum;
  for (int64_t k = 0; k < D && Tn - k - 2 > 0; ++k) {
    st.mtp_count.push_back(B * (Tn - k - 2));
    mtp_scale.push_back(grad_scale * mtp_lambda / double(D) / double(st.mtp_count.back()));
  }
  mtp_sum.assign(mtp_scale.size(), 0.0);
  st.mtp_correct.assign(mtp_scale.size(), 0);
  double sum = 0;
  impl_->bal_sum = 0, impl_->bal_scale = grad_scale / double(B);  // the balance loss: the mean over sequences
  for (int64_t b = 0; b < B; ++b)
    sum += impl_->sequence(ids + b * Tn, Tn, scale, backward, &st.correct, load_, moe_row, mtp_scale, mtp_sum,
                           st.mtp_correct);
  st.loss = sum / double(st.count);
  st.balance_loss = impl_->bal_sum / double(B);
  st.total = st.loss + st.balance_loss;
  for (size_t k = 0; k < mtp_sum.size(); ++k) {
    st.mtp_loss.push_back(mtp_sum[k] / double(st.mtp_count[k]));
    st.total += mtp_lambda / double(D) * st.mtp_loss.back();
  }
  return st;
}

template class V4TrainModel<float>;
template class V4TrainModel<double>;

}  // namespace dsv3
