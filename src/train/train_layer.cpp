// One decoder layer of the training model, forward (saving activations) and backward:
//   x_mid = x + o_proj(MLA(input_layernorm(x)));  x_out = x_mid + FFN(post_attention_layernorm(x_mid))
// FFN is a dense SwiGLU, or DeepSeekMoE: shared experts + sum_k w_k Expert_k, routed by the sigmoid router.
// The layer backward turns dx (gradient w.r.t. x_out) into the gradient w.r.t. x, in place.
#include <algorithm>
#include <cstring>

#include "ops/cpu/blas.h"
#include "train/profile.h"
#include "train/train_model.h"
#include "train/scratch.h"

namespace dsv3 {

using namespace cpu;


void TrainModel::positions(int64_t B, int64_t Tq) {
  pos_.resize(B * Tq);
  for (int64_t i = 0; i < B * Tq; ++i) pos_[i] = int32_t(i % Tq);
}

void TrainModel::mlp_forward(const MlpWeights& M, Mlp& m, const float* h, int64_t N, float* out) {
  ProfileScope prof_("mlp_fwd");
  const int64_t H = cfg_.hidden_size, I = M.gate.dim(0);
  linear_forward(buf(m.g, N * I), h, P(M.gate), N, I, H);
  linear_forward(buf(m.u, N * I), h, P(M.up), N, I, H);
  swiglu_forward(buf(m.act, N * I), m.g.data(), m.u.data(), N * I);
  linear_forward(out, m.act.data(), P(M.down), N, H, I);
}

// dh += d/dh of down(silu(gate h) * up h); weight gradients +=.
void TrainModel::mlp_backward(const MlpWeights& M, MlpWeights& Gw, Mlp& m, const float* h, int64_t N,
                              const float* dout, float* dh) {
  ProfileScope prof_("mlp_bwd");
  const int64_t H = cfg_.hidden_size, I = M.gate.dim(0);
  linear_backward(buf(s_dact_, N * I), false, G(Gw.down), dout, m.act.data(), P(M.down), N, H, I);
  swiglu_backward(buf(s_dg_, N * I), buf(s_du_, N * I), s_dact_.data(), m.g.data(), m.u.data(), N * I);
  linear_backward(dh, true, G(Gw.gate), s_dg_.data(), h, P(M.gate), N, I, H);
  linear_backward(dh, true, G(Gw.up), s_du_.data(), h, P(M.up), N, I, H);
}

void TrainModel::attention_forward(const AttnWeights& A, LayerCache& c, int64_t B, int64_t Tq,
                                   std::vector<float>& out) {
  ProfileScope prof_("attn_fwd");
  const int64_t N = B * Tq, H = cfg_.hidden_size, nh = cfg_.num_attention_heads, dn = cfg_.qk_nope_head_dim,
                dr = cfg_.qk_rope_head_dim, dv = cfg_.v_head_dim, r = cfg_.kv_lora_rank, qr = cfg_.q_lora_rank;
  const double eps = cfg_.rms_norm_eps;
  positions(B, Tq);
  float* q = buf(c.q, N * nh * (dn + dr));
  if (qr > 0) {
    linear_forward(buf(c.qa, N * qr), c.h1.data(), P(A.q_a_proj), N, qr, H);
    rmsnorm_forward(buf(c.qa_n, N * qr), buf(c.rstd_qa, N), c.qa.data(), qr, P(A.q_a_norm), N, qr, eps);
    linear_forward(q, c.qa_n.data(), P(A.q_b_proj), N, nh * (dn + dr), qr);
  } else {
    linear_forward(q, c.h1.data(), P(A.q_proj), N, nh * (dn + dr), H);
  }
  linear_forward(buf(c.kva, N * (r + dr)), c.h1.data(), P(A.kv_a_proj), N, r + dr, H);
  rmsnorm_forward(buf(c.c, N * r), buf(c.rstd_kv, N), c.kva.data(), r + dr, P(A.kv_a_norm), N, r, eps);
  float* kpe = buf(c.kpe, N * dr);
  for (int64_t t = 0; t < N; ++t) std::copy_n(c.kva.data() + t * (r + dr) + r, dr, kpe + t * dr);
  rope_forward(q, N, nh, dn + dr, dn, dr, pos_.data(), cos_.f32(), sin_.f32(), cfg_.rope_interleave);
  rope_forward(kpe, N, 1, dr, 0, dr, pos_.data(), cos_.f32(), sin_.f32(), cfg_.rope_interleave);
  linear_forward(buf(c.kv, N * nh * (dn + dv)), c.c.data(), P(A.kv_b_proj), N, nh * (dn + dv), r);
  {
    ProfileScope p("attn_core_fwd");
    cpu::attention_forward(buf(c.ao, N * nh * dv), buf(c.lse, B * nh * Tq), q, c.kv.data(), kpe, B, Tq, nh, dn, dr, dv,
                         cfg_.softmax_scale());
  }
  linear_forward(buf(out, N * H), c.ao.data(), P(A.o_proj), N, H, nh * dv);
}

// dh (overwritten) = gradient w.r.t. the attention input h1, from dout = gradient w.r.t. o_proj's output.
void TrainModel::attention_backward(const AttnWeights& A, AttnWeights& Gw, LayerCache& c, int64_t B, int64_t Tq,
                                    const std::vector<float>& dout, std::vector<float>& dh) {
  ProfileScope prof_("attn_bwd");
  const int64_t N = B * Tq, H = cfg_.hidden_size, nh = cfg_.num_attention_heads, dn = cfg_.qk_nope_head_dim,
                dr = cfg_.qk_rope_head_dim, dv = cfg_.v_head_dim, r = cfg_.kv_lora_rank, qr = cfg_.q_lora_rank;
  positions(B, Tq);
  linear_backward(buf(s_dao_, N * nh * dv), false, G(Gw.o_proj), dout.data(), c.ao.data(), P(A.o_proj), N, H,
                  nh * dv);
  float* dq = buf(s_dq_, N * nh * (dn + dr));
  float* dkpe = buf(s_dkpe_, N * dr);
  {
    ProfileScope p("attn_core_bwd");
    cpu::attention_backward(dq, buf(s_dkv_, N * nh * (dn + dv)), dkpe, s_dao_.data(), c.ao.data(), c.lse.data(),
                          c.q.data(), c.kv.data(), c.kpe.data(), B, Tq, nh, dn, dr, dv, cfg_.softmax_scale());
  }
  linear_backward(buf(s_dc_, N * r), false, G(Gw.kv_b_proj), s_dkv_.data(), c.c.data(), P(A.kv_b_proj), N,
                  nh * (dn + dv), r);
  rope_backward(dkpe, N, 1, dr, 0, dr, pos_.data(), cos_.f32(), sin_.f32(), cfg_.rope_interleave);
  rope_backward(dq, N, nh, dn + dr, dn, dr, pos_.data(), cos_.f32(), sin_.f32(), cfg_.rope_interleave);
  // kva = [c_raw | k_pe_raw]: the latent part gets the norm's backward, the rope part dkpe.
  float* dkva = buf(s_dkva_, N * (r + dr));
  for (int64_t t = 0; t < N; ++t) {
    std::fill_n(dkva + t * (r + dr), r, 0.f);
    std::copy_n(dkpe + t * dr, dr, dkva + t * (r + dr) + r);
  }
  rmsnorm_backward(dkva, r + dr, G(Gw.kv_a_norm), s_dc_.data(), c.kva.data(), r + dr, c.rstd_kv.data(),
                   P(A.kv_a_norm), N, r);
  buf(dh, N * H);
  if (qr > 0) {
    linear_backward(buf(s_dqa_n_, N * qr), false, G(Gw.q_b_proj), dq, c.qa_n.data(), P(A.q_b_proj), N,
                    nh * (dn + dr), qr);
    zero(s_dqa_, N * qr);
    rmsnorm_backward(s_dqa_.data(), qr, G(Gw.q_a_norm), s_dqa_n_.data(), c.qa.data(), qr, c.rstd_qa.data(),
                     P(A.q_a_norm), N, qr);
    linear_backward(dh.data(), false, G(Gw.q_a_proj), s_dqa_.data(), c.h1.data(), P(A.q_a_proj), N, qr, H);
  } else {
    linear_backward(dh.data(), false, G(Gw.q_proj), dq, c.h1.data(), P(A.q_proj), N, nh * (dn + dr), H);
  }
  linear_backward(dh.data(), true, G(Gw.kv_a_proj), dkva, c.h1.data(), P(A.kv_a_proj), N, r + dr, H);
}

void TrainModel::layer_forward(const LayerWeights& L, LayerCache& c, std::vector<float>& x, int64_t B, int64_t Tq,
                               const LossOptions& opt, double grad_scale, size_t moe_row, double* bal) {
  const int64_t N = B * Tq, H = cfg_.hidden_size;
  const double eps = cfg_.rms_norm_eps;
  c.x_in = x;
  rmsnorm_forward(buf(c.h1, N * H), buf(c.rstd_in, N), x.data(), H, P(L.input_norm), N, H, eps);
  attention_forward(L.attn, c, B, Tq, tmp_);
  float* xm = buf(c.x_mid, N * H);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < N * H; ++i) xm[i] = x[i] += tmp_[i];
  rmsnorm_forward(buf(c.h2, N * H), buf(c.rstd_post, N), x.data(), H, P(L.post_norm), N, H, eps);
  if (!L.is_moe) {
    mlp_forward(L.mlp, c.mlp, c.h2.data(), N, tmp_.data());
  } else {
    const MoeWeights& M = L.moe;
    const int64_t E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok, I = cfg_.moe_intermediate_size;
    float* logits = buf(s_drl_, N * E);
    linear_forward(logits, c.h2.data(), P(M.router), N, E, H);
    route_forward(buf(c.idx, N * K), buf(c.w, N * K), buf(c.scores, N * E), logits, M.bias ? P(M.bias) : nullptr, N,
                  route_);
    if (opt.balance_alpha > 0)
      *bal += balance_loss(buf(c.dscores, N * E), c.scores.data(), c.idx.data(), B, Tq, E, K, opt.balance_alpha,
                           grad_scale);
    else
      c.dscores.clear();
    auto& ld = load_[moe_row];
    for (int64_t i = 0; i < N * K; ++i) ld[c.idx[i]]++;
    if (M.has_shared) mlp_forward(M.shared, c.mlp, c.h2.data(), N, tmp_.data());
    else std::fill(tmp_.begin(), tmp_.end(), 0.f);
    ProfileScope prof_("experts_fwd");
    experts_forward(tmp_.data(), c.experts, c.h2.data(), c.idx.data(), c.w.data(), P(M.gate), P(M.up), P(M.down), N,
                    K, H, I, E);
  }
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < N * H; ++i) x[i] += tmp_[i];
}

