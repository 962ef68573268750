#pragma once
// A Jinja-subset interpreter for chat templates, matching jinja2 as transformers configures it
// (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols; raise_exception, tojson,
// namespace, strftime_now). Supported: {{ }}, {% if/elif/else %}, {% for %} with loop.* and else,
// {% set %} (names, tuples, namespace attributes, blocks), {% macro %}, break/continue, {% generation %},
// comments, raw; Python-like expressions with filters, tests, and the common str/dict/list methods.
// Unsupported syntax fails at parse time with an InputError naming the line.
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "tokenizer/jinja_ast.h"

namespace dsv3::jinja {

class Template {
 public:
  // Throws InputError "line N: ..." when the source does not parse.
  explicit Template(const std::string& source);
  ~Template();
  // Renders with the given variables; throws InputError "line N: ..." on a template error (undefined
  // value used, type error, raise_exception).
  std::string render(const nlohmann::ordered_json& variables) const;

 private:
  Body body_;
};

// Parser entry point (jinja_parser.cpp).
Body parse(const std::string& source);

// Renders a parsed body (jinja_eval.cpp).
std::string render(const Body& body, const nlohmann::ordered_json& variables);

}  // namespace dsv3::jinja
