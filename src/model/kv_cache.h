#pragma once
// The MLA latent cache (plus the DSA indexer keys of deepseek_v32): a pool of fixed-size blocks on the backend's device (see KvPoolSpec) and a block
// allocator. A sequence is a block table plus a length; a long and a short sequence share the pool without
// fragmenting it. One pool slot per main layer and per MTP layer.
#include <cstdint>
#include <vector>

#include "ops/backend.h"

namespace dsv3 {

struct ModelConfig;

struct SeqCache {
  std::vector<int32_t> blocks;
  int64_t len = 0;  // cached positions
};

class KvCache {
 public:
  // Capacity in tokens (rounded up to whole blocks).
  KvCache(Backend& be, const ModelConfig& cfg, int64_t capacity_tokens, int64_t block_size = 64);
  const KvPoolSpec& spec() const { return spec_; }
  Tensor& pool() { return pool_; }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  int64_t total_blocks() const { return spec_.num_blocks; }
  int64_t blocks_for(int64_t tokens) const { return (tokens + spec_.block_size - 1) / spec_.block_size; }
  // Grow a sequence's table to hold `tokens` positions; false (and no change) if the pool is out of blocks.
  bool reserve(SeqCache& s, int64_t tokens);
  void release(SeqCache& s);  // returns its blocks to the pool
  int64_t bytes_per_token() const { return spec_.layers * spec_.row() * 4; }

 private:
  KvPoolSpec spec_;
  Tensor pool_;
  std::vector<int32_t> free_;
};

}  // namespace dsv3