void TrainModel::layer_backward(const LayerWeights& L, LayerWeights& Gl, LayerCache& c, std::vector<float>& dx,
                                int64_t B, int64_t Tq) {
  const int64_t N = B * Tq, H = cfg_.hidden_size;
  zero(s_dh_, N * H);
  if (!L.is_moe) {
    mlp_backward(L.mlp, Gl.mlp, c.mlp, c.h2.data(), N, dx.data(), s_dh_.data());
  } else {
    const MoeWeights& M = L.moe;
    MoeWeights& GM = Gl.moe;
    const int64_t E = cfg_.n_routed_experts, K = cfg_.num_experts_per_tok, I = cfg_.moe_intermediate_size;
    if (M.has_shared) mlp_backward(M.shared, GM.shared, c.mlp, c.h2.data(), N, dx.data(), s_dh_.data());
    ProfileScope prof_("experts_bwd");
    experts_backward(s_dh_.data(), buf(s_dw_, N * K), G(GM.gate), G(GM.up), G(GM.down), dx.data(), c.experts,
                     c.h2.data(), c.idx.data(), c.w.data(), P(M.gate), P(M.up), P(M.down), N, K, H, I, E);
    route_backward(buf(s_drl_, N * E), s_dw_.data(), c.dscores.empty() ? nullptr : c.dscores.data(), c.scores.data(),
                   c.idx.data(), N, route_);
    linear_backward(s_dh_.data(), true, G(GM.router), s_drl_.data(), c.h2.data(), P(M.router), N, E, H);
  }
  rmsnorm_backward(dx.data(), H, G(Gl.post_norm), s_dh_.data(), c.x_mid.data(), H, c.rstd_post.data(),
                   P(L.post_norm), N, H);
  // dx is now the gradient w.r.t. x_mid, which is also the gradient w.r.t. o_proj's output.
  std::vector<float> dattn_in;
  dattn_in.swap(tmp_);  // borrow the scratch buffer
  attention_backward(L.attn, Gl.attn, c, B, Tq, dx, dattn_in);
  rmsnorm_backward(dx.data(), H, G(Gl.input_norm), dattn_in.data(), c.x_in.data(), H, c.rstd_in.data(),
                   P(L.input_norm), N, H);
  dattn_in.swap(tmp_);
}

}  // namespace dsv3
