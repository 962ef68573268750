#include "serve/serving_model.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace dsv3 {

LatentServingModel::LatentServingModel(Model& m, int64_t capacity_tokens, int64_t block_size)
    : m_(m), cache_(m.backend(), m.config(), capacity_tokens, block_size) {}

ServingLimits LatentServingModel::limits() const { return latent_serving_limits(m_.config()); }

ServingLimits latent_serving_limits(const ModelConfig& c) {
  ServingLimits l;
  l.vocab_size = c.vocab_size, l.max_positions = c.max_position_embeddings, l.hidden_size = c.hidden_size;
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
  l.vocab_size = c.vocab_size, l.max_positions = c.max_position_embeddings, l.hidden_size = c.hidden_size;
  l.eos_token_id = int32_t(c.eos_token_id);
  l.has_mtp = false;  // V4 drafts with its MTP block in dsv3 generate only; the engine's speculative path is V3's
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
}

ForwardResult V4ServingModel::forward(std::vector<BatchSeq>& batch, const ForwardOptions& opt) {
  DSV3_CHECK(!opt.keep_hidden, "DeepSeek-V4 serving keeps no hidden states (no MTP drafts)");
  const int64_t V = m_.config().vocab_size;
  std::vector<Tensor> parts;
  int64_t rows = 0;
  for (BatchSeq& b : batch) {
    DSV3_CHECK(b.cache && !b.tokens.empty(), "forward: a batch entry without a cache or tokens");
    DSV3_CHECK(b.cache->len + int64_t(b.tokens.size()) <= int64_t(b.cache->blocks.size()) * block_,
               "forward: {} positions beyond the sequence's reserved {}", b.cache->len + int64_t(b.tokens.size()),
               int64_t(b.cache->blocks.size()) * block_);
    auto& c = caches_[b.cache];
    if (!c) c = std::make_unique<V4Cache>(m_.config());
    Tensor l = m_.forward(b.tokens, *c, b.all_logits || opt.all_logits);
    b.cache->len = c->len;
    rows += l.dim(0);
    parts.push_back(std::move(l));
  }
  ForwardResult r;
  r.logits = Tensor::f32_from(std::vector<float>(size_t(rows * V)), {rows, V});
  float* dst = r.logits.f32();
  for (const Tensor& p : parts) {
    std::memcpy(dst, p.f32(), size_t(p.numel()) * sizeof(float));
    dst += p.numel();
  }
  return r;
}

Tensor V4ServingModel::mtp_logits(std::vector<BatchSeq>&, const std::vector<float>&) {
  fail("DeepSeek-V4 serving has no MTP drafts");
}

}  // namespace dsv3
