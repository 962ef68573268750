#pragma once
// Tokenizer for Jinja template source, with jinja2's whitespace rules as transformers configures them:
// trim_blocks (drop the newline after a block or comment tag), lstrip_blocks (drop spaces and tabs
// before a block or comment tag at the start of a line), "-" and "+" modifiers, newlines normalized to
// "\n", one trailing newline removed, {% raw %} blocks, and Python string escapes in string literals.
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3::jinja {

struct Token {
  enum class Kind { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, End };
  Kind kind;
  std::string text;  // Data text, name, unescaped string value, operator, number spelling
  int64_t int_value = 0;
  double float_value = 0;
  int line = 1;
};

// Throws InputError "line N: ..." on malformed source (unclosed tag, comment or string).
std::vector<Token> lex(const std::string& source);

}  // namespace dsv3::jinja
