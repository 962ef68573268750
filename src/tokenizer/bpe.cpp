#include "tokenizer/bpe.h"

#include <algorithm>
#include <atomic>
#include <memory>

#include <fmt/format.h>

#include "core/error.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/utf8.h"

namespace dsv3 {
namespace {

// piece bytes -> ids, one per thread and model, so encode_batch scales without locks. Cleared when full
// (a simple bound; Hugging Face's cache likewise stops at a fixed capacity).
class WordCache {
 public:
  static constexpr size_t kMaxPieceBytes = 256;  // longer pieces are rare and not worth keeping
  static constexpr size_t kMaxEntries = 1 << 17;

  bool get(std::string_view key, uint64_t hash, std::vector<int32_t>& out) const {
    if (slots_.empty()) return false;
    size_t i = hash & (slots_.size() - 1);
    const auto tag = uint32_t(hash >> 32);
    while (slots_[i].key_len >= 0) {
      const Slot& s = slots_[i];
      if (s.tag == tag && size_t(s.key_len) == key.size() &&
          std::memcmp(keys_.data() + s.key_off, key.data(), key.size()) == 0) {
        out.insert(out.end(), ids_.begin() + s.ids_off, ids_.begin() + s.ids_off + s.ids_len);
        return true;
      }
      i = (i + 1) & (slots_.size() - 1);
    }
    return false;
  }

  void put(std::string_view key, uint64_t hash, const int32_t* ids, size_t n) {
    if (key.size() > kMaxPieceBytes) return;
    if (count_ >= kMaxEntries) clear();
    if (slots_.empty()) slots_.assign(kMaxEntries * 2, Slot{});
    size_t i = hash & (slots_.size() - 1);
    while (slots_[i].key_len >= 0) i = (i + 1) & (slots_.size() - 1);
    slots_[i] = Slot{uint32_t(keys_.size()), int32_t(key.size()), uint32_t(ids_.size()), uint32_t(n),
                     uint32_t(hash >> 32)};
    keys_.append(key);
    ids_.insert(ids_.end(), ids, ids + n);
    ++count_;
  }

 private:
  struct Slot {
    uint32_t key_off = 0;
    int32_t key_len = -1;  // -1: empty
    uint32_t ids_off = 0;
    uint32_t ids_len = 0;
    uint32_t tag = 0;  // high hash bits: most probes that miss are rejected without touching the key
  };
  void clear() {
    std::fill(slots_.begin(), slots_.end(), Slot{});
    keys_.clear();
    ids_.clear();
    count_ = 0;
  }
  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t count_ = 0;
};

WordCache& cache_for(uint64_t uid) {
  thread_local std::vector<std::pair<uint64_t, std::unique_ptr<WordCache>>> caches;
  for (auto& [u, c] : caches)
    if (u == uid) return *c;
  if (caches.size() >= 4) caches.erase(caches.begin());  // models come and go rarely; keep a few
  caches.emplace_back(uid, std::make_unique<WordCache>());
  return *caches.back().second;
}

std::atomic<uint64_t> next_uid{1};

struct MergeEntry {
  int32_t rank;
  int32_t pos;
  int32_t new_id;
};
// std heap functions build a max-heap; "greater" puts the lowest (rank, pos) on top.
inline bool later(const MergeEntry& a, const MergeEntry& b) {
  return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
}

}  // namespace

BpeModel::BpeModel(const std::vector<std::pair<std::string, int32_t>>& vocab,
                   const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options)
    : opt_(std::move(options)), uid_(next_uid++) {
  vocab_.reserve(vocab.size());
  int32_t max_id = -1;
  for (const auto& [tok, id] : vocab) {
    if (id < 0) fail("tokenizer.json: model.vocab: token {:?} has negative id {}", tok, id);
    vocab_.insert(tok, id);
    max_id = std::max(max_id, id);
  }
  // Ids index dense per-id tables; a sparse id far past the vocabulary would make them absurdly large.
  if (size_t(max_id) >= vocab.size() + 1000000)
    fail("tokenizer.json: model.vocab has id {} for {} tokens; ids must stay close to the vocabulary size", max_id,
         vocab.size());
  id_to_token_.assign(size_t(max_id + 1), std::string());
  has_id_.assign(size_t(max_id + 1), false);
  for (const auto& [tok, id] : vocab) {
    id_to_token_[id] = tok;
    has_id_[id] = true;
  }
  if (opt_.unk_token && vocab_.find(*opt_.unk_token) < 0)
    fail("tokenizer.json: model.unk_token {:?} is not in model.vocab", *opt_.unk_token);

  merges_.reserve(merges.size());
  const size_t prefix_len = opt_.continuing_subword_prefix.size();
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const int32_t ia = vocab_.find(a), ib = vocab_.find(b);
    if (ia < 0) fail("tokenizer.json: model.merges[{}] ({:?} {:?}): {:?} is not in model.vocab", rank, a, b, a);
    if (ib < 0) fail("tokenizer.json: model.merges[{}] ({:?} {:?}): {:?} is not in model.vocab", rank, a, b, b);
    // With a continuing-subword prefix the right part carries the prefix, which the merged token drops.
    std::string merged = a;
    merged += (prefix_len && b.compare(0, prefix_len, opt_.continuing_subword_prefix) == 0) ? b.substr(prefix_len) : b;
    const int32_t im = vocab_.find(merged);
    if (im < 0)
      fail("tokenizer.json: model.merges[{}] ({:?} {:?}): the merged token {:?} is not in model.vocab", rank, a, b,
           merged);
    merges_.insert_or_assign(ia, ib, {int32_t(rank), im});  // a repeated merge keeps its last rank, as in HF
  }
  byte_ids_.fill(-1);
  set_byte_level_input(false);
}

