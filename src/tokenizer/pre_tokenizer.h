#pragma once
// tokenizer.json pre-tokenizers: cut normalized text into the pieces the BPE model encodes one by one.
// Supported: Sequence, Split (String or Regex pattern, every behavior, invert) and ByteLevel
// (add_prefix_space, use_regex with GPT-2's pattern). DeepSeek-V3 uses
// Sequence[Split(digits), Split(CJK), Split(words), ByteLevel(use_regex=false)].
//
// ByteLevel's byte -> character mapping is not done here: pieces stay raw bytes and the BPE model maps
// each byte to its token (BpeModel::set_byte_level_input), which avoids building a mapped string per piece.
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/function_ref.h"
#include "tokenizer/regex.h"

namespace dsv3 {

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

class PreTokenizer {
 public:
  // nullptr for a null pre-tokenizer (the whole text is one piece).
  static std::unique_ptr<PreTokenizer> from_json(const nlohmann::json& j);

  // Calls sink(piece) for every non-empty piece, in order. A piece may live in scratch memory that is only
  // valid during the call. exact_unicode: see Regex::needs_exact_unicode (true is always correct).
  void split(std::string_view text, FunctionRef<void(std::string_view)> sink, bool exact_unicode = true) const;

  // Whether the pipeline ends with ByteLevel (pieces are bytes to be mapped to byte-level characters).
  bool byte_level() const { return byte_level_; }

 private:
  struct Stage {
    enum Kind { Split, ByteLevel } kind;
    std::unique_ptr<Regex> re;  // Split's pattern, or GPT-2's for ByteLevel with use_regex
    SplitBehavior behavior = SplitBehavior::Isolated;
    bool invert = false;
    bool add_prefix_space = false;
  };
  void add_stage(const nlohmann::json& j, const std::string& where);
  void run(size_t stage, std::string_view piece, FunctionRef<void(std::string_view)> sink, bool exact) const;
  void run_split(const Stage& st, size_t stage, std::string_view piece, FunctionRef<void(std::string_view)> sink,
                 bool exact) const;

  std::vector<Stage> stages_;
  bool byte_level_ = false;
};

}  // namespace dsv3
