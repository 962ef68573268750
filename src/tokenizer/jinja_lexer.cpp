#include "tokenizer/jinja_lexer.h"

#include <cctype>
#include <cstdlib>

#include <fmt/format.h>

#include "core/error.h"
#include "tokenizer/jinja_value.h"
#include "tokenizer/utf8.h"

namespace dsv3::jinja {
namespace {

std::string normalize_newlines(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\r') {
      out += '\n';
      if (i + 1 < s.size() && s[i + 1] == '\n') ++i;
    } else {
      out += s[i];
    }
  }
  return out;
}

// Python's str.rstrip() (whitespace by str.isspace).
std::string rstrip_ws(const std::string& s) {
  size_t e = s.size();
  while (e > 0) {
    size_t b = e - 1;
    while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80 && e - b < 4) --b;
    size_t len = 0;
    const char32_t c = utf8::decode(s, b, len);
    if (b + len != e || !py_isspace(c)) break;
    e = b;
  }
  return s.substr(0, e);
}

// Length of the whitespace run at s[pos] (str.isspace characters).
size_t ws_run(const std::string& s, size_t pos) {
  size_t p = pos;
  while (p < s.size()) {
    size_t len = 0;
    const char32_t c = utf8::decode(s, p, len);
    if (!py_isspace(c) || utf8::valid_seq_len(s, p) == 0) break;
    p += len;
  }
  return p - pos;
}

bool all_space(const std::string& s, size_t from) {
  return from < s.size() && ws_run(s, from) == s.size() - from;
}

// Python's "unicode-escape" decoding of a string literal body (jinja2 decodes literals this way).
std::string unescape(const std::string& body, int line) {
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    if (body[i] != '\\' || i + 1 == body.size()) {
      out += body[i];
      continue;
    }
    const char e = body[++i];
    auto hex = [&](size_t n) -> char32_t {
      const std::string h = i + n < body.size() ? body.substr(i + 1, n) : std::string();
      bool ok = h.size() == n;
      for (char c : h) ok = ok && std::isxdigit(static_cast<unsigned char>(c));
      if (!ok) fail("line {}: truncated \\{} escape in a string literal", line, e);
      i += n;
      return char32_t(std::strtoul(h.c_str(), nullptr, 16));
    };
    switch (e) {
      case '\n': break;  // line continuation
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'v': out += '\v'; break;
      case 'x': utf8::append(out, hex(2)); break;
      case 'u': utf8::append(out, hex(4)); break;
      case 'U': utf8::append(out, hex(8)); break;
      default:
        if (e >= '0' && e <= '7') {
          int v = e - '0';
          for (int k = 0; k < 2 && i + 1 < body.size() && body[i + 1] >= '0' && body[i + 1] <= '7'; ++k)
            v = v * 8 + (body[++i] - '0');
          utf8::append(out, char32_t(v));
        } else {
          out += '\\';  // Python keeps unknown escapes as written
          out += e;
        }
    }
  }
  return out;
}

class Lexer {
 public:
  explicit Lexer(std::string src) : s_(std::move(src)) {}

  std::vector<Token> run() {
    bool line_starting = true;
    while (pos_ < s_.size()) {
      const size_t start = find_tag_start(pos_);
      if (start == std::string::npos) {
        emit_data(s_.substr(pos_));
        pos_ = s_.size();
        break;
      }
      std::string text = s_.substr(pos_, start - pos_);
      const char kind = s_[start + 1];  // '{', '%' or '#'
      const char sign = (start + 2 < s_.size() && (s_[start + 2] == '-' || s_[start + 2] == '+')) ? s_[start + 2] : 0;
      if (sign == '-') {
        text = rstrip_ws(text);
      } else if (sign != '+' && kind != '{') {
        const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
        if ((l_pos > 0 || line_starting) && all_space(text, l_pos)) text.resize(l_pos);
      }
      emit_data(text);
      line_ += count_newlines(s_, pos_, start);
      pos_ = start + 2 + (sign ? 1 : 0);
      if (kind == '#') {
        line_starting = lex_comment();
      } else if (kind == '%' && try_raw(line_starting)) {
        // handled
      } else {
        line_starting = lex_tag(kind == '%');
      }
    }
    out_.push_back(Token{Token::Kind::End, "", 0, 0, line_});
    return std::move(out_);
  }

