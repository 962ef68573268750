#pragma once
// The BPE model of a tokenizer.json: vocabulary, ranked merges, and the merge loop that turns one
// pre-tokenized piece into token ids exactly as Hugging Face tokenizers' BPE::merge_word does (lowest
// rank first, leftmost first on ties, with its stale-entry rule), plus a per-thread cache of piece -> ids.
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/flat_map.h"

namespace dsv3 {

struct BpeOptions {
  std::optional<std::string> unk_token;
  std::string continuing_subword_prefix;
  std::string end_of_word_suffix;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
};

class BpeModel {
 public:
  // vocab: (token, id) pairs; merges: (left, right) token pairs in rank order. Throws InputError when a
  // merge names a token that is not in the vocabulary (the message names the merge).
  BpeModel(const std::vector<std::pair<std::string, int32_t>>& vocab,
           const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options);
  // Reads tokenizer.json's "model" object (type BPE).
  static BpeModel from_json(const nlohmann::json& model);

  // When set, pieces are raw bytes and each byte stands for its byte-level character (the ByteLevel
  // pre-tokenizer's mapping, done here so no mapped string is ever built on the hot path).
  void set_byte_level_input(bool on);

  // Appends the ids of one pre-tokenized piece. Thread-safe (the cache is per thread).
  void encode(std::string_view piece, std::vector<int32_t>& out) const;
  // The same without the cache (for tests and the trainer's checks).
  void encode_uncached(std::string_view piece, std::vector<int32_t>& out) const;

  int32_t token_to_id(std::string_view token) const { return vocab_.find(token); }
  // nullptr when no token has this id.
  const std::string* id_to_token(int32_t id) const;
  // Number of entries in the vocabulary (Hugging Face's get_vocab_size without added tokens).
  size_t vocab_entries() const { return vocab_.size(); }
  int32_t max_id() const { return int32_t(id_to_token_.size()) - 1; }
  size_t merge_count() const { return merges_.size(); }

 private:
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    int32_t len;  // bytes covered; 0 once merged into its left neighbour
  };
  void initial_symbols(std::string_view piece, std::vector<Symbol>& syms) const;
  void merge_all(std::vector<Symbol>& syms) const;

  StringIdMap vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_id_;
  PairMap merges_;
  BpeOptions opt_;
  bool byte_level_input_ = false;
  bool fast_bytes_ = false;            // byte-level input and every byte has a token: no string work at all
  std::array<int32_t, 256> byte_ids_;  // id of each byte's byte-level character, -1 if absent
  uint64_t uid_;                       // identifies this model's per-thread caches
};

}  // namespace dsv3
