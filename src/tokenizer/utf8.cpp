#include "tokenizer/utf8.h"

namespace dsv3::utf8 {
namespace {

// Valid second-byte range for a lead byte (Unicode Table 3-7), which rules out overlong forms,
// surrogates and code points above U+10FFFF.
struct SecondByteRange {
  unsigned char lo, hi;
};
SecondByteRange second_byte_range(unsigned char lead) {
  if (lead == 0xE0) return {0xA0, 0xBF};
  if (lead == 0xED) return {0x80, 0x9F};
  if (lead == 0xF0) return {0x90, 0xBF};
  if (lead == 0xF4) return {0x80, 0x8F};
  return {0x80, 0xBF};
}

size_t expected_len(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

// How many bytes starting at s[i] are a valid prefix of some UTF-8 sequence (at least 1 when invalid:
// that is Rust's "maximal subpart" rule for lossy decoding). Sets complete when the sequence is whole.
size_t valid_prefix(std::string_view s, size_t i, bool& complete) {
  const auto lead = static_cast<unsigned char>(s[i]);
  const size_t need = expected_len(lead);
  complete = false;
  if (need == 0) return 1;
  if (need == 1) {
    complete = true;
    return 1;
  }
  size_t n = 1;
  while (n < need && i + n < s.size()) {
    const auto c = static_cast<unsigned char>(s[i + n]);
    const auto r = n == 1 ? second_byte_range(lead) : SecondByteRange{0x80, 0xBF};
    if (c < r.lo || c > r.hi) return n;
    ++n;
  }
  complete = n == need;
  return n;
}

}  // namespace

size_t valid_seq_len(std::string_view s, size_t i) {
  bool complete = false;
  const size_t n = valid_prefix(s, i, complete);
  return complete ? n : 0;
}

char32_t decode(std::string_view s, size_t i, size_t& len) {
  len = valid_seq_len(s, i);
  if (len == 0) {
    len = 1;
    return 0xFFFD;
  }
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (len == 1) return b0;
  char32_t cp = b0 & (0xFF >> (len + 1));
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return cp;
}

void append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

bool is_valid(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t n = valid_seq_len(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

std::string to_valid_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t run = 0;  // start of the current run of valid bytes, copied in one go
  size_t i = 0;
  while (i < s.size()) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    bool complete = false;
    const size_t n = valid_prefix(s, i, complete);
    if (complete) {
      i += n;
      continue;
    }
    out.append(s.data() + run, i - run);
    out += "\xEF\xBF\xBD";
    i += n;
    run = i;
  }
  out.append(s.data() + run, s.size() - run);
  return out;
}

size_t complete_prefix_len(std::string_view s) {
  // Only the last 3 bytes can start an incomplete sequence: look back for a lead byte.
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const size_t i = n - back;
    const auto c = static_cast<unsigned char>(s[i]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for its lead
    bool complete = false;
    const size_t got = valid_prefix(s, i, complete);
    // A valid but unfinished prefix that reaches the end may still be completed by later bytes.
    if (!complete && got == back && expected_len(c) > back) return i;
    return n;
  }
  return n;
}

}  // namespace dsv3::utf8
