#pragma once
// jinja2's filters and tests, Python's str/dict/list methods, and the globals transformers adds
// (raise_exception, strftime_now, namespace, dict), for the chat-template interpreter.
#include <string>

#include "tokenizer/jinja_value.h"

namespace dsv3::jinja {

[[noreturn]] void template_error(int line, const std::string& msg);

// Fails with the undefined value's own message (jinja2's UndefinedError) when v is undefined.
void require_defined(const Value& v, int line);

Value apply_filter(const std::string& name, const Value& v, CallArgs& args, int line);
bool apply_test(const std::string& name, const Value& v, const ValueList& args, int line);

// obj.name: a bound method, a dict entry or namespace attribute, or an Undefined naming what is missing.
Value get_attribute(const Value& obj, const std::string& name, int line);
// obj[key], with jinja2's fallback to attributes for string keys.
Value get_item(const Value& obj, const Value& key, int line);
Value get_slice(const Value& obj, const Value& start, const Value& stop, const Value& step, int line);

// Elements a for loop visits: list items, dict keys, string characters; nothing for Undefined.
ValueList iterate(const Value& v, int line);

Dict make_globals();

// Python-style helpers shared with the evaluator.
std::vector<std::string> code_points(const std::string& s);
bool contains(const Value& container, const Value& item, int line);

}  // namespace dsv3::jinja
