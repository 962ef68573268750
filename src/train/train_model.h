#pragma once
// The training model on the CPU: a full-sequence forward over B sequences of T tokens that saves the
// activations each backward kernel needs, then the backward that adds dL/dtheta into a gradient buffer with
// the parameters' flat layout. Loss:
//   L = CE_main + lambda / D * sum_k CE_k (MTP) + sum_layers L_bal (sequence-wise balance loss, alpha)
// CE_main is the mean cross-entropy of logits[:, :-1] against ids[:, 1:]. MTP module k at row i consumes token
// i+k and the previous stage's hidden state at row i, and predicts token i+k+1 (rows i < T-k-1, all of which
// have a target). Kernels live in ops/cpu/train_ops.h; this file only wires them.
#include <cstdint>
#include <vector>

#include "model/config.h"
#include "model/weights.h"
#include "ops/cpu/train_ops.h"

namespace dsv3 {

struct LossOptions {
  bool mtp = true;             // add the MTP losses (when the model has MTP modules)
  double mtp_lambda = 0.3;     // lambda
  double balance_alpha = 0.0;  // alpha of the sequence-wise balance loss (0: off)
};

struct StepStats {
  double loss = 0;                    // main-model mean CE
  std::vector<double> mtp_loss;       // [D] mean CE_k
  std::vector<int64_t> mtp_correct;   // [D] argmax == target
  std::vector<int64_t> mtp_count;     // [D] rows with a target
  double balance_loss = 0;            // sum over MoE layers
  double total = 0;                   // the objective that was differentiated
  int64_t main_correct = 0, main_count = 0;
};

class TrainModel {
 public:
  // params: fp32 master weights (flat F32, bias_flat holds the selection biases); grads: same layout, F32.
  TrainModel(const ModelConfig& cfg, ModelWeights& params, ModelWeights& grads);

  // Forward and backward over ids [B, T] (row-major): grads += grad_scale * dL/dtheta. With backward false
  // only the losses are computed (evaluation). Expert loads are added to load().
  StepStats run(const int32_t* ids, int64_t B, int64_t T, const LossOptions& opt, double grad_scale, bool backward);

  // Tokens routed to each expert since reset_load(): one row per MoE layer (main layers, then MTP layers).
  const std::vector<std::vector<int64_t>>& load() const { return load_; }
  const std::vector<int64_t>& moe_layers() const { return moe_layers_; }  // hub layer index of each row
  void reset_load();

 private:
  struct Mlp {
    std::vector<float> g, u, act;  // [N, I]
  };
  struct LayerCache {
    std::vector<float> x_in, rstd_in, h1;                    // [N, H], [N], [N, H]
    std::vector<float> qa, rstd_qa, qa_n;                    // [N, qr] (q LoRA only)
    std::vector<float> q, kva, rstd_kv, c, kpe, kv, ao, lse;  // q [N, nh, dn+dr] rotated; kva [N, r+dr] raw
    std::vector<float> x_mid, rstd_post, h2;                 // after attention residual; post-norm output
    Mlp mlp;                                                 // dense FFN or shared experts
    std::vector<float> scores, w, dscores;                   // router: [N, E], [N, K], balance grad [N, E]
    std::vector<int32_t> idx;                                // [N, K]
    cpu::MoeSaved<float> experts;
  };
  struct MtpCache {
    int64_t Tk = 0;
    std::vector<int32_t> tok;                                  // [B*Tk] consumed tokens
    std::vector<float> e, rstd_e, hp_in, rstd_h, cat, x_out;   // hp_in: previous stage rows [B*Tk, H]
    std::vector<float> hn, rstd_hn, dhn;                       // head norm output and its gradient
    LayerCache layer;
  };

  void layer_forward(const LayerWeights& L, LayerCache& c, std::vector<float>& x, int64_t B, int64_t Tq,
                     const LossOptions& opt, double grad_scale, size_t moe_row, double* bal);
  void layer_backward(const LayerWeights& L, LayerWeights& G, LayerCache& c, std::vector<float>& dx, int64_t B,
                      int64_t Tq);
  void attention_forward(const AttnWeights& A, LayerCache& c, int64_t B, int64_t Tq, std::vector<float>& out);
  void attention_backward(const AttnWeights& A, AttnWeights& G, LayerCache& c, int64_t B, int64_t Tq,
                          const std::vector<float>& dout, std::vector<float>& dh);
  void mlp_forward(const MlpWeights& M, Mlp& m, const float* h, int64_t N, float* out);
  void mlp_backward(const MlpWeights& M, MlpWeights& G, Mlp& m, const float* h, int64_t N, const float* dout,
                    float* dh);
  // logits = hn W_lm^T, CE against targets (scale = d objective / d row-loss), and when backward
  // dhn = dlogits W_lm, dW_lm += dlogits^T hn. Returns the summed row loss.
  double head_loss(const float* hn, const int32_t* targets, int64_t N, double scale, bool backward, float* dhn,
                   int64_t* correct);
  void positions(int64_t B, int64_t Tq);

  ModelConfig cfg_;
  ModelWeights& P_;
  ModelWeights& G_;
  RouteParams route_;
  Tensor cos_, sin_;  // RoPE tables [max_pos, dr/2]
  std::vector<int32_t> pos_;
  std::vector<LayerCache> layers_;
  std::vector<MtpCache> mtp_;
  std::vector<float> x_, x_final_, hn_, rstd_final_, dhn_, dx_, tmp_, logits_;
  std::vector<float> s_dh_, s_dq_, s_dkv_, s_dkpe_, s_dc_, s_dkva_, s_dqa_n_, s_dqa_, s_dao_, s_dact_, s_dg_, s_du_,
      s_drl_, s_dw_;
  std::vector<int32_t> targets_;
  std::vector<std::vector<int64_t>> load_;
  std::vector<int64_t> moe_layers_;
};

}  // namespace dsv3
