#include "tokenizer/byte_level.h"

#include <unordered_map>

#include "tokenizer/utf8.h"

namespace dsv3::byte_level {
namespace {

struct Tables {
  std::array<std::string, 256> to_char;
  std::unordered_map<char32_t, unsigned char> to_byte;
  Tables() {
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? char32_t(b) : char32_t(256 + extra++);
      utf8::append(to_char[b], cp);
      to_byte[cp] = static_cast<unsigned char>(b);
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

}  // namespace

const std::string& byte_char(unsigned char b) { return tables().to_char[b]; }

void encode_append(std::string_view bytes, std::string& out) {
  const auto& t = tables();
  for (char c : bytes) out += t.to_char[static_cast<unsigned char>(c)];
}

std::string encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  encode_append(bytes, out);
  return out;
}

std::optional<std::string> decode(std::string_view text) {
  const auto& t = tables();
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    size_t len = 0;
    const char32_t cp = utf8::decode(text, i, len);
    const bool valid = !(cp == 0xFFFD && utf8::valid_seq_len(text, i) == 0);
    auto it = valid ? t.to_byte.find(cp) : t.to_byte.end();
    if (it == t.to_byte.end()) return std::nullopt;
    out += char(it->second);
    i += len;
  }
  return out;
}

}  // namespace dsv3::byte_level
