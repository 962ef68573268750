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

  // First match at or after `start` in `subject`; false when none. Thread-safe. `exact` selects the
  // pattern that agrees with Oniguruma on every code point; without it PCRE2's own \s and \p{..} tables
  // are used, which is faster and gives the same result unless the subject holds a code point for which
  // they differ (see needs_exact_unicode).
  bool search(std::string_view subject, size_t start, size_t& match_begin, size_t& match_end, bool exact = true) const;

  // Calls on_match(begin, end) for every match, left to right, with Oniguruma's find_iter rule for empty
  // matches (an empty match right where the previous match ended is skipped by one character).
  template <typename F>
  void for_each_match(std::string_view subject, F&& on_match, bool exact = true) const {
    size_t pos = 0;
    bool have_last = false;
    size_t last_end = 0;
    while (pos <= subject.size()) {
      size_t b = 0, e = 0;
      if (!search(subject, pos, b, e, exact)) break;
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

  // Whether text holds a code point on which PCRE2's Unicode tables and Oniguruma's disagree (characters
  // assigned in Unicode 15-16, and U+180E which PCRE2 counts as space). Fast for ASCII.
  static bool needs_exact_unicode(std::string_view text);

  const std::string& pattern() const { return source_; }

  // The PCRE2 pattern equivalent to an Oniguruma pattern (exposed for tests). With exact = false, \s and
  // \p{X} keep PCRE2's meaning (equal to Oniguruma's except on the code points needs_exact_unicode finds).
  static std::string translate(std::string_view onig_pattern, bool exact = true);

 private:
  Regex() = default;
  void compile(const std::string& exact_pattern, const std::string& fast_pattern, std::string_view what);
  static size_t next_char_len(std::string_view s, size_t pos);

  struct Compiled {
    void* code = nullptr;  // pcre2_code_8*
    bool jit = false;
  };
  static Compiled compile_one(const std::string& pattern, const std::string& source, std::string_view what);
  static void release(Compiled& c);
  bool search_in(const Compiled& c, std::string_view subject, size_t start, size_t& b, size_t& e) const;

  std::string source_;
  Compiled exact_;
  Compiled fast_;  // code == nullptr when the fast pattern would be the same as the exact one
};

// Reads tokenizer.json's {"String": literal} or {"Regex": pattern} (Split pre-tokenizer, Replace normalizer).
Regex pattern_from_json(const nlohmann::json& pattern, const std::string& where);

}  // namespace dsv3
