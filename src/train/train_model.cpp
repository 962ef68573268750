// The training model: embedding -> layers -> final norm -> lm_head -> CE, then the MTP modules, then the
// backward in reverse. The lm_head backward of each stage runs right after its loss (so only one logits
// buffer [N, V] exists at a time); the remaining backward runs MTP modules D..1 (each hands the gradient of
// its hnorm input to the previous stage), then the main layers.
#include "train/train_model.h"
#include "train/scratch.h"

#include <algorithm>

#include "ops/cpu/blas.h"
#include "train/profile.h"

namespace dsv3 {

using namespace cpu;


TrainModel::TrainModel(const ModelConfig& cfg, ModelWeights& params, ModelWeights& grads)
    : cfg_(cfg), P_(params), G_(grads) {
  if (P_.flat.dtype != DType::F32 || G_.flat.dtype != DType::F32) fail("training needs fp32 parameters and gradients");
  if (cfg_.scoring_func != "sigmoid" && cfg_.scoring_func != "softmax")
    fail("training: unknown scoring_func '{}'", cfg_.scoring_func);
  make_rope_tables(cfg_, cfg_.max_position_embeddings, &cos_, &sin_);
  route_ = RouteParams::from_config(cfg_);
  layers_.resize(cfg_.num_hidden_layers);
  mtp_.resize(cfg_.num_nextn_predict_layers);
  for (auto& L : P_.layers)
    if (L.is_moe) moe_layers_.push_back(L.index);
  for (auto& M : P_.mtp)
    if (M.layer.is_moe) moe_layers_.push_back(M.layer.index);
  reset_load();
}

void TrainModel::reset_load() {
  load_.assign(moe_layers_.size(), std::vector<int64_t>(cfg_.n_routed_experts, 0));
}

double TrainModel::head_loss(const float* hn, const int32_t* targets, int64_t N, double scale, bool backward,
                             float* dhn, int64_t* correct) {
  ProfileScope prof_("head_loss");
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size;
  float* logits = buf(logits_, N * V);
  {
    ProfileScope p("head_gemm_fwd");
    linear_forward(logits, hn, P(P_.lm_head), N, V, H);
  }
  double sum;
  {
    ProfileScope p("head_ce");
    sum = cross_entropy_forward_backward(logits, logits, targets, N, V, scale, correct);
  }
  ProfileScope p("head_gemm_bwd");
  if (backward) linear_backward(dhn, false, G(G_.lm_head), logits, hn, P(P_.lm_head), N, V, H);
  return sum;
}

StepStats TrainModel::run(const int32_t* ids, int64_t B, int64_t T, const LossOptions& opt, double grad_scale,
                          bool backward) {
  ProfileScope prof_("run");
  const int64_t H = cfg_.hidden_size, N = B * T, V = cfg_.vocab_size;
  const double eps = cfg_.rms_norm_eps;
  if (T < 2) fail("training needs sequences of at least 2 tokens, got {}", T);
  if (T > cfg_.max_position_embeddings)
    fail("sequence length {} exceeds max_position_embeddings = {}", T, cfg_.max_position_embeddings);
  for (int64_t i = 0; i < N; ++i)
    if (ids[i] < 0 || ids[i] >= V) fail("token id {} is out of range for vocab_size {}", ids[i], V);
  StepStats st;
  const int64_t D = opt.mtp && opt.mtp_lambda > 0 ? cfg_.num_nextn_predict_layers : 0;
  const int64_t Dfull = cfg_.num_nextn_predict_layers;
  st.mtp_loss.assign(Dfull, 0.0);
  st.mtp_correct.assign(Dfull, 0);
  st.mtp_count.assign(Dfull, 0);

  // ---- main model forward
  float* x = buf(x_, N * H);
  embedding_forward(x, P(P_.embed), ids, N, H);
  size_t moe_row = 0;
  for (size_t l = 0; l < layers_.size(); ++l) {
    layer_forward(P_.layers[l], layers_[l], x_, B, T, opt, grad_scale, moe_row, &st.balance_loss);
    if (P_.layers[l].is_moe) ++moe_row;
  }
  x_final_ = x_;
  rmsnorm_forward(buf(hn_, N * H), buf(rstd_final_, N), x_final_.data(), H, P(P_.final_norm), N, H, eps);
  buf(targets_, N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) targets_[b * T + t] = t + 1 < T ? ids[b * T + t + 1] : -1;
  st.main_count = B * (T - 1);
  const double main_scale = grad_scale / double(st.main_count);
  st.loss = head_loss(hn_.data(), targets_.data(), N, main_scale, backward, buf(dhn_, N * H), &st.main_correct) /
            double(st.main_count);
  st.total = st.loss + st.balance_loss;

  // ---- MTP modules: module k, rows (b, i) for i < Tk = T-k-1, consumes token i+k, predicts token i+k+1.
  int64_t d_run = 0;
  for (int64_t k = 1; k <= D && T - k - 1 >= 1; ++k, ++d_run) {
    MtpCache& m = mtp_[k - 1];
    const MtpWeights& W = P_.mtp[k - 1];
    const int64_t Tk = T - k - 1, Nk = B * Tk;
    const int64_t Tprev = k == 1 ? T : T - k;
    const float* hprev = k == 1 ? hn_.data() : mtp_[k - 2].x_out.data();
    m.Tk = Tk;
    buf(m.tok, Nk);
    buf(targets_, Nk);
    float* hp = buf(m.hp_in, Nk * H);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Tk; ++i) {
        m.tok[b * Tk + i] = ids[b * T + i + k];
        targets_[b * Tk + i] = ids[b * T + i + k + 1];
        std::copy_n(hprev + (b * Tprev + i) * H, H, hp + (b * Tk + i) * H);
      }
    embedding_forward(buf(m.e, Nk * H), P(P_.embed), m.tok.data(), Nk, H);
    float* cat = buf(m.cat, Nk * 2 * H);
    std::vector<float> en(Nk * H), hpn(Nk * H);
    rmsnorm_forward(en.data(), buf(m.rstd_e, Nk), m.e.data(), H, P(W.enorm), Nk, H, eps);
    rmsnorm_forward(hpn.data(), buf(m.rstd_h, Nk), hp, H, P(W.hnorm), Nk, H, eps);
    for (int64_t t = 0; t < Nk; ++t) {  // embedding first, as the released weights expect
      std::copy_n(en.data() + t * H, H, cat + t * 2 * H);
      std::copy_n(hpn.data() + t * H, H, cat + t * 2 * H + H);
    }
    linear_forward(buf(m.x_out, Nk * H), cat, P(W.eh_proj), Nk, H, 2 * H);
    layer_forward(W.layer, m.layer, m.x_out, B, Tk, opt, grad_scale, moe_row, &st.balance_loss);
    if (W.layer.is_moe) ++moe_row;
    rmsnorm_forward(buf(m.hn, Nk * H), buf(m.rstd_hn, Nk), m.x_out.data(), H, P(W.head_norm), Nk, H, eps);
    const double scale = grad_scale * opt.mtp_lambda / double(D) / double(Nk);
    st.mtp_count[k - 1] = Nk;
    st.mtp_loss[k - 1] = head_loss(m.hn.data(), targets_.data(), Nk, scale, backward, buf(m.dhn, Nk * H),
                                   &st.mtp_correct[k - 1]) / double(Nk);
  }
  if (D > 0) {
    double s = 0;
    for (int64_t k = 0; k < d_run; ++k) s += st.mtp_loss[k];
    st.total = st.loss + opt.mtp_lambda / double(D) * s + st.balance_loss;
  } else {
    st.total = st.loss + st.balance_loss;
  }
  if (!backward) return st;