BpeModel BpeModel::from_json(const nlohmann::json& m) {
  if (!m.is_object()) fail("tokenizer.json: \"model\" must be an object");
  const std::string type = m.value("type", std::string("BPE"));
  if (type != "BPE") fail("tokenizer.json: model type {:?} is not supported (dsv3 reads BPE models)", type);
  if (!m.contains("vocab") || !m["vocab"].is_object())
    fail("tokenizer.json: model.vocab is missing or not an object of token -> id");
  if (!m.contains("merges") || !m["merges"].is_array()) fail("tokenizer.json: model.merges is missing or not an array");
  if (m.contains("dropout") && !m["dropout"].is_null()) {
    if (!m["dropout"].is_number()) fail("tokenizer.json: model.dropout must be a number or null");
    if (m["dropout"].get<double>() != 0.0)
      fail("tokenizer.json: model.dropout {} is not supported (BPE dropout is random; encoding must be exact)",
           m["dropout"].get<double>());
  }
  auto opt_string = [&](const char* key) -> std::optional<std::string> {
    if (!m.contains(key) || m[key].is_null()) return std::nullopt;
    if (!m[key].is_string()) fail("tokenizer.json: model.{} must be a string or null", key);
    return m[key].get<std::string>();
  };
  auto opt_bool = [&](const char* key) {
    if (!m.contains(key) || m[key].is_null()) return false;
    if (!m[key].is_boolean()) fail("tokenizer.json: model.{} must be true or false", key);
    return m[key].get<bool>();
  };
  BpeOptions opt;
  opt.unk_token = opt_string("unk_token");
  opt.continuing_subword_prefix = opt_string("continuing_subword_prefix").value_or("");
  opt.end_of_word_suffix = opt_string("end_of_word_suffix").value_or("");
  opt.fuse_unk = opt_bool("fuse_unk");
  opt.byte_fallback = opt_bool("byte_fallback");
  opt.ignore_merges = opt_bool("ignore_merges");

  std::vector<std::pair<std::string, int32_t>> vocab;
  vocab.reserve(m["vocab"].size());
  for (const auto& [tok, id] : m["vocab"].items()) {
    if (!id.is_number_integer()) fail("tokenizer.json: model.vocab[{:?}] must be an integer id", tok);
    vocab.emplace_back(tok, id.get<int32_t>());
  }
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(m["merges"].size());
  size_t rank = 0;
  for (const auto& e : m["merges"]) {
    // Two spellings exist: "left right" (older files) and ["left", "right"].
    if (e.is_string()) {
      const auto& s = e.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail("tokenizer.json: model.merges[{}] = {:?} is not two tokens separated by one space", rank, s);
      merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
    } else {
      fail("tokenizer.json: model.merges[{}] must be \"left right\" or [\"left\", \"right\"], got {}", rank,
           e.dump().substr(0, 80));
    }
    ++rank;
  }
  return BpeModel(vocab, merges, std::move(opt));
}

void BpeModel::set_byte_level_input(bool on) {
  byte_level_input_ = on;
  bool all = on;
  for (int b = 0; b < 256; ++b) {
    byte_ids_[b] = vocab_.find(byte_level::byte_char(static_cast<unsigned char>(b)));
    all = all && byte_ids_[b] >= 0;
  }
  fast_bytes_ = all && opt_.continuing_subword_prefix.empty() && opt_.end_of_word_suffix.empty();
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || size_t(id) >= id_to_token_.size() || !has_id_[id]) return nullptr;
  return &id_to_token_[id];
}

