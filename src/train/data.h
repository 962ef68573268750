#pragma once
// Token shards and the training-window loader.
// Shard file (little-endian): 32-byte header {char magic[8] = "DSV3TOK1"; u32 version = 1; u32 vocab_size;
// u64 num_tokens; u64 reserved = 0} then num_tokens u32 token ids. A data directory holds train_NNNN.bin
// shards, val.bin and meta.json ({vocab_size, eos_id, bos_id, tokenizer, documents, train_tokens,
// val_tokens}). Documents are concatenated with an EOS after each one.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"

namespace dsv3 {

constexpr char kShardMagic[8] = {'D', 'S', 'V', '3', 'T', 'O', 'K', '1'};
constexpr uint32_t kShardVersion = 1;

void write_shard(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size);

// A memory-mapped shard; the constructor checks magic, version, size and (once) every id < vocab_size.
class TokenShard {
 public:
  explicit TokenShard(const std::string& path);
  const uint32_t* tokens() const { return tokens_; }
  int64_t size() const { return n_; }
  uint32_t vocab_size() const { return vocab_; }
  uint32_t max_token() const { return max_; }

 private:
  std::shared_ptr<void> map_;
  const uint32_t* tokens_ = nullptr;
  int64_t n_ = 0;
  uint32_t vocab_ = 0, max_ = 0;
};

struct DataMeta {
  int64_t vocab_size = 0, eos_id = -1, bos_id = -1;
  std::string tokenizer;  // directory or file the data was tokenized with ("" if unknown)
};

// Windows of T+1 tokens (inputs = first T, the loss shifts by one inside the model) sampled uniformly from
// the training shards by a seeded RNG whose state is part of the trainer checkpoint.
class DataLoader {
 public:
  DataLoader(const std::string& dir, uint64_t seed);
  const DataMeta& meta() const { return meta_; }
  int64_t train_tokens() const { return train_tokens_; }
  int64_t val_tokens() const { return val_ ? val_->size() : 0; }
  // B windows of T tokens into out [B, T]; a window never crosses a shard boundary.
  void next_batch(int64_t B, int64_t T, int32_t* out);
  // The i-th fixed validation batch (consecutive windows of val.bin); false when val.bin is too short.
  bool val_batch(int64_t i, int64_t B, int64_t T, int32_t* out) const;
  int64_t val_batches(int64_t B, int64_t T) const;
  // Checks every shard's ids against a model's vocabulary (InputError naming the shard).
  void check_vocab(int64_t model_vocab) const;
  Rng& rng() { return rng_; }

 private:
  DataMeta meta_;
  std::string dir_;
  std::vector<std::unique_ptr<TokenShard>> train_;
  std::vector<std::string> train_paths_;
  std::unique_ptr<TokenShard> val_;
  int64_t train_tokens_ = 0;
  Rng rng_;
};

DataMeta read_data_meta(const std::string& dir);

}  // namespace dsv3
