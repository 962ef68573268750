#include "tokenizer/bpe_trainer.h"

#include <algorithm>
#include <filesystem>
#include <queue>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/flat_map.h"
#include "tokenizer/normalizer.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/regex.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_files.h"

namespace dsv3 {
namespace {

struct PairHash {
  size_t operator()(uint64_t k) const { return size_t(mix64(k)); }
};

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

struct Word {
  std::vector<int32_t> syms;
  int64_t count;
  int64_t stamp = -1;  // last merge that rewrote this word (skips duplicate entries in pair_words)
};

}  // namespace

std::vector<std::pair<std::string, std::string>> learn_bpe_merges(
    const std::vector<std::pair<std::string, uint64_t>>& word_counts, size_t max_new_tokens, uint64_t min_frequency) {
  std::vector<std::string> symbols;  // symbol id -> bytes
  std::unordered_map<std::string, int32_t> symbol_id;
  for (int b = 0; b < 256; ++b) {
    symbols.emplace_back(1, char(b));
    symbol_id[symbols.back()] = b;
  }
  std::vector<Word> words;
  words.reserve(word_counts.size());
  for (const auto& [w, c] : word_counts) {
    if (w.size() < 2) continue;  // a single byte has no pairs
    Word word;
    word.count = int64_t(c);
    for (unsigned char b : w) word.syms.push_back(b);
    words.push_back(std::move(word));
  }

  std::unordered_map<uint64_t, int64_t, PairHash> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>, PairHash> pair_words;
  for (size_t wi = 0; wi < words.size(); ++wi) {
    const auto& s = words[wi].syms;
    for (size_t k = 0; k + 1 < s.size(); ++k) {
      const uint64_t key = pair_key(s[k], s[k + 1]);
      pair_count[key] += words[wi].count;
      auto& list = pair_words[key];
      if (list.empty() || list.back() != int32_t(wi)) list.push_back(int32_t(wi));
    }
  }

  // Max-heap on (count, smaller pair first); entries go stale and are re-checked when popped.
  struct Entry {
    int64_t count;
    uint64_t key;
    bool operator<(const Entry& o) const { return count != o.count ? count < o.count : key > o.key; }
  };
  std::priority_queue<Entry> heap;
  for (const auto& [k, c] : pair_count) heap.push({c, k});

  std::vector<std::pair<std::string, std::string>> merges;
  size_t new_tokens = 0;
  std::unordered_map<uint64_t, int64_t, PairHash> delta;
  for (int64_t step = 0; new_tokens < max_new_tokens && !heap.empty(); ++step) {
    const Entry top = heap.top();
    heap.pop();
    auto it = pair_count.find(top.key);
    const int64_t now = it == pair_count.end() ? 0 : it->second;
    if (now != top.count) {
      if (now > 0) heap.push({now, top.key});
      continue;
    }
    if (uint64_t(now) < min_frequency || now <= 0) break;
    const int32_t a = int32_t(top.key >> 32), b = int32_t(top.key & 0xffffffffu);
    std::string merged = symbols[a] + symbols[b];
    int32_t id;
    if (auto f = symbol_id.find(merged); f != symbol_id.end()) {
      id = f->second;  // the same bytes reached by another pair: the merge maps to the existing token
    } else {
      id = int32_t(symbols.size());
      symbols.push_back(merged);
      symbol_id[merged] = id;
      ++new_tokens;
    }
    merges.emplace_back(symbols[a], symbols[b]);

    // Rewrite every word holding (a, b): subtract its old pairs, merge left to right, add its new pairs.
    delta.clear();
    const std::vector<int32_t> holders = std::move(pair_words[top.key]);
    pair_words.erase(top.key);
    for (int32_t wi : holders) {
      Word& w = words[wi];
      if (w.stamp == step) continue;
      w.stamp = step;
      auto& s = w.syms;
      bool found = false;
      for (size_t k = 0; k + 1 < s.size(); ++k) found = found || (s[k] == a && s[k + 1] == b);
      if (!found) continue;
      for (size_t k = 0; k + 1 < s.size(); ++k) delta[pair_key(s[k], s[k + 1])] -= w.count;
      std::vector<int32_t> out;
      out.reserve(s.size());
      for (size_t k = 0; k < s.size(); ++k) {
        if (k + 1 < s.size() && s[k] == a && s[k + 1] == b) {
          out.push_back(id);
          ++k;
        } else {
          out.push_back(s[k]);
        }
      }
      s.swap(out);
      for (size_t k = 0; k + 1 < s.size(); ++k) {
        const uint64_t key = pair_key(s[k], s[k + 1]);
        delta[key] += w.count;
        if (s[k] == id || s[k + 1] == id) {
          auto& list = pair_words[key];
          if (list.empty() || list.back() != wi) list.push_back(wi);
        }
      }
    }
    for (const auto& [key, d] : delta) {
      if (d == 0) continue;
      int64_t& c = pair_count[key];
      c += d;
      if (d > 0) heap.push({c, key});  // decreases are caught lazily when the stale entry surfaces
      if (c <= 0) pair_count.erase(key);
    }
  }
  return merges;
}

namespace {

// The tokens of the template tokenizer that the trained one keeps, in id order: BOS, EOS, then the other
// added tokens tokenizer_config.json names or the chat template mentions.
std::vector<nlohmann::json> kept_added_tokens(const nlohmann::json& tj, const Tokenizer& like) {
  std::vector<nlohmann::json> added;
  if (tj.contains("added_tokens") && tj["added_tokens"].is_array())
    for (const auto& t : tj["added_tokens"]) added.push_back(t);
  auto content_of_id = [&](int32_t id) { return id >= 0 ? like.id_to_token(id).value_or("") : std::string(); };
  const std::string bos = content_of_id(like.bos_id()), eos = content_of_id(like.eos_id());
  std::vector<nlohmann::json> out;
  auto take = [&](const std::string& content) {
    for (const auto& t : added)
      if (t.value("content", "") == content) {
        for (const auto& o : out)
          if (o["content"] == content) return;
        out.push_back(t);
        return;
      }
  };
  if (!bos.empty()) take(bos);
  if (!eos.empty()) take(eos);
  for (const auto& t : added) {
    const std::string c = t.value("content", "");
    if (!c.empty() && like.chat_template().find(c) != std::string::npos) take(c);
  }
  return out;
}

// Splits text at occurrences of the special tokens (they must not be learned as merges).
template <typename F>
void for_each_plain_part(const std::string& text, const std::vector<std::string>& specials, F&& part) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t best = std::string::npos, len = 0;
    for (const auto& s : specials) {
      const size_t p = text.find(s, pos);
      if (p < best || (p == best && s.size() > len)) {
        best = p;
        len = s.size();
      }
    }
    if (best == std::string::npos) {
      part(std::string_view(text).substr(pos));
      return;
    }
    if (best > pos) part(std::string_view(text).substr(pos, best - pos));
    pos = best + len;
  }
}

}  // namespace

