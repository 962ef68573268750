#pragma once
// UTF-8 helpers shared by the tokenizer, the chat template and the stream decoder.
// Input text is arbitrary bytes: every function here accepts invalid UTF-8 without failing.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dsv3::utf8 {

// Length of the valid UTF-8 sequence starting at s[i], or 0 when the bytes there are not one
// (bad lead byte, bad continuation, overlong form, surrogate, above U+10FFFF, or truncated).
size_t valid_seq_len(std::string_view s, size_t i);

// Decodes the code point at s[i]; sets len to the bytes consumed (1 for an invalid byte, which decodes
// to U+FFFD so callers can step over it).
char32_t decode(std::string_view s, size_t i, size_t& len);

void append(std::string& out, char32_t cp);

bool is_valid(std::string_view s);

// Unicode's White_Space property (what Rust's char::is_whitespace and \s in Rust's regex crate test).
bool is_white_space(char32_t cp);

// What Rust's String::from_utf8_lossy returns: each maximal invalid subpart becomes U+FFFD. Hugging Face
// tokenizers decode through it, so decode() must do exactly the same to produce identical text.
std::string to_valid_lossy(std::string_view bytes);

// Number of leading bytes of s that form complete UTF-8 text, holding back an incomplete sequence at the
// very end that more bytes could still complete (used for streaming output). Invalid bytes that no later
// byte can repair are not held back.
size_t complete_prefix_len(std::string_view s);

}  // namespace dsv3::utf8
