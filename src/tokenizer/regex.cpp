#include "tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cctype>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace dsv3 {
namespace {

// Oniguruma's Unicode \s: U+0009-U+000D, U+0085 and the separators (Zs, Zl, Zp). PCRE2's \s also takes
// U+180E, so spell the class out.
constexpr std::string_view kSpaceItems = "\\t\\n\\x0B\\f\\r\\x{85}\\p{Z}";
// Oniguruma's Unicode \w: letters, marks, numbers and connector punctuation (PCRE2 10.42 omits marks).
constexpr std::string_view kWordItems = "\\p{L}\\p{M}\\p{N}\\p{Pc}";
// In Oniguruma's Ruby syntax \h is a hexadecimal digit (in PCRE2 it is horizontal space).
constexpr std::string_view kHexItems = "0-9a-fA-F";

// Per-thread match state: compiled patterns are shared, match data and the JIT stack are not.
struct ThreadMatchState {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  ThreadMatchState() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    // Long runs of letters or spaces backtrack deeply in lookahead patterns; give the JIT room.
    jit_stack = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, nullptr);
    pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~ThreadMatchState() {
    pcre2_match_data_free(data);
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(jit_stack);
  }
};

ThreadMatchState& thread_state() {
  thread_local ThreadMatchState state;
  return state;
}

bool is_hex4(std::string_view s) {
  for (char c : s)
    if (!std::isxdigit(static_cast<unsigned char>(c))) return false;
  return true;
}

std::string pcre_error_text(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

}  // namespace

std::string Regex::translate(std::string_view p) {
  std::string out;
  out.reserve(p.size() + 32);
  int class_depth = 0;  // inside [...] (Oniguruma allows nesting)
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[i + 1];
      auto put_class = [&](std::string_view items, bool negate) {
        if (class_depth > 0 && !negate) {
          out += items;
        } else if (class_depth == 0) {
          out += negate ? "[^" : "[";
          out += items;
          out += ']';
        } else {
          out += '\\';  // a negated class inside a class has no PCRE2 spelling; keep PCRE2's meaning
          out += e;
        }
      };
      switch (e) {
        case 's': put_class(kSpaceItems, false); ++i; continue;
        case 'S': put_class(kSpaceItems, true); ++i; continue;
        case 'w': put_class(kWordItems, false); ++i; continue;
        case 'W': put_class(kWordItems, true); ++i; continue;
        case 'h': put_class(kHexItems, false); ++i; continue;
        case 'H': put_class(kHexItems, true); ++i; continue;
        case 'u':
          if (i + 6 <= p.size() && is_hex4(p.substr(i + 2, 4))) {
            out += "\\x{";
            out.append(p.substr(i + 2, 4));
            out += '}';
            i += 5;
            continue;
          }
          break;
        default: break;
      }
      // Any other escape passes through whole (including a multi-byte escaped character).
      size_t len = 0;
      utf8::decode(p, i + 1, len);
      out += '\\';
      out.append(p.substr(i + 1, len));
      i += len;
      continue;
    }
    if (c == '[') {
      ++class_depth;
      out += c;
      // A ']' (or '^]') right after '[' is a literal, not the end of the class.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (c == ']' && class_depth > 0) --class_depth;
    out += c;
  }
  return out;
}

Regex::Regex(std::string_view onig_pattern, std::string_view what) : source_(onig_pattern) {
  compile(translate(onig_pattern), what);
}

Regex Regex::literal(std::string_view literal, std::string_view what) {
  Regex r;
  r.source_ = std::string(literal);
  std::string quoted;
  for (char c : literal) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) quoted += '\\';
    quoted += c;
  }
  r.compile(quoted, what);
  return r;
}

void Regex::compile(const std::string& pattern, std::string_view what) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                        PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &err_off, nullptr);
  if (!code_) fail("{}: regex {:?} does not compile: {} (at offset {})", what, source_, pcre_error_text(err), err_off);
  jit_ = pcre2_jit_compile(static_cast<pcre2_code*>(code_), PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() {
  if (code_) pcre2_code_free(static_cast<pcre2_code*>(code_));
}

Regex::Regex(Regex&& o) noexcept : source_(std::move(o.source_)), code_(o.code_), jit_(o.jit_) { o.code_ = nullptr; }

Regex& Regex::operator=(Regex&& o) noexcept {
  if (this != &o) {
    if (code_) pcre2_code_free(static_cast<pcre2_code*>(code_));
    source_ = std::move(o.source_);
    code_ = o.code_;
    jit_ = o.jit_;
    o.code_ = nullptr;
  }
  return *this;
}

bool Regex::search(std::string_view subject, size_t start, size_t& match_begin, size_t& match_end) const {
  auto& st = thread_state();
  auto* code = static_cast<const pcre2_code*>(code_);
  const auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
  const int rc = jit_ ? pcre2_jit_match(code, s, subject.size(), start, 0, st.data, st.context)
                      : pcre2_match(code, s, subject.size(), start, 0, st.data, st.context);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    // Only resource limits can get here (the subject may be any bytes); no tokenization can be trusted then.
    throw Error(fmt::format("regex {:?} failed on a {}-byte piece: {}", source_, subject.size(), pcre_error_text(rc)));
  }
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data);
  match_begin = ov[0];
  match_end = ov[1];
  return true;
}

size_t Regex::next_char_len(std::string_view s, size_t pos) {
  if (pos >= s.size()) return 1;
  const size_t n = utf8::valid_seq_len(s, pos);
  return n == 0 ? 1 : n;
}

Regex pattern_from_json(const nlohmann::json& p, const std::string& where) {
  if (p.is_object() && p.contains("String") && p["String"].is_string())
    return Regex::literal(p["String"].get<std::string>(), where);
  if (p.is_object() && p.contains("Regex") && p["Regex"].is_string()) return Regex(p["Regex"].get<std::string>(), where);
  fail("tokenizer.json: {}.pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}, got {}", where,
       p.dump().substr(0, 80));
}

}  // namespace dsv3
