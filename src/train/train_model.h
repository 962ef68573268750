#pragma once
// The training model: a full-sequence forward over B sequences of T tokens that saves the activations each
// backward op needs, then the backward that adds dL/dtheta into a gradient buffer with the parameters' flat
// layout. Loss:
//   L = CE_main + lambda / D * sum_k CE_k (MTP) + sum_layers L_bal (sequence-wise balance loss, alpha)
// CE_main is the mean cross-entropy of logits[:, :-1] against ids[:, 1:]. MTP module k at row i consumes token
// i+k and the previous stage's hidden state at row i, and predicts token i+k+1 (rows i < T-k-1, all of which
// have a target). Every computation runs through a TrainBackend (ops/train_backend.h); this file only wires
// the ops, and host code never touches backend memory.
#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "dist/expert_parallel.h"
#include "model/config.h"
#include "model/weights.h"
#include "ops/train_backend.h"

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

// Parameters, gradients and selection biases in the backend's memory, laid out as the host ModelWeights'
// flat buffers (params.flat, grads.flat, params.bias_flat). On a host backend: those host buffers.
struct TrainMemory {
  const float* params = nullptr;  // [num_params]
  float* grads = nullptr;         // [num_params]
  const float* biases = nullptr;  // [num_bias]
};

class TrainModel {
 public:
  // params/grads: host fp32 ModelWeights that give the layout (their Tensor views locate each parameter);
  // mem: the same layout in backend memory, where the ops read and write.
  TrainModel(TrainBackend& be, const ModelConfig& cfg, ModelWeights& params, ModelWeights& grads, TrainMemory mem);
  // Host backends only: the backend works on params/grads themselves.
  TrainModel(TrainBackend& be, const ModelConfig& cfg, ModelWeights& params, ModelWeights& grads);

  // Forward and backward over host ids [B, T] (row-major): grads += grad_scale * dL/dtheta. With backward
  // false only the losses are computed (evaluation). Expert loads are added to load().
  StepStats run(const int32_t* ids, int64_t B, int64_t T, const LossOptions& opt, double grad_scale, bool backward);

  // Tokens routed to each expert since reset_load(): one row per MoE layer (main layers, then MTP layers).
  const std::vector<std::vector<int64_t>>& load() const { return load_; }
  const std::vector<int64_t>& moe_layers() const { return moe_layers_; }  // hub layer index of each row
  void reset_load();
  // load() = the sum of every rank's load() (collective over comm): the global expert counts.
  void all_reduce_load(Communicator& comm);
  // Rows of lm_head logits computed at a time (default: as many as fit in kHeadChunkFloats); for tests.
  void set_head_chunk_rows(int64_t rows) { head_chunk_rows_ = rows; }
  // Expert parallelism (dist/expert_parallel.h): the layout holds a slice of each MoE layer's experts and
  // routed-expert work is exchanged with the other ranks of the group. Null (the default): all local.
  void set_expert_parallel(ExpertParallel* ep) { ep_ = ep; }
  static constexpr int64_t kHeadChunkFloats = int64_t(64) << 20;  // 256 MB of fp32 logits

 private:
  struct Mlp {
    TBuf<float> g, u, act;  // [N, I]
  };
  struct LayerCache {
    TBuf<float> x_in, rstd_in, h1;                    // [N, H], [N], [N, H]
    TBuf<float> qa, rstd_qa, qa_n;                    // [N, qr] (q LoRA only)
    TBuf<float> q, kva, rstd_kv, c, kpe, kv, ao, lse;  // q [N, nh, dn+dr] rotated; kva [N, r+dr] raw
    TBuf<float> x_mid, rstd_post, h2;                 // after attention residual; post-norm output
    Mlp mlp;                                          // dense FFN or shared experts
    TBuf<float> scores, w, dscores;                   // router: [N, E], [N, K], balance grad [N, E]
    TBuf<int32_t> idx;                                // [N, K]
    std::unique_ptr<MoeSavedState> experts;
    std::vector<int32_t> sel;                         // DeepSeek-V3.2 DSA selection [N, index_topk] (host)
  };
  struct MtpCache {
    int64_t Tk = 0;
    TBuf<int32_t> tok, targets;                          // [B*Tk] consumed tokens, predicted tokens
    TBuf<float> e, rstd_e, hp_in, rstd_h, cat, x_out;    // hp_in: previous stage rows [B*Tk, H]; cat [B*Tk, 2H]
    TBuf<float> hn, rstd_hn, dhn;                        // head norm output and its gradient
    LayerCache layer;
  };

