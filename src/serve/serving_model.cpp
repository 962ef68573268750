#include "serve/serving_model.h"

#include <algorithm>

#include "core/error.h"

namespace dsv3 {

LatentServingModel::LatentServingModel(Model& m, int64_t capacity_tokens, int64_t block_size)
    : m_(m), cache_(m.backend(), m.config(), capacity_tokens, block_size) {}

ServingLimits LatentServingModel::limits() const { return latent_serving_limits(m_.config()); }

ServingLimits latent_serving_limits(const ModelConfig& c) {
  ServingLimits l;
  l.vocab_size = c.vocab_size, l.max_positions = c.max_position_embeddings, l.hidden_row = c.hidden_size;
  l.eos_token_id = int32_t(c.eos_token_id);
  l.has_mtp = c.num_nextn_predict_layers >= 1;
  return l;
}

ForwardResult LatentServingModel::forward(std::vector<BatchSeq>& batch, const ForwardOptions& opt) {
  ForwardResult r = m_.forward(batch, cache_, opt);
  if (opt.keep_hidden) r.hidden = m_.backend().to_host(r.hidden);
  return r;
}

Tensor LatentServingModel::mtp_logits(std::vector<BatchSeq>& batch, const std::vector<float>& h) {
  Backend& be = m_.backend();
  const int64_t H = m_.config().hidden_size;
  Tensor hp = be.upload(Tensor::f32_from(h, {int64_t(h.size()) / H, H}));
  if (hp.dtype != be.act_dtype()) {  // the GPU keeps activations in bf16
    Tensor t = be.alloc(be.act_dtype(), hp.shape, "mtp_h");
    be.copy_cols(t, hp, 0);
    hp = t;
  }
  Tensor logits;
  m_.mtp_forward(1, hp, batch, cache_, &logits);
  return logits;
}

V4ServingModel::V4ServingModel(V4Model& m, int64_t capacity_tokens, int64_t block_size)
    : m_(m), block_(block_size) {
  if (block_size < 1) fail("the cache block size must be >= 1, got {}", block_size);
  if (capacity_tokens < 1) fail("the cache capacity must be >= 1 token, got {}", capacity_tokens);
  total_ = free_ = (capacity_tokens + block_size - 1) / block_size;
}

ServingLimits V4ServingModel::limits() const { return v4_serving_limits(m_.config()); }

ServingLimits v4_serving_limits(const V4Config& c) {
  ServingLimits l;
  l.vocab_size = c.vocab_size, l.max_positions = c.max_position_embeddings;
  l.hidden_row = c.hc_mult * c.hidden_size;  // MTP block 0 reads the main model's final streams [N, d] per token
  l.eos_token_id = int32_t(c.eos_token_id);
  l.has_mtp = c.num_nextn_predict_layers >= 1;
  return l;
}

bool V4ServingModel::reserve(SeqCache& s, int64_t tokens) {
  const int64_t need = blocks_for(tokens) - int64_t(s.blocks.size());
  if (need <= 0) return true;
  if (need > free_) return false;
  s.blocks.resize(s.blocks.size() + size_t(need), -1);
  free_ -= need;
  return true;
}

void V4ServingModel::release(SeqCache& s) {
  free_ += int64_t(s.blocks.size());
  s.blocks.clear();
  s.len = 0;
  caches_.erase(&s);
  undo_.erase(&s);
}

V4Cache& V4ServingModel::cache_of(SeqCache& s) {
  auto& c = caches_[&s];
  if (!c) c = std::make_unique<V4Cache>(m_.config());
  return *c;
}

// Checks that n more positions fit the blocks s reserved.
static void check_reserved(const SeqCache& s, int64_t n, int64_t block) {
  DSV3_CHECK(s.len + n <= int64_t(s.blocks.size()) * block, "forward: {} positions beyond the sequence's reserved {}",
             s.len + n, int64_t(s.blocks.size()) * block);
}

ForwardResult V4ServingModel::forward(std::vector<BatchSeq>& batch, const ForwardOptions& opt) {
  std::vector<V4Seq> seqs;
  seqs.reserve(batch.size());
  for (BatchSeq& b : batch) {
    DSV3_CHECK(b.cache && !b.tokens.empty(), "forward: a batch entry without a cache or tokens");
    check_reserved(*b.cache, int64_t(b.tokens.size()), block_);
    V4Cache& c = cache_of(*b.cache);
    auto u = undo_.find(b.cache);
    if (u != undo_.end() && u->second.armed) {  // a verify step: keep what a rejected draft restores
      DSV3_CHECK(b.tokens.size() >= 2, "forward: a draft step needs the current token and the draft");
      u->second.armed = false;
      u->second.before = std::make_unique<V4Cache>(c);
      u->second.kept.assign(b.tokens.begin(), b.tokens.end() - 1);
    } else if (u != undo_.end()) {
      undo_.erase(u);  // the previous verify step's draft was kept
    }
    seqs.push_back(V4Seq{b.tokens, &c, b.all_logits || opt.all_logits});
  }
  // Every sequence of the step in one V4 forward.
  ForwardResult r;
  Tensor X;
  r.logits = m_.forward(seqs, opt.keep_hidden ? &X : nullptr);
  if (opt.keep_hidden) r.hidden = X.reshape({X.dim(0), X.dim(1) * X.dim(2)});
  for (size_t i = 0; i < batch.size(); ++i) batch[i].cache->len = seqs[i].cache->len;
  return r;
}

Tensor V4ServingModel::mtp_logits(std::vector<BatchSeq>& batch, const std::vector<float>& h) {
  const V4Config& cfg = m_.config();
  DSV3_CHECK(m_.mtp_depth() >= 1, "DeepSeek-V4 serving: this model has no MTP block");
  const int64_t N = cfg.hc_mult, d = cfg.hidden_size;
  std::vector<V4Seq> seqs;
  int64_t T = 0;
  for (BatchSeq& b : batch) {
    DSV3_CHECK(b.cache && !b.tokens.empty(), "mtp_logits: a batch entry without a cache or tokens");
    check_reserved(*b.cache, int64_t(b.tokens.size()), block_);
    seqs.push_back(V4Seq{b.tokens, &cache_of(*b.cache), true});  // only its MTP block state is used
    T += int64_t(b.tokens.size());
  }
  DSV3_CHECK(h.size() == size_t(T * N * d), "mtp_logits: {} hidden values for {} rows", h.size(), T);
  // Every sequence's rows through MTP block 0 in one forward.
  Tensor logits = m_.mtp_forward(0, Tensor::f32_from(h, {T, N, d}), seqs);
  for (size_t i = 0; i < batch.size(); ++i) batch[i].cache->len = seqs[i].cache->mtp_len[0];
  return logits;
}

void V4ServingModel::mark_draft(SeqCache& s) { undo_[&s].armed = true; }

void V4ServingModel::reject_draft(SeqCache& s) {
  auto u = undo_.find(&s);
  DSV3_CHECK(u != undo_.end() && u->second.before, "reject_draft: the sequence's last forward was no draft step");
  V4Cache& c = cache_of(s);
  c = std::move(*u->second.before);
  m_.forward(u->second.kept, c);  // the current token again, without the draft
  s.len = c.len;
  undo_.erase(u);
}

}  // namespace dsv3
