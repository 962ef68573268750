#pragma once
// What the serving engine (engine.h) needs from a model, so one scheduler serves every architecture: the
// limits a request is checked against, a pool of per-sequence caches counted in blocks of tokens (a request
// reserves every block it can need at admission), and one forward over a batch of sequences, each appending
// its new tokens to its own cache.
// Speculative decoding (the engine's logic, one definition for every model): forward keeps the hidden rows,
// mtp_logits drafts from them on the sequence's MTP cache, a verify step feeds [last, draft] after mark_draft,
// and a rejected draft is taken back with reject_draft.
//   LatentServingModel  DeepSeek-V3 / R1 / V3.2 (Model): the paged latent cache (KvCache), batched forward,
//                       the MTP module for speculative drafts (a rejected draft's row is simply forgotten).
//   V4ServingModel      DeepSeek-V4 (V4Model, CPU): one V4Cache per sequence (window rings, compressed entries,
//                       indexer keys), the batch's sequences in one V4 forward (and one MTP forward); the pool
//                       only counts tokens.
//                       MTP block 0 drafts from the main model's final mHC streams; the V4 cache is not
//                       position-addressed, so a verify step keeps a copy of the cache before it and a rejected
//                       draft restores that copy and runs the kept token again (as v4_generate does).
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "model/kv_cache.h"
#include "model/model.h"
#include "model/v4_model.h"

namespace dsv3 {

struct ServingLimits {
  int64_t vocab_size = 0, max_positions = 0;
  int64_t hidden_row = 0;  // floats per token of ForwardResult::hidden, what mtp_logits reads back (V3:
                           // hidden_size; V4: hc_mult * hidden_size, the final mHC streams)
  int32_t eos_token_id = -1;
  bool has_mtp = false;  // MTP drafts (speculative decoding) are available
};

ServingLimits latent_serving_limits(const ModelConfig& c);
// has_mtp when the model has MTP block 0 (the loader zeroes num_nextn_predict_layers for a checkpoint without mtp.*).
ServingLimits v4_serving_limits(const V4Config& c);

class ServingModel {
 public:
  virtual ~ServingModel() = default;
  virtual ServingLimits limits() const = 0;
  virtual int64_t block_size() const = 0;
  virtual int64_t total_blocks() const = 0;
  virtual int64_t free_blocks() const = 0;
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size() - 1) / block_size(); }
  // Grows s to hold `tokens` positions; false (nothing reserved) when the pool is short.
  virtual bool reserve(SeqCache& s, int64_t tokens) = 0;
  virtual void release(SeqCache& s) = 0;
  // Logits rows as Model::forward gives them (host fp32); hidden on the host [T, H] when opt.keep_hidden.
  virtual ForwardResult forward(std::vector<BatchSeq>& batch, const ForwardOptions& opt) = 0;
  // The first MTP module over rows h [T, hidden_row] (host) consuming batch's tokens, each entry on its own
  // (MTP) cache: host logits [T, V]. Only with has_mtp.
  virtual Tensor mtp_logits(std::vector<BatchSeq>& batch, const std::vector<float>& h) = 0;
  // s's next forward ends in a draft token that reject_draft may take back.
  virtual void mark_draft(SeqCache& s) = 0;
  // After that forward: the cache as if the draft (its last token) had never been fed.
  virtual void reject_draft(SeqCache& s) = 0;
};

class LatentServingModel final : public ServingModel {
 public:
  LatentServingModel(Model& m, int64_t capacity_tokens, int64_t block_size);
  ServingLimits limits() const override;
  int64_t block_size() const override { return cache_.spec().block_size; }
  int64_t total_blocks() const override { return cache_.total_blocks(); }
  int64_t free_blocks() const override { return cache_.free_blocks(); }
  bool reserve(SeqCache& s, int64_t tokens) override { return cache_.reserve(s, tokens); }
  void release(SeqCache& s) override { cache_.release(s); }
  ForwardResult forward(std::vector<BatchSeq>& batch, const ForwardOptions& opt) override;
  Tensor mtp_logits(std::vector<BatchSeq>& batch, const std::vector<float>& h) override;
  void mark_draft(SeqCache&) override {}
  void reject_draft(SeqCache& s) override { s.len -= 1; }  // the row is overwritten later

 private:
  Model& m_;
  KvCache cache_;
};

class V4ServingModel final : public ServingModel {
 public:
  V4ServingModel(V4Model& m, int64_t capacity_tokens, int64_t block_size);
  ServingLimits limits() const override;
  int64_t block_size() const override { return block_; }
  int64_t total_blocks() const override { return total_; }
  int64_t free_blocks() const override { return free_; }
  bool reserve(SeqCache& s, int64_t tokens) override;
  void release(SeqCache& s) override;
  ForwardResult forward(std::vector<BatchSeq>& batch, const ForwardOptions& opt) override;
  Tensor mtp_logits(std::vector<BatchSeq>& batch, const std::vector<float>& h) override;
  void mark_draft(SeqCache& s) override;
  void reject_draft(SeqCache& s) override;

 private:
  V4Cache& cache_of(SeqCache& s);
  V4Model& m_;
  int64_t block_, total_, free_;
  // The sequence's cache, keyed by its SeqCache (which the engine keeps at one address while it runs; a
  // sequence's MTP cache is a SeqCache of its own); a SeqCache's `blocks` only records how many blocks it holds.
  std::unordered_map<const SeqCache*, std::unique_ptr<V4Cache>> caches_;
  // Verify steps: the cache before the step's forward and the tokens to run again when the draft is rejected.
  struct Undo {
    bool armed = false;  // mark_draft called, the forward not run yet
    std::unique_ptr<V4Cache> before;
    std::vector<int32_t> kept;
  };
  std::unordered_map<const SeqCache*, Undo> undo_;
};

}  // namespace dsv3
