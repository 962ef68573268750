#pragma once
// What the serving engine (engine.h) needs from a model, so one scheduler serves every architecture: the
// limits a request is checked against, a pool of per-sequence caches counted in blocks of tokens (a request
// reserves every block it can need at admission), and one forward over a batch of sequences, each appending
// its new tokens to its own cache.
//   LatentServingModel  DeepSeek-V3 / R1 / V3.2 (Model): the paged latent cache (KvCache), batched forward,
//                       the MTP module for speculative drafts.
//   V4ServingModel      DeepSeek-V4 (V4Model, CPU): one V4Cache per sequence (window rings, compressed entries,
//                       indexer keys), the batch's sequences run one after another; the pool only counts tokens.
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "model/kv_cache.h"
#include "model/model.h"
#include "model/v4_model.h"

namespace dsv3 {

struct ServingLimits {
  int64_t vocab_size = 0, max_positions = 0, hidden_size = 0;
  int32_t eos_token_id = -1;
  bool has_mtp = false;  // MTP drafts (speculative decoding) are available
};

ServingLimits latent_serving_limits(const ModelConfig& c);
ServingLimits v4_serving_limits(const V4Config& c);  // no MTP drafts (V4's MTP block is not loaded)

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
  // MTP module 1 over rows h [T, H] (host) consuming batch's tokens: host logits [T, V]. Only with has_mtp.
  virtual Tensor mtp_logits(std::vector<BatchSeq>& batch, const std::vector<float>& h) = 0;
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

 private:
  V4Model& m_;
  int64_t block_, total_, free_;
  // The sequence's cache, keyed by its SeqCache (which the engine keeps at one address while it runs); a
  // SeqCache's `blocks` only records how many blocks it holds.
  std::unordered_map<const SeqCache*, std::unique_ptr<V4Cache>> caches_;
};

}  // namespace dsv3
