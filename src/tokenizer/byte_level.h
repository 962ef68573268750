#pragma once
// GPT-2's byte-level alphabet: every byte 0..255 is shown as one printable code point, so a BPE vocabulary
// over these characters can spell any byte string. Printable Latin-1 bytes map to themselves; the other
// 68 bytes map to U+0100.. in byte order (space 0x20 becomes 'Ġ' U+0120).
#include <array>
#include <optional>
#include <string>
#include <string_view>

namespace dsv3::byte_level {

// The UTF-8 text of the code point that stands for byte b.
const std::string& byte_char(unsigned char b);

// Maps raw bytes to their byte-level text.
std::string encode(std::string_view bytes);
void encode_append(std::string_view bytes, std::string& out);

// Maps byte-level text back to bytes; nullopt when a character is not in the alphabet.
std::optional<std::string> decode(std::string_view text);

}  // namespace dsv3::byte_level
