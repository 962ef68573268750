#include "tokenizer/added_vocab.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "tokenizer/bpe.h"
#include "tokenizer/normalizer.h"
#include "tokenizer/regex.h"
#include "tokenizer/utf8.h"

namespace dsv3 {

AddedVocabulary::AddedVocabulary() = default;
AddedVocabulary::~AddedVocabulary() = default;
AddedVocabulary::AddedVocabulary(AddedVocabulary&&) noexcept = default;

void AddedVocabulary::Trie::add(std::string_view s, int32_t id) {
  int32_t node = 0;
  for (unsigned char c : s) {
    int32_t child = -1;
    for (const auto& [b, n] : nodes[node].next)
      if (b == c) child = n;
    if (child < 0) {
      child = int32_t(nodes.size());
      nodes[node].next.emplace_back(c, child);
      nodes.push_back(Node{});
    }
    node = child;
  }
  if (nodes[node].pattern < 0) {  // the first of two identical patterns wins, as in Aho-Corasick
    nodes[node].pattern = int32_t(patterns.size());
    patterns.push_back(id);
  }
  first_byte[static_cast<unsigned char>(s[0])] = true;
  int distinct = 0, last = -1;
  for (int b = 0; b < 256; ++b)
    if (first_byte[b]) {
      ++distinct;
      last = b;
    }
  single_first_byte = distinct == 1 ? last : -1;
}

size_t AddedVocabulary::Trie::longest_at(std::string_view text, size_t pos, int32_t& id) const {
  size_t best = 0;
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    int32_t child = -1;
    for (const auto& [b, n] : nodes[node].next)
      if (b == c) {
        child = n;
        break;
      }
    if (child < 0) break;
    node = child;
    if (nodes[node].pattern >= 0) {
      best = i + 1 - pos;
      id = patterns[nodes[node].pattern];
    }
  }
  return best;
}

void AddedVocabulary::load(const nlohmann::json& list, const BpeModel& model, const Normalizer* normalizer) {
  if (list.is_null()) return;
  if (!list.is_array()) fail("tokenizer.json: \"added_tokens\" must be an array");
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& j = list[i];
    const std::string where = fmt::format("added_tokens[{}]", i);
    if (!j.is_object() || !j.contains("content") || !j["content"].is_string())
      fail("tokenizer.json: {} must be an object with a string \"content\"", where);
    AddedToken t;
    t.content = j["content"].get<std::string>();
    auto flag = [&](const char* key, bool dflt) {
      if (!j.contains(key) || j[key].is_null()) return dflt;
      if (!j[key].is_boolean()) fail("tokenizer.json: {}.{} must be true or false", where, key);
      return j[key].get<bool>();
    };
    t.special = flag("special", false);
    t.normalized = flag("normalized", !t.special);
    t.lstrip = flag("lstrip", false);
    t.rstrip = flag("rstrip", false);
    t.single_word = flag("single_word", false);
    add(t, model);
  }
  // Build the matchers: special tokens first, then the others, each set in file order.
  for (const auto* group : {&special_tokens_, &plain_tokens_}) {
    for (const AddedToken& t : *group) {
      const int32_t id = find(t.content);
      if (!t.normalized) {
        tries_[0].add(t.content, id);
      } else {
        std::string pattern = t.content;
        if (normalizer) normalizer->normalize(pattern);
        if (!pattern.empty()) tries_[1].add(pattern, id);
      }
      if (t.single_word && !word_char_)
        word_char_ = std::make_unique<Regex>("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]", "word characters");
    }
  }
}

void AddedVocabulary::add(const AddedToken& t0, const BpeModel& model) {
  if (t0.special && !t0.content.empty() && !special_contents_.count(t0.content)) {
    special_tokens_.push_back(t0);
    special_contents_.insert(t0.content);
  }
  if (t0.content.empty()) return;
  auto same = [&](const AddedToken& a) {
    return a.content == t0.content && a.special == t0.special && a.normalized == t0.normalized &&
           a.lstrip == t0.lstrip && a.rstrip == t0.rstrip && a.single_word == t0.single_word;
  };
  for (const auto& [id, tok] : by_id_)
    if (same(tok)) return;
  int32_t id = find(t0.content);
  if (id < 0) id = model.token_to_id(t0.content);
  if (id < 0) {
    const auto vocab_size = int32_t(model.vocab_entries());
    const int32_t max = max_id();
    id = by_content_.empty() ? vocab_size : ((max >= vocab_size || vocab_size == 0) ? max + 1 : vocab_size);
  }
  AddedToken t = t0;
  t.id = id;
  by_content_[t.content] = id;
  by_id_[id] = t;
  if (!special_contents_.count(t.content)) plain_tokens_.push_back(t);
}