BpeTrainerReport train_bpe_tokenizer(const std::vector<std::string>& inputs, const std::string& like,
                                     const std::string& out_dir, const BpeTrainerOptions& opt) {
  const TokenizerFiles files = locate_tokenizer(like);
  const Tokenizer like_tok = Tokenizer::load(like);
  // nlohmann::ordered_json finds keys by linear search, far too slow for a 128k-entry vocabulary, so the
  // template tokenizer is read with the sorted map (field order inside its small parts does not matter).
  nlohmann::json tj;
  nlohmann::ordered_json cfg = nlohmann::ordered_json::object();
  try {
    tj = nlohmann::json::parse(read_text_file(files.tokenizer_json));
    if (!files.config_json.empty()) cfg = nlohmann::ordered_json::parse(read_text_file(files.config_json));
  } catch (const nlohmann::json::parse_error& e) {
    fail("{}: {}", files.tokenizer_json, e.what());
  }
  const auto specials = kept_added_tokens(tj, like_tok);
  const size_t min_vocab = 256 + specials.size();
  if (opt.vocab_size < 0 || size_t(opt.vocab_size) < min_vocab)
    fail("--vocab-size {} is too small: a byte-level BPE needs at least 256 byte tokens + {} special tokens = {}",
         opt.vocab_size, specials.size(), min_vocab);
  if (inputs.empty()) fail("train-tokenizer needs at least one --input file");
  const auto pre = PreTokenizer::from_json(tj.value("pre_tokenizer", nlohmann::json()));
  if (!pre || !pre->byte_level())
    fail("{}: the pre-tokenizer does not end with ByteLevel; train-tokenizer makes byte-level BPE tokenizers", like);
  const auto post = tj.value("post_processor", nlohmann::json());
  if (!post.is_null() && post.value("type", "") != "ByteLevel")
    fail("{}: post_processor {} names fixed ids; train-tokenizer supports ByteLevel or null", like, post.value("type", ""));
  const auto normalizer = make_normalizer(tj.value("normalizer", nlohmann::json()));

  // Count words.
  std::vector<std::string> special_contents;
  for (const auto& t : specials) special_contents.push_back(t["content"].get<std::string>());
  std::unordered_map<std::string, uint64_t> counts;
  BpeTrainerReport report;
  for (const auto& path : inputs) {
    const std::string text = read_text_file(path);
    report.corpus_bytes += text.size();
    for_each_plain_part(text, special_contents, [&](std::string_view part) {
      std::string norm(part);
      if (normalizer) normalizer->normalize(norm);
      pre->split(norm, [&](std::string_view w) { ++counts[std::string(w)]; }, Regex::needs_exact_unicode(norm));
    });
  }
  report.distinct_words = counts.size();
  std::vector<std::pair<std::string, uint64_t>> word_counts(counts.begin(), counts.end());
  std::sort(word_counts.begin(), word_counts.end());  // deterministic order, whatever the hash map did

  const auto merges = learn_bpe_merges(word_counts, size_t(opt.vocab_size) - min_vocab, uint64_t(std::max(opt.min_frequency, 1)));

  // Assemble tokenizer.json: small parts through nlohmann::ordered_json (Hugging Face's field order), the
  // vocabulary and merges written directly in id order.
  auto quoted = [](const std::string& str) { return nlohmann::json(str).dump(); };
  std::string vocab_text, merges_text;
  nlohmann::ordered_json added = nlohmann::ordered_json::array();
  int32_t next = 0;
  auto add_vocab = [&](const std::string& token) {
    vocab_text += (next ? ",\n    " : "\n    ") + quoted(token) + ": " + std::to_string(next);
    ++next;
  };
  for (const auto& t : specials) {
    nlohmann::ordered_json a;  // Hugging Face's field order
    a["id"] = next;
    for (const char* k : {"content", "single_word", "lstrip", "rstrip", "normalized", "special"})
      if (t.contains(k)) a[k] = t[k];
    added.push_back(a);
    add_vocab(t["content"].get<std::string>());
  }
  for (int b = 0; b < 256; ++b) add_vocab(byte_level::byte_char(static_cast<unsigned char>(b)));
  std::unordered_map<std::string, int32_t> merged_ids;
  for (const auto& [l, r] : merges) {
    const std::string ls = byte_level::encode(l), rs = byte_level::encode(r);
    merges_text += (merges_text.empty() ? "\n    " : ",\n    ") + quoted(ls + " " + rs);
    if (merged_ids.emplace(ls + rs, next).second) add_vocab(ls + rs);
  }
  nlohmann::ordered_json head;
  head["version"] = "1.0";
  head["truncation"] = nullptr;
  head["padding"] = nullptr;
  head["added_tokens"] = added;
  head["normalizer"] = nlohmann::ordered_json::parse(tj.value("normalizer", nlohmann::json()).dump());
  head["pre_tokenizer"] = nlohmann::ordered_json::parse(tj["pre_tokenizer"].dump());
  head["post_processor"] = nlohmann::ordered_json::parse(post.dump());
  head["decoder"] = nlohmann::ordered_json::parse(tj.value("decoder", nlohmann::json()).dump());
  std::string json_text = head.dump(2, ' ', false);
  json_text.pop_back();  // reopen the object to append "model"
  while (!json_text.empty() && (json_text.back() == '\n' || json_text.back() == ' ')) json_text.pop_back();
  json_text +=
      ",\n  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": null,\n"
      "    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n    \"fuse_unk\": false,\n"
      "    \"byte_fallback\": false,\n    \"ignore_merges\": false,\n    \"vocab\": {" +
      vocab_text + "\n    },\n    \"merges\": [" + merges_text + "\n    ]\n  }\n}\n";

  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) fail("cannot create {}: {}", out_dir, ec.message());
  const std::string cfg_text = cfg.dump(2, ' ', false) + "\n";
  // Check it loads before writing, so a failed run leaves no half-made tokenizer behind.
  Tokenizer::from_json_text(json_text, cfg_text, out_dir + "/tokenizer.json");
  write_file_atomic(out_dir + "/tokenizer.json", json_text);
  write_file_atomic(out_dir + "/tokenizer_config.json", cfg_text);
  report.merges = merges.size();
  report.vocab_size = size_t(next);
  return report;
}

}  // namespace dsv3