  // Backend pointers of a parameter (a view of params), a gradient (a view of grads) and a selection bias.
  const float* P(const Tensor& t) const { return mem_.params + (t.ptr<float>() - P_.flat.ptr<float>()); }
  float* G(Tensor& t) { return mem_.grads + (t.ptr<float>() - G_.flat.ptr<float>()); }
  const float* Bias(const Tensor& t) const { return mem_.biases + (t.ptr<float>() - P_.bias_flat.ptr<float>()); }
  // Binds a scratch buffer to the backend and sizes it to n elements (contents undefined).
  template <typename T>
  T* buf(TBuf<T>& b, int64_t n) {
    b.bind(&be_);
    return b.resize(size_t(n));
  }
  float* zeros(TBuf<float>& b, int64_t n) {
    float* p = buf(b, n);
    be_.fill(p, 0.f, n);
    return p;
  }
  const int32_t* upload_ints(TBuf<int32_t>& b, const std::vector<int32_t>& host);

  void layer_forward(const LayerWeights& L, LayerCache& c, TBuf<float>& x, int64_t B, int64_t Tq,
                     const LossOptions& opt, double grad_scale, size_t moe_row, double* bal);
  void layer_backward(const LayerWeights& L, LayerWeights& G, LayerCache& c, float* dx, int64_t B, int64_t Tq);
  void attention_forward(const AttnWeights& A, LayerCache& c, int64_t B, int64_t Tq, float* out);
  void attention_backward(const AttnWeights& A, AttnWeights& G, LayerCache& c, int64_t B, int64_t Tq,
                          const float* dout, float* dh);
  void mlp_forward(const MlpWeights& M, Mlp& m, const float* h, int64_t N, float* out);
  void mlp_backward(const MlpWeights& M, MlpWeights& G, Mlp& m, const float* h, int64_t N, const float* dout,
                    float* dh);
  // logits = hn W_lm^T, CE against targets (scale = d objective / d row-loss), and when backward
  // dhn = dlogits W_lm, dW_lm += dlogits^T hn, in row chunks of at most head_chunk_rows. Returns the summed
  // row loss.
  double head_loss(const float* hn, const int32_t* targets, int64_t N, double scale, bool backward, float* dhn,
                   int64_t* correct);
  const int32_t* positions(int64_t B, int64_t Tq);  // [B*Tq] = t, backend memory, cached per shape
  // DeepSeek-V3.2: the indexer's top-k selection for the layer's input (c.h1, c.qa_n) into c.sel, with the
  // inference code (model/v32_indexer.h) on a CPU backend over the host parameters: no gradient flows through
  // it (transformers runs the indexer under no_grad).
  void dsa_select(const AttnWeights& A, LayerCache& c, int64_t B, int64_t Tq);

  TrainBackend& be_;
  ModelConfig cfg_;
  ModelWeights& P_;
  ModelWeights& G_;
  TrainMemory mem_;
  RouteParams route_;
  TBuf<float> cos_, sin_;  // RoPE tables [max_pos, dr/2]
  std::unique_ptr<Backend> dsa_be_;  // DeepSeek-V3.2 only: runs the indexer
  Tensor dsa_cos_, dsa_sin_;
  std::map<std::pair<int64_t, int64_t>, TBuf<int32_t>> pos_;
  std::vector<LayerCache> layers_;
  std::vector<MtpCache> mtp_;
  int64_t head_chunk_rows_ = 0;  // 0: from kHeadChunkFloats
  TBuf<int32_t> ids_, targets_;
  TBuf<float> x_, x_final_, hn_, rstd_final_, dhn_, dx_, tmp_, logits_, dnext_;
  TBuf<float> s_dh_, s_dq_, s_dkv_, s_dkpe_, s_dc_, s_dkva_, s_dqa_n_, s_dqa_, s_dao_, s_dact_, s_dg_, s_du_, s_drl_,
      s_dw_, s_en_, s_hpn_, s_dcat_, s_dcat_e_, s_dcat_h_, s_de_, s_dhp_;
  std::vector<std::vector<int64_t>> load_;
  std::vector<int64_t> moe_layers_;
  ExpertParallel* ep_ = nullptr;
};

}  // namespace dsv3
