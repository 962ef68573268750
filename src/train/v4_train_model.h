#pragma once
// The DeepSeek-V4 training model (host, CPU): the full-sequence forward of B sequences of T tokens (positions
// 0..T-1, as transformers trains without a cache) that saves what each backward needs, the causal-LM loss
// (mean cross-entropy of logits[:, :-1] against ids[:, 1:]) and the backward that adds dL/dtheta into a
// gradient buffer with V4Weights' flat layout (release names, make_v4_param_layout order).
// The token-level V4 math (mHC weights and Sinkhorn, collapse / expand, sink attention, compressor pooling,
// clamped SwiGLU, sqrtsoftplus routing) is model/v4_kernels.h, the functions the inference forward runs; the
// products, norms, rope, embedding and loss are the CPU training kernels (ops/cpu/train_ops.h). Templated on the
// float type: float trains, double is the finite-difference oracle of the tests.
// What gets no gradient, as in transformers: the lightning indexer (its output is the top-k entry indices of a
// CSA layer, a constant of the step: every attn.indexer.* gradient stays 0), the selection biases ffn.gate.bias
// and the hash tables tid2eid (buffers). Top-k selections (experts, entries) and masks are constants.
#include <cstdint>
#include <memory>
#include <vector>

#include "model/v4_model.h"
#include "model/v4_weights.h"

namespace dsv3 {

struct V4StepStats {
  double loss = 0;         // mean CE over the rows with a target
  int64_t count = 0;       // rows with a target: B (T - 1)
  int64_t correct = 0;     // argmax == target
  double balance_loss = 0; // the sequence-wise balance loss, summed over the moe layers, mean over sequences
  double total = 0;        // loss + balance_loss + mtp_lambda / D * sum of mtp_loss (what the gradient differentiates)
  std::vector<double> mtp_loss;       // per MTP block run: mean CE of its rows predicting token i + k + 2
  std::vector<int64_t> mtp_count, mtp_correct;
};

template <typename T>
class V4TrainModel {
 public:
  // w: the model (config, layout, hash tables, selection biases, and the fp32 parameters the indexer reads);
  // params / grads: [num_params] in w.layout order (params may alias w.flat when T is float). The indexer always
  // runs on w.flat (it has no gradient, so a perturbation of params elsewhere reaches it only through its inputs).
  V4TrainModel(const V4Weights& w, const T* params, T* grads);
  ~V4TrainModel();
  // ids [B, Tn] row-major. grads += grad_scale * dL/dtheta when backward (L = CE + balance loss, + the MTP term).
  // Expert loads add to load().
  // mtp_lambda > 0: the MTP blocks run too and L = main + mtp_lambda / D * sum_k (mean CE of block k), as V3 trains
  // them; block k reads the previous stage's final streams (block 0: the main model's, before hc_head) and the
  // embedding of the next token, and its gradient reaches the main model through those streams and the shared
  // embedding and head.
  V4StepStats run(const int32_t* ids, int64_t B, int64_t Tn, double grad_scale, bool backward, double mtp_lambda = 0);

  // Tokens routed to each expert since reset_load(), one row per `moe` block (main layers, then MTP blocks; hash
  // layers have no bias to steer). Block ids as V4Config::block_prefix numbers them.
  const std::vector<std::vector<int64_t>>& load() const { return load_; }
  const std::vector<int64_t>& moe_layers() const { return moe_layers_; }
  void reset_load();
  // alpha of the sequence-wise balance loss of the `moe` layers (0: off; hash_moe layers never have one), as the
  // V3 trainer's: per sequence of T tokens L_bal = alpha sum_i f_i P_i, f_i = E/(K T) #{t: i in TopK(t)} (a
  // constant), P_i = 1/T sum_t s_it / sum_j s_jt with s the unbiased sqrtsoftplus scores normalized over all E
  // experts (the V3 formula the V4 report cites; not over the K selected, not the biased selection scores).
  void set_balance_alpha(double alpha);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<std::vector<int64_t>> load_;
  std::vector<int64_t> moe_layers_;
};

extern template class V4TrainModel<float>;
extern template class V4TrainModel<double>;

}  // namespace dsv3