 private:
  static int count_newlines(const std::string& s, size_t b, size_t e) {
    int n = 0;
    for (size_t k = b; k < e && k < s.size(); ++k) n += s[k] == '\n';
    return n;
  }

  size_t find_tag_start(size_t from) const {
    for (size_t p = s_.find('{', from); p != std::string::npos; p = s_.find('{', p + 1))
      if (p + 1 < s_.size() && (s_[p + 1] == '{' || s_[p + 1] == '%' || s_[p + 1] == '#')) return p;
    return std::string::npos;
  }

  void emit_data(const std::string& text) {
    if (!text.empty()) out_.push_back(Token{Token::Kind::Data, text, 0, 0, line_});
  }

  // After an end delimiter at pos_: "-" eats all following whitespace, "+" nothing, plain eats one
  // newline when trim applies. Returns whether what was consumed ends a line (jinja2's line_starting).
  bool after_end(char sign, bool trim) {
    size_t eaten = 0;
    if (sign == '-') eaten = ws_run(s_, pos_);
    else if (sign != '+' && trim && pos_ < s_.size() && s_[pos_] == '\n') eaten = 1;
    line_ += count_newlines(s_, pos_, pos_ + eaten);
    pos_ += eaten;
    return eaten > 0 && s_[pos_ - 1] == '\n';
  }

  bool lex_comment() {
    const size_t end = s_.find("#}", pos_);
    if (end == std::string::npos) fail("line {}: comment {{# is never closed with #}}", line_);
    char sign = 0;
    if (end > pos_ && (s_[end - 1] == '-' || s_[end - 1] == '+')) sign = s_[end - 1];
    line_ += count_newlines(s_, pos_, end);
    pos_ = end + 2;
    return after_end(sign, true);
  }

  // {% raw %}...{% endraw %}: the body is data, untouched.
  bool try_raw(bool& line_starting) {
    size_t p = pos_ + ws_run(s_, pos_);
    if (s_.compare(p, 3, "raw") != 0) return false;
    p += 3;
    p += ws_run(s_, p);
    char sign = 0;
    if (p < s_.size() && (s_[p] == '-' || s_[p] == '+')) sign = s_[p++];
    if (s_.compare(p, 2, "%}") != 0) return false;
    pos_ = p + 2;
    after_end(sign, true);
    // Find {%[-+]? endraw [-+]?%}.
    size_t q = pos_;
    while (true) {
      q = s_.find("{%", q);
      if (q == std::string::npos) fail("line {}: {{% raw %}} is never closed with {{% endraw %}}", line_);
      size_t r = q + 2;
      char open_sign = 0;
      if (r < s_.size() && (s_[r] == '-' || s_[r] == '+')) open_sign = s_[r++];
      r += ws_run(s_, r);
      if (s_.compare(r, 6, "endraw") == 0) {
        r += 6;
        r += ws_run(s_, r);
        char close_sign = 0;
        if (r < s_.size() && (s_[r] == '-' || s_[r] == '+')) close_sign = s_[r++];
        if (s_.compare(r, 2, "%}") == 0) {
          std::string body = s_.substr(pos_, q - pos_);
          if (open_sign == '-') body = rstrip_ws(body);
          else if (open_sign != '+') {
            const size_t l_pos = body.rfind('\n') == std::string::npos ? 0 : body.rfind('\n') + 1;
            if (l_pos > 0 && all_space(body, l_pos)) body.resize(l_pos);
          }
          emit_data(body);
          line_ += count_newlines(s_, pos_, r + 2);
          pos_ = r + 2;
          line_starting = after_end(close_sign, true);
          return true;
        }
      }
      q += 2;
    }
  }

