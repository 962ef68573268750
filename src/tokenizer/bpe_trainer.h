#pragma once
// Byte-level BPE training: count the pre-tokenized words of a corpus, then repeatedly merge the most
// frequent adjacent pair, updating pair counts incrementally (only the words that contain the merged pair
// are touched), so a 4k vocabulary on megabytes of text takes seconds.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dsv3 {

struct BpeTrainerOptions {
  int vocab_size = 0;     // total, special tokens and the 256 bytes included
  int min_frequency = 2;  // stop when the best pair is rarer than this
};

struct BpeTrainerReport {
  size_t vocab_size = 0;
  size_t merges = 0;
  size_t corpus_bytes = 0;
  size_t distinct_words = 0;
};

// Merges learned from (word bytes, count) pairs: each merge is a pair of byte strings (the byte-level
// spelling is applied when writing). Stops after max_new_tokens distinct new tokens or when the best pair
// count falls below min_frequency. Ties go to the pair of earlier-created symbols (bytes by value first).
std::vector<std::pair<std::string, std::string>> learn_bpe_merges(
    const std::vector<std::pair<std::string, uint64_t>>& word_counts, size_t max_new_tokens, uint64_t min_frequency);

// Trains on the input files and writes tokenizer.json and tokenizer_config.json to out_dir. The layout
// follows the tokenizer `like` (a path or "deepseek-v3"): its normalizer, pre-tokenizer, post-processor,
// decoder and tokenizer_config.json are kept; its BOS and EOS become ids 0 and 1, followed by the other
// added tokens tokenizer_config.json names or the chat template uses; then the 256 bytes; then merges.
// Throws InputError when vocab_size is smaller than 256 + the number of special tokens.
BpeTrainerReport train_bpe_tokenizer(const std::vector<std::string>& inputs, const std::string& like,
                                     const std::string& out_dir, const BpeTrainerOptions& options);

}  // namespace dsv3
