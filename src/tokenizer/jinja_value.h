#pragma once
// Values of the Jinja-subset interpreter that runs chat templates. They behave like the Python objects
// jinja2 works on (transformers renders chat templates with jinja2), because the rendered text must match
// byte for byte: str() and repr() of numbers, lists and dicts, Python truthiness and equality, dicts that
// keep insertion order, and jinja2's Undefined (renders as "", iterates as empty, fails on use).
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsv3::jinja {

struct Value;
using ValueList = std::vector<Value>;

struct Dict {
  std::vector<std::pair<std::string, Value>> items;  // insertion order, like a Python dict
  const Value* find(const std::string& key) const;
  Value* find(const std::string& key);
  void set(const std::string& key, Value v);
};

struct CallArgs {
  ValueList positional;
  std::vector<std::pair<std::string, Value>> keyword;
};

using Function = std::function<Value(CallArgs&)>;

struct Value {
  enum class Type { Undefined, None, Bool, Int, Float, String, List, Dict, Namespace, Function };
  Type type = Type::Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::shared_ptr<std::string> s;
  std::shared_ptr<ValueList> list;  // List
  bool is_tuple = false;            // a List that Python would show as a tuple
  std::shared_ptr<Dict> dict;       // Dict and Namespace (a namespace is a mutable dict of attributes)
  std::shared_ptr<Function> fn;
  std::string name;  // what an Undefined stands for ("'x' is undefined"), or a function's name

  static Value undefined(std::string why = "value is undefined");
  static Value none();
  static Value boolean(bool v);
  static Value integer(int64_t v);
  static Value number(double v);
  static Value string(std::string v);
  static Value make_list(ValueList v, bool tuple = false);
  static Value make_dict(Dict d = {});
  static Value make_namespace(Dict d = {});
  static Value function(std::string name, Function f);
  static Value from_json(const nlohmann::ordered_json& j);

  bool is_undefined() const { return type == Type::Undefined; }
  bool is_none() const { return type == Type::None; }
  bool is_string() const { return type == Type::String; }
  bool is_number() const { return type == Type::Int || type == Type::Float || type == Type::Bool; }
  bool is_list() const { return type == Type::List; }
  bool is_dict() const { return type == Type::Dict; }
  const std::string& str_ref() const { return *s; }

  // Python's bool(x).
  bool truthy() const;
  // Python's str(x) (jinja2 renders {{ x }} with it; Undefined renders as "").
  std::string to_str() const;
  // Python's repr(x), used for items inside str() of lists and dicts.
  std::string repr() const;
  // json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...) as transformers' tojson.
  std::string to_json(int indent, bool have_indent, const std::string& item_sep, const std::string& key_sep,
                      bool sort_keys, int depth = 0) const;
  // Python type name for messages ("str", "dict", "NoneType").
  std::string type_name() const;
  double as_double() const;
};

// Python's ==.
bool equals(const Value& a, const Value& b);

// Python's float repr (shortest round-trip digits, "1.0", "1e+16").
std::string python_float_repr(double v);

// Python's str.isspace() for one code point.
bool py_isspace(char32_t c);

}  // namespace dsv3::jinja
