#include "train/prepare.h"

#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/rng.h"
#include "io/atomic_file.h"
#include "train/data.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

bool blank(const std::string& s) { return s.find_first_not_of(" \t\r") == std::string::npos; }

void split_text(const std::string& text, const std::string& sep, std::vector<std::string>& out) {
  if (sep == "file") {
    if (!blank(text)) out.push_back(text);
    return;
  }
  std::istringstream in(text);
  std::string line, cur;
  auto flush = [&] {
    if (!blank(cur)) {
      while (!cur.empty() && cur.back() == '\n') cur.pop_back();
      out.push_back(cur);
    }
    cur.clear();
  };
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (sep == "line") {
      cur = line;
      flush();
    } else if (sep == "blank" ? blank(line) : line == sep) {
      flush();
    } else {
      cur += line + "\n";
    }
  }
  flush();
}

}  // namespace

std::vector<std::string> read_documents(const std::vector<std::string>& files, const std::string& doc_sep) {
  std::vector<std::string> docs;
  for (const auto& f : files) {
    if (!fs::is_regular_file(f)) fail("input {} is not a file", f);
    const std::string text = read_file(f);
    if (fs::path(f).extension() == ".jsonl") {
      std::istringstream in(text);
      std::string line;
      int64_t n = 0;
      while (std::getline(in, line)) {
        ++n;
        if (blank(line)) continue;
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          fail("{}:{}: not JSON ({})", f, n, e.what());
        }
        if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
          fail("{}:{}: expected an object with a string field \"text\"", f, n);
        docs.push_back(j["text"].get<std::string>());
      }
    } else {
      split_text(text, doc_sep, docs);
    }
  }
  return docs;
}

PrepareStats prepare_data(const std::vector<std::string>& files, const std::string& out_dir,
                          const BatchEncoder& encode, const PrepareOptions& opt) {
  if (opt.val_fraction < 0 || opt.val_fraction >= 1) fail("--val-fraction must be in [0, 1), got {}", opt.val_fraction);
  if (opt.shard_tokens < 1024) fail("--shard-tokens must be at least 1024, got {}", opt.shard_tokens);
  if (opt.eos_id < 0) fail("the tokenizer has no end-of-sequence token; documents need an EOS between them");
  std::vector<std::string> docs = read_documents(files, opt.doc_sep);
  if (docs.empty()) fail("no documents found in the input files");
  // Validation documents: chosen by the seed; at least one when there are two or more documents.
  Rng rng(opt.seed ^ 0x5eedda7aull);
  std::vector<char> is_val(docs.size(), 0);
  int64_t nval = 0;
  for (size_t i = 0; i < docs.size(); ++i) nval += is_val[i] = rng.uniform() < opt.val_fraction;
  if (opt.val_fraction > 0 && nval == 0 && docs.size() >= 2) is_val[docs.size() - 1] = 1, nval = 1;

  fs::create_directories(out_dir);
  PrepareStats st;
  st.documents = int64_t(docs.size());
  st.val_documents = nval;
  std::vector<uint32_t> train, val;
  auto flush_train = [&](bool force) {
    while (int64_t(train.size()) >= opt.shard_tokens || (force && !train.empty())) {
      const size_t n = std::min<size_t>(train.size(), size_t(opt.shard_tokens));
      std::vector<uint32_t> part(train.begin(), train.begin() + n);
      write_shard((fs::path(out_dir) / fmt::format("train_{:04}.bin", st.shards++)).string(), part, uint32_t(opt.vocab_size));
      st.train_tokens += int64_t(n);
      train.erase(train.begin(), train.begin() + n);
    }
  };
  const size_t batch = 4096;  // documents per encoder call (the encoder spreads them over the cores)
  for (size_t b0 = 0; b0 < docs.size(); b0 += batch) {
    std::vector<std::string> part(docs.begin() + b0, docs.begin() + std::min(docs.size(), b0 + batch));
    auto ids = encode(part);
    for (size_t i = 0; i < part.size(); ++i) {
      auto& dst = is_val[b0 + i] ? val : train;
      for (int32_t t : ids[i]) {
        if (t < 0 || t >= opt.vocab_size) fail("the tokenizer produced id {} outside its vocabulary of {}", t, opt.vocab_size);
        dst.push_back(uint32_t(t));
      }
      dst.push_back(uint32_t(opt.eos_id));
    }
    flush_train(false);
  }
  flush_train(true);
  if (!val.empty()) write_shard((fs::path(out_dir) / "val.bin").string(), val, uint32_t(opt.vocab_size));
  st.val_tokens = int64_t(val.size());
  nlohmann::json meta = {{"format", "dsv3 token shards v1"},     {"vocab_size", opt.vocab_size},
                         {"eos_id", opt.eos_id},                 {"bos_id", opt.bos_id},
                         {"tokenizer", opt.tokenizer},           {"documents", st.documents},
                         {"val_documents", st.val_documents},    {"train_tokens", st.train_tokens},
                         {"val_tokens", st.val_tokens},          {"shards", st.shards},
                         {"doc_sep", opt.doc_sep},               {"seed", opt.seed}};
  write_file_atomic((fs::path(out_dir) / "meta.json").string(), meta.dump(2) + "\n");
  return st;
}

}  // namespace dsv3