  // ---- backward: MTP modules D..1. The gradient w.r.t. module k's block output collects its head-norm
  // backward and module k+1's hnorm-input gradient (handed down in `dnext`); module 1 hands it to dhn_.
  std::vector<float> dnext;  // gradient w.r.t. the rows of the stage after the current one, [B*Tk, H]
  for (int64_t k = d_run; k >= 1; --k) {
    MtpCache& m = mtp_[k - 1];
    const MtpWeights& W = P_.mtp[k - 1];
    MtpWeights& GW = G_.mtp[k - 1];
    const int64_t Tk = m.Tk, Nk = B * Tk;
    zero(dx_, Nk * H);
    if (k < d_run) {  // rows i < T-k-2 of this module feed module k+1
      const int64_t Tn = Tk - 1;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < Tn; ++i)
          std::copy_n(dnext.data() + (b * Tn + i) * H, H, dx_.data() + (b * Tk + i) * H);
    }
    rmsnorm_backward(dx_.data(), H, G(GW.head_norm), m.dhn.data(), m.x_out.data(), H, m.rstd_hn.data(),
                     P(W.head_norm), Nk, H);
    layer_backward(W.layer, GW.layer, m.layer, dx_, B, Tk);
    std::vector<float> dcat(Nk * 2 * H);
    linear_backward(dcat.data(), false, G(GW.eh_proj), dx_.data(), m.cat.data(), P(W.eh_proj), Nk, H, 2 * H);
    std::vector<float> de(Nk * H, 0.f), dhp(Nk * H, 0.f);
    std::vector<float> dcat_e(Nk * H), dcat_h(Nk * H);
    for (int64_t t = 0; t < Nk; ++t) {
      std::copy_n(dcat.data() + t * 2 * H, H, dcat_e.data() + t * H);
      std::copy_n(dcat.data() + t * 2 * H + H, H, dcat_h.data() + t * H);
    }
    rmsnorm_backward(de.data(), H, G(GW.enorm), dcat_e.data(), m.e.data(), H, m.rstd_e.data(), P(W.enorm), Nk, H);
    embedding_backward(G(G_.embed), de.data(), m.tok.data(), Nk, H);
    rmsnorm_backward(dhp.data(), H, G(GW.hnorm), dcat_h.data(), m.hp_in.data(), H, m.rstd_h.data(), P(W.hnorm), Nk,
                     H);
    if (k == 1) {  // into the main model's final hidden state hn (after model.norm)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < Tk; ++i) {
          float* d = dhn_.data() + (b * T + i) * H;
          const float* s = dhp.data() + (b * Tk + i) * H;
          for (int64_t j = 0; j < H; ++j) d[j] += s[j];
        }
    } else {
      dnext.swap(dhp);
    }
  }

  // ---- backward: main model
  zero(dx_, N * H);
  rmsnorm_backward(dx_.data(), H, G(G_.final_norm), dhn_.data(), x_final_.data(), H, rstd_final_.data(),
                   P(P_.final_norm), N, H);
  for (int64_t l = int64_t(layers_.size()) - 1; l >= 0; --l) layer_backward(P_.layers[l], G_.layers[l], layers_[l], dx_, B, T);
  embedding_backward(G(G_.embed), dx_.data(), ids, N, H);
  return st;
}

}  // namespace dsv3