void BpeModel::initial_symbols(std::string_view piece, std::vector<Symbol>& syms) const {
  syms.clear();
  auto add = [&](int32_t id, int32_t len) {
    const int32_t n = int32_t(syms.size());
    syms.push_back(Symbol{id, n - 1, n + 1, len});
  };
  if (fast_bytes_) {
    for (char c : piece) add(byte_ids_[static_cast<unsigned char>(c)], 1);
  } else {
    // Hugging Face's BPE::merge_word, character by character.
    std::string mapped;
    std::string_view w = piece;
    if (byte_level_input_) {
      mapped = byte_level::encode(piece);
      w = mapped;
    }
    const int32_t unk_id = opt_.unk_token ? vocab_.find(*opt_.unk_token) : -1;
    bool have_unk = false;
    int32_t pending_unk_len = 0;
    std::string s;
    for (size_t i = 0; i < w.size();) {
      size_t len = utf8::valid_seq_len(w, i);
      if (len == 0) len = 1;  // a stray invalid byte is its own character
      const bool first = i == 0, last = i + len == w.size();
      s.assign(first ? "" : opt_.continuing_subword_prefix);
      s.append(w.substr(i, len));
      if (last) s += opt_.end_of_word_suffix;
      const int32_t id = vocab_.find(s);
      if (id >= 0) {
        if (have_unk) add(unk_id, pending_unk_len);
        have_unk = false;
        add(id, int32_t(len));
      } else {
        bool done = false;
        if (opt_.byte_fallback) {
          std::vector<int32_t> ids;
          for (unsigned char b : s) {
            const int32_t bid = vocab_.find(fmt::format("<0x{:02X}>", b));
            if (bid < 0) break;
            ids.push_back(bid);
          }
          if (ids.size() == s.size()) {
            for (int32_t bid : ids) add(bid, 1);
            done = true;
          }
        }
        if (!done && unk_id >= 0) {
          if (have_unk && opt_.fuse_unk) {
            pending_unk_len += int32_t(len);
          } else {
            if (have_unk) add(unk_id, pending_unk_len);
            have_unk = true;
            pending_unk_len = int32_t(len);
          }
        }
        // Without an unk token the character is dropped, as Hugging Face does.
      }
      i += len;
    }
    if (have_unk) add(unk_id, pending_unk_len);
  }
  if (!syms.empty()) syms.back().next = -1;
}

void BpeModel::merge_all(std::vector<Symbol>& syms) const {
  thread_local std::vector<MergeEntry> heap;
  heap.clear();
  for (size_t i = 0; i + 1 < syms.size(); ++i)
    if (const auto* m = merges_.find(syms[i].id, syms[i + 1].id)) heap.push_back({m->rank, int32_t(i), m->new_id});
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const MergeEntry top = heap.back();
    heap.pop_back();
    Symbol& cur = syms[top.pos];
    if (cur.len == 0 || cur.next < 0) continue;
    const int32_t next_pos = cur.next;
    const Symbol right = syms[next_pos];
    // Skip entries made stale by earlier merges (Hugging Face checks the merged id, not the rank).
    const auto* now = merges_.find(cur.id, right.id);
    if (!now || now->new_id != top.new_id) continue;
    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    syms[next_pos].len = 0;
    if (right.next >= 0 && size_t(right.next) < syms.size()) syms[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const auto* m = merges_.find(syms[cur.prev].id, cur.id)) {
        heap.push_back({m->rank, cur.prev, m->new_id});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
    if (cur.next >= 0 && size_t(cur.next) < syms.size()) {
      if (const auto* m = merges_.find(cur.id, syms[cur.next].id)) {
        heap.push_back({m->rank, top.pos, m->new_id});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
  }
}

void BpeModel::encode_uncached(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (opt_.ignore_merges) {
    const int32_t id = byte_level_input_ ? vocab_.find(byte_level::encode(piece)) : vocab_.find(piece);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  thread_local std::vector<Symbol> syms;
  initial_symbols(piece, syms);
  merge_all(syms);
  for (const Symbol& s : syms)
    if (s.len != 0) out.push_back(s.id);
}

void BpeModel::encode(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (piece.size() == 1 && fast_bytes_ && !opt_.ignore_merges) {  // single bytes never merge
    out.push_back(byte_ids_[static_cast<unsigned char>(piece[0])]);
    return;
  }
  WordCache& cache = cache_for(uid_);
  const uint64_t hash = hash_bytes(piece);
  if (cache.get(piece, hash, out)) return;
  const size_t before = out.size();
  encode_uncached(piece, out);
  cache.put(piece, hash, out.data() + before, out.size() - before);
}

}  // namespace dsv3
