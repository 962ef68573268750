#include "model/kv_cache.h"

#include "model/config.h"

namespace dsv3 {

KvCache::KvCache(Backend& be, const ModelConfig& cfg, int64_t capacity_tokens, int64_t block_size) {
  spec_.layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers;
  spec_.block_size = block_size;
  spec_.num_blocks = std::max<int64_t>(1, (capacity_tokens + block_size - 1) / block_size);
  spec_.kv_lora_rank = cfg.kv_lora_rank;
  spec_.rope_dim = cfg.qk_rope_head_dim;
  spec_.index_dim = cfg.has_indexer() ? cfg.index_head_dim : 0;  // DSA indexer keys (deepseek_v32)
  pool_ = be.alloc_kv_pool(spec_);
  for (int64_t b = spec_.num_blocks - 1; b >= 0; --b) free_.push_back(int32_t(b));
}

bool KvCache::reserve(SeqCache& s, int64_t tokens) {
  int64_t need = blocks_for(tokens) - int64_t(s.blocks.size());
  if (need <= 0) return true;
  if (need > int64_t(free_.size())) return false;
  for (int64_t i = 0; i < need; ++i) {
    s.blocks.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void KvCache::release(SeqCache& s) {
  for (auto b : s.blocks) free_.push_back(b);
  s.blocks.clear();
  s.len = 0;
}

}  // namespace dsv3