int32_t AddedVocabulary::find(std::string_view content) const {
  auto it = by_content_.find(std::string(content));
  return it == by_content_.end() ? -1 : it->second;
}

const AddedToken* AddedVocabulary::by_id(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &it->second;
}

int32_t AddedVocabulary::max_id() const {
  int32_t m = -1;
  for (const auto& [c, id] : by_content_) m = std::max(m, id);
  return m;
}

bool AddedVocabulary::word_char_before(std::string_view text, size_t pos) const {
  if (pos == 0) return false;
  size_t s = pos - 1;
  while (s > 0 && (static_cast<unsigned char>(text[s]) & 0xC0) == 0x80 && pos - s < 4) --s;
  size_t b = 0, e = 0;
  return word_char_->search(text.substr(s, pos - s), 0, b, e) && e == pos - s;
}

bool AddedVocabulary::word_char_after(std::string_view text, size_t pos) const {
  if (pos >= text.size()) return false;
  size_t len = utf8::valid_seq_len(text, pos);
  if (len == 0) return false;
  size_t b = 0, e = 0;
  return word_char_->search(text.substr(pos, len), 0, b, e) && b == 0;
}

void AddedVocabulary::split(std::string_view text, bool normalized_set,
                            FunctionRef<void(std::string_view, int32_t)> on_piece) const {
  const Trie& trie = tries_[normalized_set ? 1 : 0];
  if (trie.patterns.empty()) {
    if (!text.empty()) on_piece(text, -1);
    return;
  }
  size_t emitted = 0;  // end of what has been handed out
  size_t pos = 0;      // where the next search starts
  while (pos < text.size()) {
    if (trie.single_first_byte >= 0) {  // the usual case ("<" for DeepSeek-V3): let memchr skip ahead
      const void* hit = std::memchr(text.data() + pos, trie.single_first_byte, text.size() - pos);
      if (!hit) break;
      pos = size_t(static_cast<const char*>(hit) - text.data());
    } else if (!trie.first_byte[static_cast<unsigned char>(text[pos])]) {
      ++pos;
      continue;
    }
    int32_t id = -1;
    const size_t len = trie.longest_at(text, pos, id);
    if (len == 0) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + len;
    // The next search starts at this match's end, whether it is rejected or widened by rstrip below: that
    // is how Aho-Corasick's find_iter walks on in Hugging Face's find_matches.
    pos = stop;
    const AddedToken& tok = by_id_.at(id);
    if (tok.single_word && (word_char_before(text, start) || word_char_after(text, stop))) continue;
    if (tok.lstrip) {
      // Take the whitespace just before the token, but not what an earlier token already took.
      size_t s = start;
      while (s > 0) {
        size_t b = s - 1;
        while (b > 0 && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80 && s - b < 4) --b;
        size_t l = 0;
        const char32_t cp = utf8::decode(text, b, l);
        if (b + l != s || utf8::valid_seq_len(text, b) == 0 || !utf8::is_white_space(cp)) break;
        s = b;
      }
      start = std::max(s, emitted);
    }
    if (tok.rstrip) {
      while (stop < text.size()) {
        size_t l = 0;
        const char32_t cp = utf8::decode(text, stop, l);
        if (utf8::valid_seq_len(text, stop) == 0 || !utf8::is_white_space(cp)) break;
        stop += l;
      }
    }
    // A match inside what an rstrip already took overlaps it; like Hugging Face, emit no text between.
    if (start > emitted) on_piece(text.substr(emitted, start - emitted), -1);
    on_piece(text.substr(start, stop - start), id);
    emitted = stop;
  }
  if (emitted < text.size()) on_piece(text.substr(emitted), -1);
}

}  // namespace dsv3
