// One decoder layer of the training model, forward (saving activations) and backward:
//   x_mid = x + o_proj(MLA(input_layernorm(x)));  x_out = x_mid + FFN(post_attention_layernorm(x_mid))
// FFN is a dense SwiGLU, or DeepSeekMoE: shared experts + sum_k w_k Expert_k, routed by the sigmoid router.
// The layer backward turns dx (gradient w.r.t. x_out) into the gradient w.r.t. x, in place.
#include <utility>
#include <vector>

#include "model/kv_cache.h"
#include "model/v32_indexer.h"
#include "train/profile.h"
#include "train/train_model.h"

namespace dsv3 {

const int32_t* TrainModel::positions(int64_t B, int64_t Tq) {
  auto [it, fresh] = pos_.try_emplace(std::make_pair(B, Tq));
  if (fresh) {
    std::vector<int32_t> p(B * Tq);
    for (int64_t i = 0; i < B * Tq; ++i) p[i] = int32_t(i % Tq);
    upload_ints(it->second, p);
  }
  return it->second.data();
}

void TrainModel::mlp_forward(const MlpWeights& M, Mlp& m, const float* h, int64_t N, float* out) {
  ProfileScope prof_("mlp_fwd");
  const int64_t H = cfg_.hidden_size, I = M.gate.dim(0);
  be_.qlinear_forward(buf(m.g, N * I), h, P(M.gate), N, I, H);
  be_.qlinear_forward(buf(m.u, N * I), h, P(M.up), N, I, H);
  be_.swiglu_forward(buf(m.act, N * I), m.g.data(), m.u.data(), N * I);
  be_.qlinear_forward(out, m.act.data(), P(M.down), N, H, I);
}

// dh += d/dh of down(silu(gate h) * up h); weight gradients +=.
void TrainModel::mlp_backward(const MlpWeights& M, MlpWeights& Gw, Mlp& m, const float* h, int64_t N,
                              const float* dout, float* dh) {
  ProfileScope prof_("mlp_bwd");
  const int64_t H = cfg_.hidden_size, I = M.gate.dim(0);
  be_.qlinear_backward(buf(s_dact_, N * I), false, G(Gw.down), dout, m.act.data(), P(M.down), N, H, I);
  be_.swiglu_backward(buf(s_dg_, N * I), buf(s_du_, N * I), s_dact_.data(), m.g.data(), m.u.data(), N * I);
  be_.qlinear_backward(dh, true, G(Gw.gate), s_dg_.data(), h, P(M.gate), N, I, H);
  be_.qlinear_backward(dh, true, G(Gw.up), s_du_.data(), h, P(M.up), N, I, H);
}

// out [N, H] (overwritten) = o_proj(MLA(c.h1)).
void TrainModel::attention_forward(const AttnWeights& A, LayerCache& c, int64_t B, int64_t Tq, float* out) {
  ProfileScope prof_("attn_fwd");
  const int64_t N = B * Tq, H = cfg_.hidden_size, nh = cfg_.num_attention_heads, dn = cfg_.qk_nope_head_dim,
                dr = cfg_.qk_rope_head_dim, dv = cfg_.v_head_dim, r = cfg_.kv_lora_rank, qr = cfg_.q_lora_rank;
  const double eps = cfg_.rms_norm_eps;
  const int32_t* pos = positions(B, Tq);
  float* q = buf(c.q, N * nh * (dn + dr));
  if (qr > 0) {
    be_.qlinear_forward(buf(c.qa, N * qr), c.h1.data(), P(A.q_a_proj), N, qr, H);
    be_.rmsnorm_forward(buf(c.qa_n, N * qr), buf(c.rstd_qa, N), c.qa.data(), qr, P(A.q_a_norm), N, qr, eps);
    be_.qlinear_forward(q, c.qa_n.data(), P(A.q_b_proj), N, nh * (dn + dr), qr);
  } else {
    be_.qlinear_forward(q, c.h1.data(), P(A.q_proj), N, nh * (dn + dr), H);
  }
  float* kva = buf(c.kva, N * (r + dr));  // [N, r + dr] = [c_raw | k_pe_raw]
  be_.qlinear_forward(kva, c.h1.data(), P(A.kv_a_proj), N, r + dr, H);
  be_.rmsnorm_forward(buf(c.c, N * r), buf(c.rstd_kv, N), kva, r + dr, P(A.kv_a_norm), N, r, eps);
  float* kpe = buf(c.kpe, N * dr);  // [N, dr]: the rope columns of kva, rotated below
  be_.copy_2d(kpe, dr, kva + r, r + dr, N, dr, false);
  be_.rope_forward(q, N, nh, dn + dr, dn, dr, pos, cos_.data(), sin_.data(), cfg_.rope_interleave);
  be_.rope_forward(kpe, N, 1, dr, 0, dr, pos, cos_.data(), sin_.data(), cfg_.rope_interleave);
  be_.qlinear_forward(buf(c.kv, N * nh * (dn + dv)), c.c.data(), P(A.kv_b_proj), N, nh * (dn + dv), r);
  if (A.has_indexer) dsa_select(A, c, B, Tq);
  {
    ProfileScope p("attn_core_fwd");
    if (A.has_indexer)
      be_.attention_forward_sel(buf(c.ao, N * nh * dv), buf(c.lse, B * nh * Tq), q, c.kv.data(), kpe, B, Tq, nh, dn,
                                dr, dv, cfg_.softmax_scale(), c.sel.data(), cfg_.index_topk);
    else
      be_.attention_forward(buf(c.ao, N * nh * dv), buf(c.lse, B * nh * Tq), q, c.kv.data(), kpe, B, Tq, nh, dn, dr,
                            dv, cfg_.softmax_scale());
  }
  be_.qlinear_forward(out, c.ao.data(), P(A.o_proj), N, H, nh * dv);
}

void TrainModel::dsa_select(const AttnWeights& A, LayerCache& c, int64_t B, int64_t Tq) {
  ProfileScope prof_("dsa_select");
  const int64_t N = B * Tq, H = cfg_.hidden_size, qr = cfg_.q_lora_rank;
  auto host = [](float* p, Shape s, const char* n) {
    Tensor t;
    t.name = n;
    t.shape = std::move(s);
    t.data = p;
    return t;
  };
  Tensor h = host(c.h1.data(), {N, H}, "h1"), qa = host(c.qa_n.data(), {N, qr}, "qa_n");
  // A scratch cache holding each sequence's index keys (the other parts of its rows stay unused).
  const int64_t bs = 64;
  KvCache cache(*dsa_be_, cfg_, B * ((Tq + bs - 1) / bs) * bs, bs);
  std::vector<SeqCache> sc(static_cast<size_t>(B));
  std::vector<SeqSlice> seqs;
  std::vector<int32_t> pos(static_cast<size_t>(N));
  for (int64_t b = 0; b < B; ++b) {
    if (!cache.reserve(sc[size_t(b)], Tq)) fail("internal: DSA scratch cache too small");
    SeqSlice s;
    s.row0 = b * Tq;
    s.len = Tq;
    s.pos0 = 0;
    s.blocks = sc[size_t(b)].blocks.data();
    s.num_blocks = int64_t(sc[size_t(b)].blocks.size());
    seqs.push_back(s);
    for (int64_t t = 0; t < Tq; ++t) pos[size_t(b * Tq + t)] = int32_t(t);
  }
  Tensor sel = dsa_select_tokens(*dsa_be_, cfg_, A.indexer, h, qa, cache, 0, seqs, pos, dsa_cos_, dsa_sin_);
  c.sel.assign(sel.ptr<int32_t>(), sel.ptr<int32_t>() + sel.numel());
}

// dh [N, H] (overwritten) = gradient w.r.t. the attention input h1, from dout = gradient w.r.t. o_proj's output.
void TrainModel::attention_backward(const AttnWeights& A, AttnWeights& Gw, LayerCache& c, int64_t B, int64_t Tq,
                                    const float* dout, float* dh) {
  ProfileScope prof_("attn_bwd");
  const int64_t N = B * Tq, H = cfg_.hidden_size, nh = cfg_.num_attention_heads, dn = cfg_.qk_nope_head_dim,
                dr = cfg_.qk_rope_head_dim, dv = cfg_.v_head_dim, r = cfg_.kv_lora_rank, qr = cfg_.q_lora_rank;
  const int32_t* pos = positions(B, Tq);
  be_.qlinear_backward(buf(s_dao_, N * nh * dv), false, G(Gw.o_proj), dout, c.ao.data(), P(A.o_proj), N, H, nh * dv);
  float* dq = buf(s_dq_, N * nh * (dn + dr));
  float* dkpe = buf(s_dkpe_, N * dr);
  {
    ProfileScope p("attn_core_bwd");
    if (A.has_indexer)
      be_.attention_backward_sel(dq, buf(s_dkv_, N * nh * (dn + dv)), dkpe, s_dao_.data(), c.ao.data(), c.lse.data(),
                                 c.q.data(), c.kv.data(), c.kpe.data(), B, Tq, nh, dn, dr, dv, cfg_.softmax_scale(),
                                 c.sel.data(), cfg_.index_topk);
    else
      be_.attention_backward(dq, buf(s_dkv_, N * nh * (dn + dv)), dkpe, s_dao_.data(), c.ao.data(), c.lse.data(),
                             c.q.data(), c.kv.data(), c.kpe.data(), B, Tq, nh, dn, dr, dv, cfg_.softmax_scale());
  }
  be_.qlinear_backward(buf(s_dc_, N * r), false, G(Gw.kv_b_proj), s_dkv_.data(), c.c.data(), P(A.kv_b_proj), N,
                      nh * (dn + dv), r);
  be_.rope_backward(dkpe, N, 1, dr, 0, dr, pos, cos_.data(), sin_.data(), cfg_.rope_interleave);
  be_.rope_backward(dq, N, nh, dn + dr, dn, dr, pos, cos_.data(), sin_.data(), cfg_.rope_interleave);
  // dkva [N, r + dr]: the latent part gets the norm's backward (accumulated into zeros), the rope part dkpe.
  float* dkva = zeros(s_dkva_, N * (r + dr));
  be_.copy_2d(dkva + r, r + dr, dkpe, dr, N, dr, false);
  be_.rmsnorm_backward(dkva, r + dr, G(Gw.kv_a_norm), s_dc_.data(), c.kva.data(), r + dr, c.rstd_kv.data(),
                       P(A.kv_a_norm), N, r);
  if (qr > 0) {
    be_.qlinear_backward(buf(s_dqa_n_, N * qr), false, G(Gw.q_b_proj), dq, c.qa_n.data(), P(A.q_b_proj), N,
                        nh * (dn + dr), qr);
    float* dqa = zeros(s_dqa_, N * qr);
    be_.rmsnorm_backward(dqa, qr, G(Gw.q_a_norm), s_dqa_n_.data(), c.qa.data(), qr, c.rstd_qa.data(), P(A.q_a_norm),
                         N, qr);
    be_.qlinear_backward(dh, false, G(Gw.q_a_proj), dqa, c.h1.data(), P(A.q_a_proj), N, qr, H);
  } else {
    be_.qlinear_backward(dh, false, G(Gw.q_proj), dq, c.h1.data(), P(A.q_proj), N, nh * (dn + dr), H);
  }
  be_.qlinear_backward(dh, true, G(Gw.kv_a_proj), dkva, c.h1.data(), P(A.kv_a_proj), N, r + dr, H);
}

void TrainModel::layer_forward(const LayerWeights& L, LayerCache& c, TBuf<float>& xb, int64_t B, int64_t Tq,
                               const LossOptions& opt, double grad_scale, size_t moe_row, double* bal) {
  const int64_t N = B * Tq, H = cfg_.hidden_size;
  const double eps = cfg_.rms_norm_eps;
  float* x = xb.data();  // [N, H], updated in place to the layer output
  be_.copy(buf(c.x_in, N * H), x, N * H);
  be_.rmsnorm_forward(buf(c.h1, N * H), buf(c.rstd_in, N), x, H, P(L.input_norm), N, H, eps);
  float* tmp = buf(tmp_, N * H);
  attention_forward(L.attn, c, B, Tq, tmp);
  be_.add(x, tmp, N * H);
  be_.copy(buf(c.x_mid, N * H), x, N * H);
  be_.rmsnorm_forward(buf(c.h2, N * H), buf(c.rstd_post, N), x, H, P(L.post_norm), N, H, eps);
  if (!L.is_moe) {
    mlp_forward(L.mlp, c.mlp, c.h2.data(), N, tmp);
  } else {
    const MoeWeights& M = L.moe;
    const int64_t E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok, I = cfg_.moe_intermediate_size;
    float* logits = buf(s_drl_, N * E);
    be_.linear_forward(logits, c.h2.data(), P(M.router), N, E, H);
    be_.route_forward(buf(c.idx, N * K), buf(c.w, N * K), buf(c.scores, N * E), logits,
                      M.bias ? Bias(M.bias) : nullptr, N, route_);
    if (opt.balance_alpha > 0)
      *bal += be_.balance_loss(buf(c.dscores, N * E), c.scores.data(), c.idx.data(), B, Tq, E, K, opt.balance_alpha,
                               grad_scale);
    else
      c.dscores.clear();
    be_.count_experts(load_[moe_row], c.idx.data(), N * K);
    if (M.has_shared) mlp_forward(M.shared, c.mlp, c.h2.data(), N, tmp);
    else be_.fill(tmp, 0.f, N * H);
    if (!c.experts) c.experts = ep_ ? ep_->new_state(be_) : be_.new_moe_state();
    ProfileScope prof_("experts_fwd");
    if (ep_)
      ep_->forward(be_, tmp, *c.experts, c.h2.data(), c.idx.data(), c.w.data(), P(M.gate), P(M.up), P(M.down), N, K,
                   H, I);
    else
      be_.experts_forward(tmp, *c.experts, c.h2.data(), c.idx.data(), c.w.data(), P(M.gate), P(M.up), P(M.down), N,
                          K, H, I, E);
  }
  be_.add(x, tmp, N * H);
}

// dx [N, H]: gradient w.r.t. the layer output in, w.r.t. its input out.
void TrainModel::layer_backward(const LayerWeights& L, LayerWeights& Gl, LayerCache& c, float* dx, int64_t B,
                                int64_t Tq) {
  const int64_t N = B * Tq, H = cfg_.hidden_size;
  float* dh = zeros(s_dh_, N * H);
  if (!L.is_moe) {
    mlp_backward(L.mlp, Gl.mlp, c.mlp, c.h2.data(), N, dx, dh);
  } else {
    const MoeWeights& M = L.moe;
    MoeWeights& GM = Gl.moe;
    const int64_t E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok, I = cfg_.moe_intermediate_size;
    if (M.has_shared) mlp_backward(M.shared, GM.shared, c.mlp, c.h2.data(), N, dx, dh);
    ProfileScope prof_("experts_bwd");
    if (ep_)
      ep_->backward(be_, dh, buf(s_dw_, N * K), G(GM.gate), G(GM.up), G(GM.down), dx, *c.experts, P(M.gate), P(M.up),
                    P(M.down), N, K, H, I);
    else
      be_.experts_backward(dh, buf(s_dw_, N * K), G(GM.gate), G(GM.up), G(GM.down), dx, *c.experts, c.h2.data(),
                           c.idx.data(), c.w.data(), P(M.gate), P(M.up), P(M.down), N, K, H, I, E);
    be_.route_backward(buf(s_drl_, N * E), s_dw_.data(), c.dscores.empty() ? nullptr : c.dscores.data(),
                       c.scores.data(), c.idx.data(), N, route_);
    be_.linear_backward(dh, true, G(GM.router), s_drl_.data(), c.h2.data(), P(M.router), N, E, H);
  }
  be_.rmsnorm_backward(dx, H, G(Gl.post_norm), dh, c.x_mid.data(), H, c.rstd_post.data(), P(L.post_norm), N, H);
  // dx is now the gradient w.r.t. x_mid, which is also the gradient w.r.t. o_proj's output.
  float* dattn_in = buf(tmp_, N * H);
  attention_backward(L.attn, Gl.attn, c, B, Tq, dx, dattn_in);
  be_.rmsnorm_backward(dx, H, G(Gl.input_norm), dattn_in, c.x_in.data(), H, c.rstd_in.data(), P(L.input_norm), N, H);
}

}  // namespace dsv3