  bool lex_tag(bool block) {
    out_.push_back(Token{block ? Token::Kind::BlockBegin : Token::Kind::VarBegin, "", 0, 0, line_});
    int depth = 0;  // open brackets: an end delimiter inside them is an operator, as in jinja2
    while (true) {
      const size_t ws = ws_run(s_, pos_);
      line_ += count_newlines(s_, pos_, pos_ + ws);
      pos_ += ws;
      if (pos_ >= s_.size()) fail("line {}: {} is never closed", line_, block ? "{%" : "{{");
      if (depth == 0) {
        const char* end = block ? "%}" : "}}";
        char sign = 0;
        size_t p = pos_;
        if ((s_[p] == '-' || (block && s_[p] == '+')) && s_.compare(p + 1, 2, end) == 0) sign = s_[p++];
        if (s_.compare(p, 2, end) == 0) {
          out_.push_back(Token{block ? Token::Kind::BlockEnd : Token::Kind::VarEnd, "", 0, 0, line_});
          pos_ = p + 2;
          return after_end(sign, block);
        }
      }
      const char c = s_[pos_];
      if (c == '\'' || c == '"') {
        lex_string(c);
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        lex_number();
      } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = pos_;
        while (e < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[e])) || s_[e] == '_')) ++e;
        out_.push_back(Token{Token::Kind::Name, s_.substr(pos_, e - pos_), 0, 0, line_});
        pos_ = e;
      } else {
        static const char* ops[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[", "]",
                                    "(", ")", "{", "}", ">", "<", "=", ".", ":", "|", ",", ";"};
        const char* found = nullptr;
        for (const char* op : ops)
          if (s_.compare(pos_, std::char_traits<char>::length(op), op) == 0) {
            found = op;
            break;
          }
        if (!found) fail("line {}: unexpected character {:?} in a template tag", line_, std::string(1, c));
        const std::string op = found;
        if (op == "(" || op == "[" || op == "{") ++depth;
        if (op == ")" || op == "]" || op == "}") {
          if (depth == 0) fail("line {}: unexpected {:?}", line_, op);
          --depth;
        }
        out_.push_back(Token{Token::Kind::Op, op, 0, 0, line_});
        pos_ += op.size();
      }
    }
  }

  void lex_string(char q) {
    size_t e = pos_ + 1;
    while (e < s_.size() && s_[e] != q) e += (s_[e] == '\\') ? 2 : 1;
    if (e >= s_.size()) fail("line {}: string literal is never closed", line_);
    const std::string body = s_.substr(pos_ + 1, e - pos_ - 1);
    out_.push_back(Token{Token::Kind::String, unescape(body, line_), 0, 0, line_});
    line_ += count_newlines(s_, pos_, e);
    pos_ = e + 1;
  }

  void lex_number() {
    size_t e = pos_;
    auto digits = [&] {
      while (e < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[e])) || s_[e] == '_')) ++e;
    };
    digits();
    bool is_float = false;
    if (e + 1 < s_.size() && s_[e] == '.' && std::isdigit(static_cast<unsigned char>(s_[e + 1]))) {
      is_float = true;
      ++e;
      digits();
    }
    if (e < s_.size() && (s_[e] == 'e' || s_[e] == 'E')) {
      size_t f = e + 1;
      if (f < s_.size() && (s_[f] == '+' || s_[f] == '-')) ++f;
      if (f < s_.size() && std::isdigit(static_cast<unsigned char>(s_[f]))) {
        is_float = true;
        e = f;
        digits();
      }
    }
    std::string spelled;
    for (size_t k = pos_; k < e; ++k)
      if (s_[k] != '_') spelled += s_[k];
    Token t{is_float ? Token::Kind::Float : Token::Kind::Int, spelled, 0, 0, line_};
    if (is_float) t.float_value = std::strtod(spelled.c_str(), nullptr);
    else t.int_value = std::strtoll(spelled.c_str(), nullptr, 10);
    out_.push_back(t);
    pos_ = e;
  }

  std::string s_;
  size_t pos_ = 0;
  int line_ = 1;
  std::vector<Token> out_;
};

}  // namespace

std::vector<Token> lex(const std::string& source) {
  std::string s = normalize_newlines(source);
  if (!s.empty() && s.back() == '\n') s.pop_back();  // keep_trailing_newline=False
  return Lexer(std::move(s)).run();
}

}  // namespace dsv3::jinja
