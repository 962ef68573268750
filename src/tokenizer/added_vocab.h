#pragma once
// Added tokens (tokenizer.json "added_tokens"): strings matched in the input before pre-tokenization and
// emitted as single ids. Mirrors Hugging Face tokenizers' AddedVocabulary: ids are assigned the way it
// assigns them on load, tokens with normalized=false are matched on the raw text and the others on the
// normalized text, matching is leftmost-longest, and lstrip / rstrip / single_word are honoured.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/function_ref.h"

namespace dsv3 {

class BpeModel;
class Normalizer;
class Regex;

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool normalized = true;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

class AddedVocabulary {
 public:
  AddedVocabulary();
  ~AddedVocabulary();
  AddedVocabulary(AddedVocabulary&&) noexcept;

  // Reads the "added_tokens" array. Ids come from the model vocabulary when the content is in it, else
  // the next free id after the vocabulary, in file order (what Hugging Face does, whatever "id" says).
  void load(const nlohmann::json& added_tokens, const BpeModel& model, const Normalizer* normalizer);

  // Cuts text at the added tokens of one set (raw-text set or normalized-text set) and calls
  // on_piece(piece, id) in order, id = -1 for text between tokens. Empty pieces are skipped.
  void split(std::string_view text, bool normalized_set, FunctionRef<void(std::string_view, int32_t)> on_piece) const;
  bool has_tokens(bool normalized_set) const { return !tries_[normalized_set ? 1 : 0].patterns.empty(); }

  int32_t find(std::string_view content) const;  // -1 when not an added token
  const AddedToken* by_id(int32_t id) const;
  bool is_special_content(std::string_view content) const { return special_contents_.count(std::string(content)) > 0; }
  int32_t max_id() const;
  size_t size() const { return by_content_.size(); }

 private:
  // Leftmost-longest matcher over a few hundred strings: a byte trie plus a table of possible first bytes.
  struct Trie {
    struct Node {
      std::vector<std::pair<unsigned char, int32_t>> next;
      int32_t pattern = -1;
    };
    std::vector<Node> nodes{Node{}};
    std::vector<int32_t> patterns;  // pattern index -> token id
    bool first_byte[256] = {};
    int single_first_byte = -1;  // the only byte patterns start with, or -1
    void add(std::string_view s, int32_t id);
    // Longest pattern starting at pos: its length (0 if none) and token id.
    size_t longest_at(std::string_view text, size_t pos, int32_t& id) const;
  };
  void add(const AddedToken& t, const BpeModel& model);
  bool word_char_before(std::string_view text, size_t pos) const;
  bool word_char_after(std::string_view text, size_t pos) const;

  std::unordered_map<std::string, int32_t> by_content_;
  std::unordered_map<int32_t, AddedToken> by_id_;
  std::vector<AddedToken> special_tokens_;  // in file order, as Hugging Face keeps them
  std::vector<AddedToken> plain_tokens_;
  std::unordered_set<std::string> special_contents_;
  Trie tries_[2];                       // [0]: matched on raw text, [1]: on normalized text
  std::unique_ptr<Regex> word_char_;  // Rust regex's Unicode \w, only built when a token is single_word
};

}  // namespace dsv3
