// The training model: embedding -> layers -> final norm -> lm_head -> CE, then the MTP modules, then the
// backward in reverse. The lm_head backward of each stage runs right after its loss, chunk by chunk (so only
// one logits buffer of at most kHeadChunkFloats exists at a time); the remaining backward runs MTP modules
// D..1 (each hands the gradient of its hnorm input to the previous stage), then the main layers.
#include "train/train_model.h"

#include <algorithm>

#include "train/profile.h"

namespace dsv3 {

TrainModel::TrainModel(TrainBackend& be, const ModelConfig& cfg, ModelWeights& params, ModelWeights& grads,
                       TrainMemory mem)
    : be_(be), cfg_(cfg), P_(params), G_(grads), mem_(mem) {
  if (P_.flat.dtype != DType::F32 || G_.flat.dtype != DType::F32) fail("training needs fp32 parameters and gradients");
  if (cfg_.scoring_func != "sigmoid" && cfg_.scoring_func != "softmax")
    fail("training: unknown scoring_func '{}'", cfg_.scoring_func);
  Tensor cos, sin;
  make_rope_tables(cfg_, cfg_.max_position_embeddings, &cos, &sin);
  if (cfg_.has_indexer()) {
    if (!be_.is_host()) fail("training {} models (DSA indexer) is only implemented on the CPU so far", cfg_.model_type);
    dsa_be_ = make_cpu_backend();
    dsa_cos_ = cos;
    dsa_sin_ = sin;
  }
  be_.upload(buf(cos_, cos.numel()), cos.f32(), size_t(cos.numel()) * sizeof(float));
  be_.upload(buf(sin_, sin.numel()), sin.f32(), size_t(sin.numel()) * sizeof(float));
  route_ = RouteParams::from_config(cfg_);
  layers_.resize(cfg_.num_hidden_layers);
  mtp_.resize(cfg_.num_nextn_predict_layers);
  for (auto& L : P_.layers)
    if (L.is_moe) moe_layers_.push_back(L.index);
  for (auto& M : P_.mtp)
    if (M.layer.is_moe) moe_layers_.push_back(M.layer.index);
  reset_load();
}

TrainModel::TrainModel(TrainBackend& be, const ModelConfig& cfg, ModelWeights& params, ModelWeights& grads)
    : TrainModel(be, cfg, params, grads,
                 TrainMemory{params.flat.ptr<float>(), grads.flat.ptr<float>(), params.bias_flat.ptr<float>()}) {
  if (!be.is_host()) fail("internal: TrainModel on a {} backend needs its parameter memory", be.name());
}

void TrainModel::reset_load() {
  load_.assign(moe_layers_.size(), std::vector<int64_t>(cfg_.n_routed_experts, 0));
}

void TrainModel::all_reduce_load(Communicator& comm) {
  for (auto& l : load_) comm.all_reduce_sum(l);
}

const int32_t* TrainModel::upload_ints(TBuf<int32_t>& b, const std::vector<int32_t>& host) {
  int32_t* p = buf(b, int64_t(host.size()));
  be_.upload(p, host.data(), host.size() * sizeof(int32_t));
  return p;
}

double TrainModel::head_loss(const float* hn, const int32_t* targets, int64_t N, double scale, bool backward,
                             float* dhn, int64_t* correct) {
  ProfileScope prof_("head_loss");
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size;
  const int64_t rows = head_chunk_rows_ > 0 ? head_chunk_rows_ : std::max<int64_t>(1, kHeadChunkFloats / V);
  const int64_t chunk = std::min(rows, N);
  float* logits = buf(logits_, chunk * V);  // [chunk, V], overwritten in place by dlogits
  double sum = 0;
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t n = std::min(chunk, N - r0);
    {
      ProfileScope p("head_gemm_fwd");
      be_.linear_forward(logits, hn + r0 * H, P(P_.lm_head), n, V, H);
    }
    {
      ProfileScope p("head_ce");
      sum += be_.cross_entropy_forward_backward(logits, logits, targets + r0, n, V, scale, correct);
    }
    ProfileScope p("head_gemm_bwd");
    if (backward) be_.linear_backward(dhn + r0 * H, false, G(G_.lm_head), logits, hn + r0 * H, P(P_.lm_head), n, V, H);
  }
  return sum;
}

