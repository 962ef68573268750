#pragma once
// The DeepSeek-V3 model, read top to bottom: embedding -> decoder layers (MLA attention, dense or MoE FFN)
// -> final norm -> lm_head, plus the MTP modules. All compute goes through the Backend interface; this file
// has no device-specific code. Forward runs a batch of sequences, each appending `len` new tokens to its
// latent cache: a prompt (prefill), one token (decode, absorbed MLA), or a mix, in one pass.
#include <memory>
#include <vector>

#include "dist/communicator.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace dsv3 {

struct BatchSeq {
  SeqCache* cache = nullptr;      // positions [cache->len, cache->len + tokens.size()) are computed and cached
  std::vector<int32_t> tokens;    // new tokens
  bool all_logits = false;        // logits for each of its tokens (else only the last)
};

struct ForwardOptions {
  bool absorb_decode = true;      // single-token sequences use the absorbed latent path
  bool all_logits = false;        // logits for every new token (else the last of each sequence)
  bool keep_hidden = false;       // keep the final-normed hidden states [T, H] (MTP needs them)
};

// Logits rows follow the batch order: for each BatchSeq, its last token (all its tokens with all_logits).
struct ForwardResult {
  Tensor logits;                  // host fp32 [rows, V]
  Tensor hidden;                  // device [T, H] in batch order (every token) when keep_hidden
};

class Model {
 public:
  Model(ModelConfig cfg, ModelWeights w, Backend& be);
  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }
  Backend& backend() { return be_; }

  // Validates ids and lengths (InputError), reserves cache blocks (InputError if full), runs the layers.
  ForwardResult forward(std::vector<BatchSeq>& batch, KvCache& cache, const ForwardOptions& opt = {});

  // MTP module k (1-based) over a batch: h_prev [T, H] hidden states in batch order (sequence by sequence,
  // token by token), tokens t_{i+k} (the token each row consumes), caches/positions as in forward (pool slot
  // num_hidden_layers + k - 1). Returns the module's block output [T, H] in batch order and logits for every
  // token in batch order (host) when logits_out is given.
  Tensor mtp_forward(int64_t k, const Tensor& h_prev, std::vector<BatchSeq>& batch, KvCache& cache,
                     Tensor* logits_out);

  int64_t total_params() const;       // main model (without MTP)
  int64_t active_params() const;      // per token: attention, dense, shared + top-k experts, embed row, head
  int64_t mtp_params() const;

  // Expert-parallel inference (dist/: every rank of comm runs this same forward on the same tokens, with the
  // weights of its own slice of each MoE layer's experts, loaded by open_model; CPU backend). Each rank
  // computes its experts' share of every token and the shares are summed with one all-reduce per MoE layer.
  void set_expert_parallel(Communicator* comm);
  // Serving over ranks (model_mirror.cpp): rank 0, the leader, runs the scheduler; before each forward and
  // MTP pass it broadcasts the pass (block tables, lengths, tokens, options, MTP inputs) and the other ranks,
  // in follow(), replay it on their own cache, so every rank takes part in the pass's collectives.
  void set_leader(Communicator* comm) { leader_ = comm && comm->size() > 1 ? comm : nullptr; }
  void stop_followers();                       // leader: ends the followers' follow()
  void follow(Communicator& comm, KvCache& cache);  // followers: replay until the leader stops

 private:
  struct Step;  // per-forward scratch: positions, sequence slices
  void layer_forward(const LayerWeights& L, Tensor& x, Step& st, KvCache& cache, int64_t slot);
  Tensor attention(const AttnWeights& A, const Tensor& h, Step& st, KvCache& cache, int64_t slot);
  Tensor mlp(const MlpWeights& M, const Tensor& h);
  Tensor moe(const MoeWeights& M, const Tensor& h);
  Tensor moe_expert_parallel(const MoeWeights& M, const Tensor& h, const Tensor& idx, const Tensor& wts, Tensor& out);
  Tensor hidden_states(Step& st, KvCache& cache);  // embedding, layers, final norm: [T, H] in row order
  Tensor logits_for(const Tensor& hidden_normed, const std::vector<int64_t>& rows);  // device fp32 [rows, V]
  Tensor in_batch_order(const Tensor& x, const Step& st);
  Step prepare(std::vector<BatchSeq>& batch, KvCache& cache, bool absorb);

  ModelConfig cfg_;
  ModelWeights w_;
  Backend& be_;
  Tensor rope_cos_, rope_sin_;
  RouteParams route_;
  Communicator* ep_ = nullptr;
  Communicator* leader_ = nullptr;
  void announce(int64_t op, const std::vector<BatchSeq>& batch, const ForwardOptions& opt, int64_t k,
                const Tensor* h_prev, bool want_logits);
};

}  // namespace dsv3
