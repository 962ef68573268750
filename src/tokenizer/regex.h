#pragma once
// PCRE2 (JIT, UTF, Unicode properties) behind the small interface the tokenizer needs: find all matches
// of a pattern in a piece of text, the way Hugging Face tokenizers' Oniguruma-backed SysRegex does.
//
// tokenizer.json patterns are written for Oniguruma, whose \s, \w and \h differ from PCRE2's; translate()
// rewrites those escapes so the same pattern matches the same characters. Invalid UTF-8 in the subject is
// allowed (PCRE2_MATCH_INVALID_UTF): invalid bytes simply never match a pattern item.
#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace dsv3 {

class Regex {
 public:
  // Compiles an Oniguruma-syntax pattern; throws InputError naming `what` (for example the pre-tokenizer
  // it belongs to) when the pattern does not compile.
  Regex(std::string_view onig_pattern, std::string_view what);
  // A pattern that matches `literal` exactly.
  static Regex literal(std::string_view literal, std::string_view what);
  ~Regex();
  Regex(Regex&& o) noexcept;
  Regex& operator=(Regex&& o) noexcept;
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // First match at or after `start` in `subject`; false when none. Thread-safe.
  bool search(std::string_view subject, size_t start, size_t& match_begin, size_t& match_end) const;

  // Calls on_match(begin, end) for every match, left to right, with Oniguruma's find_iter rule for empty
  // matches (an empty match right where the previous match ended is skipped by one character).
  template <typename F>
  void for_each_match(std::string_view subject, F&& on_match) const {
    size_t pos = 0;
    bool have_last = false;
    size_t last_end = 0;
    while (pos <= subject.size()) {
      size_t b = 0, e = 0;
      if (!search(subject, pos, b, e)) break;
      if (b == e && have_last && last_end == e) {
        pos += next_char_len(subject, pos);
        continue;
      }
      on_match(b, e);
      pos = e;
      last_end = e;
      have_last = true;
    }
  }

  const std::string& pattern() const { return source_; }

  // The PCRE2 pattern equivalent to an Oniguruma pattern (exposed for tests).
  static std::string translate(std::string_view onig_pattern);

 private:
  Regex() = default;
  void compile(const std::string& pcre_pattern, std::string_view what);
  static size_t next_char_len(std::string_view s, size_t pos);

  std::string source_;
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

// Reads tokenizer.json's {"String": literal} or {"Regex": pattern} (Split pre-tokenizer, Replace normalizer).
Regex pattern_from_json(const nlohmann::json& pattern, const std::string& where);

}  // namespace dsv3