StepStats TrainModel::run(const int32_t* ids_host, int64_t B, int64_t T, const LossOptions& opt, double grad_scale,
                          bool backward) {
  ProfileScope prof_("run");
  const int64_t H = cfg_.hidden_size, N = B * T, V = cfg_.vocab_size;
  const double eps = cfg_.rms_norm_eps;
  if (T < 2) fail("training needs sequences of at least 2 tokens, got {}", T);
  if (T > cfg_.max_position_embeddings)
    fail("sequence length {} exceeds max_position_embeddings = {}", T, cfg_.max_position_embeddings);
  for (int64_t i = 0; i < N; ++i)
    if (ids_host[i] < 0 || ids_host[i] >= V) fail("token id {} is out of range for vocab_size {}", ids_host[i], V);
  StepStats st;
  const int64_t D = opt.mtp && opt.mtp_lambda > 0 ? cfg_.num_nextn_predict_layers : 0;
  const int64_t Dfull = cfg_.num_nextn_predict_layers;
  st.mtp_loss.assign(Dfull, 0.0);
  st.mtp_correct.assign(Dfull, 0);
  st.mtp_count.assign(Dfull, 0);

  // ---- main model forward
  const int32_t* ids = upload_ints(ids_, std::vector<int32_t>(ids_host, ids_host + N));
  float* x = buf(x_, N * H);
  be_.embedding_forward(x, P(P_.embed), ids, N, H);
  size_t moe_row = 0;
  for (size_t l = 0; l < layers_.size(); ++l) {
    layer_forward(P_.layers[l], layers_[l], x_, B, T, opt, grad_scale, moe_row, &st.balance_loss);
    if (P_.layers[l].is_moe) ++moe_row;
  }
  be_.copy(buf(x_final_, N * H), x_.data(), N * H);
  be_.rmsnorm_forward(buf(hn_, N * H), buf(rstd_final_, N), x_final_.data(), H, P(P_.final_norm), N, H, eps);
  std::vector<int32_t> tg(N);  // main targets: the next token, -1 after the last
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) tg[b * T + t] = t + 1 < T ? ids_host[b * T + t + 1] : -1;
  const int32_t* targets = upload_ints(targets_, tg);
  st.main_count = B * (T - 1);
  const double main_scale = grad_scale / double(st.main_count);
  st.loss = head_loss(hn_.data(), targets, N, main_scale, backward, buf(dhn_, N * H), &st.main_correct) /
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
    std::vector<int32_t> tok(Nk), tgt(Nk);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Tk; ++i) {
        tok[b * Tk + i] = ids_host[b * T + i + k];
        tgt[b * Tk + i] = ids_host[b * T + i + k + 1];
      }
    upload_ints(m.tok, tok);
    upload_ints(m.targets, tgt);
    // hp_in [B, Tk, H] = the first Tk rows of each sequence of the previous stage [B, Tprev, H].
    float* hp = buf(m.hp_in, Nk * H);
    be_.copy_2d(hp, Tk * H, hprev, Tprev * H, B, Tk * H, false);
    be_.embedding_forward(buf(m.e, Nk * H), P(P_.embed), m.tok.data(), Nk, H);
    float* en = buf(s_en_, Nk * H);
    float* hpn = buf(s_hpn_, Nk * H);
    be_.rmsnorm_forward(en, buf(m.rstd_e, Nk), m.e.data(), H, P(W.enorm), Nk, H, eps);
    be_.rmsnorm_forward(hpn, buf(m.rstd_h, Nk), hp, H, P(W.hnorm), Nk, H, eps);
    // cat [Nk, 2H] = [enorm(e) | hnorm(h)]: embedding first, as the released weights expect.
    float* cat = buf(m.cat, Nk * 2 * H);
    be_.copy_2d(cat, 2 * H, en, H, Nk, H, false);
    be_.copy_2d(cat + H, 2 * H, hpn, H, Nk, H, false);
    be_.qlinear_forward(buf(m.x_out, Nk * H), cat, P(W.eh_proj), Nk, H, 2 * H);
    layer_forward(W.layer, m.layer, m.x_out, B, Tk, opt, grad_scale, moe_row, &st.balance_loss);
    if (W.layer.is_moe) ++moe_row;
    be_.rmsnorm_forward(buf(m.hn, Nk * H), buf(m.rstd_hn, Nk), m.x_out.data(), H, P(W.head_norm), Nk, H, eps);
    const double scale = grad_scale * opt.mtp_lambda / double(D) / double(Nk);
    st.mtp_count[k - 1] = Nk;
    st.mtp_loss[k - 1] = head_loss(m.hn.data(), m.targets.data(), Nk, scale, backward, buf(m.dhn, Nk * H),
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
  // backward and module k+1's hnorm-input gradient (handed down in dnext_ [B, Tk-1, H]); module 1 adds it
  // to dhn_.
  for (int64_t k = d_run; k >= 1; --k) {
    MtpCache& m = mtp_[k - 1];
    const MtpWeights& W = P_.mtp[k - 1];
    MtpWeights& GW = G_.mtp[k - 1];
    const int64_t Tk = m.Tk, Nk = B * Tk;
    float* dx = zeros(dx_, Nk * H);
    if (k < d_run) {  // rows i < Tn = Tk-1 of each sequence feed module k+1: dx[b, :Tn] = dnext[b]
      const int64_t Tn = Tk - 1;
      be_.copy_2d(dx, Tk * H, dnext_.data(), Tn * H, B, Tn * H, false);
    }
    be_.rmsnorm_backward(dx, H, G(GW.head_norm), m.dhn.data(), m.x_out.data(), H, m.rstd_hn.data(), P(W.head_norm),
                         Nk, H);
    layer_backward(W.layer, GW.layer, m.layer, dx, B, Tk);
    float* dcat = buf(s_dcat_, Nk * 2 * H);
    be_.qlinear_backward(dcat, false, G(GW.eh_proj), dx, m.cat.data(), P(W.eh_proj), Nk, H, 2 * H);
    // Split dcat [Nk, 2H] into its embedding half and its hidden half (the norm backward wants dense rows).
    float* dcat_e = buf(s_dcat_e_, Nk * H);
    float* dcat_h = buf(s_dcat_h_, Nk * H);
    be_.copy_2d(dcat_e, H, dcat, 2 * H, Nk, H, false);
    be_.copy_2d(dcat_h, H, dcat + H, 2 * H, Nk, H, false);
    float* de = zeros(s_de_, Nk * H);
    float* dhp = zeros(s_dhp_, Nk * H);
    be_.rmsnorm_backward(de, H, G(GW.enorm), dcat_e, m.e.data(), H, m.rstd_e.data(), P(W.enorm), Nk, H);
    be_.embedding_backward(G(G_.embed), de, m.tok.data(), Nk, H);
    be_.rmsnorm_backward(dhp, H, G(GW.hnorm), dcat_h, m.hp_in.data(), H, m.rstd_h.data(), P(W.hnorm), Nk, H);
    if (k == 1)  // into the main model's final hidden state hn (after model.norm): dhn[b, :Tk] += dhp[b]
      be_.copy_2d(dhn_.data(), T * H, dhp, Tk * H, B, Tk * H, true);
    else
      std::swap(dnext_, s_dhp_);
  }

  // ---- backward: main model
  float* dx = zeros(dx_, N * H);
  be_.rmsnorm_backward(dx, H, G(G_.final_norm), dhn_.data(), x_final_.data(), H, rstd_final_.data(),
                       P(P_.final_norm), N, H);
  for (int64_t l = int64_t(layers_.size()) - 1; l >= 0; --l)
    layer_backward(P_.layers[l], G_.layers[l], layers_[l], dx, B, T);
  be_.embedding_backward(G(G_.embed), dx, ids, N, H);
  return st;
}

}  // namespace dsv3
