#pragma once
// `dsv3 prepare-data`: text or JSONL files -> documents -> token ids -> shards (train_NNNN.bin, val.bin,
// meta.json; format in train/data.h). The tokenizer is passed in as a batch encoder so this file does not
// depend on it.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace dsv3 {

struct PrepareOptions {
  std::string doc_sep = "blank";     // text files: file | blank (blank-line paragraphs) | line | any separator line, e.g. %
  double val_fraction = 0.05;        // documents held out for validation (chosen by the seed)
  int64_t shard_tokens = 100000000;  // tokens per training shard
  uint64_t seed = 0;
  int64_t vocab_size = 0, eos_id = -1, bos_id = -1;
  std::string tokenizer;             // recorded in meta.json so checkpoints can carry the tokenizer files
};

struct PrepareStats {
  int64_t documents = 0, val_documents = 0, train_tokens = 0, val_tokens = 0, shards = 0;
};

// Reads documents: *.jsonl files give one document per line ({"text": ...}); other files are split by doc_sep.
std::vector<std::string> read_documents(const std::vector<std::string>& files, const std::string& doc_sep);

using BatchEncoder = std::function<std::vector<std::vector<int32_t>>(const std::vector<std::string>&)>;
PrepareStats prepare_data(const std::vector<std::string>& files, const std::string& out_dir,
                          const BatchEncoder& encode, const PrepareOptions& opt);

}  // namespace dsv3
