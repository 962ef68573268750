#include "tokenizer/jinja_value.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include <fmt/format.h>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace dsv3::jinja {

const Value* Dict::find(const std::string& key) const {
  for (const auto& [k, v] : items)
    if (k == key) return &v;
  return nullptr;
}

Value* Dict::find(const std::string& key) {
  for (auto& [k, v] : items)
    if (k == key) return &v;
  return nullptr;
}

void Dict::set(const std::string& key, Value v) {
  if (Value* old = find(key)) *old = std::move(v);
  else items.emplace_back(key, std::move(v));
}

Value Value::undefined(std::string why) {
  Value v;
  v.name = std::move(why);
  return v;
}
Value Value::none() {
  Value v;
  v.type = Type::None;
  return v;
}
Value Value::boolean(bool b) {
  Value v;
  v.type = Type::Bool;
  v.b = b;
  return v;
}
Value Value::integer(int64_t i) {
  Value v;
  v.type = Type::Int;
  v.i = i;
  return v;
}
Value Value::number(double f) {
  Value v;
  v.type = Type::Float;
  v.f = f;
  return v;
}
Value Value::string(std::string s) {
  Value v;
  v.type = Type::String;
  v.s = std::make_shared<std::string>(std::move(s));
  return v;
}
Value Value::make_list(ValueList l, bool tuple) {
  Value v;
  v.type = Type::List;
  v.list = std::make_shared<ValueList>(std::move(l));
  v.is_tuple = tuple;
  return v;
}
Value Value::make_dict(Dict d) {
  Value v;
  v.type = Type::Dict;
  v.dict = std::make_shared<Dict>(std::move(d));
  return v;
}
Value Value::make_namespace(Dict d) {
  Value v;
  v.type = Type::Namespace;
  v.dict = std::make_shared<Dict>(std::move(d));
  return v;
}
Value Value::function(std::string name, Function f) {
  Value v;
  v.type = Type::Function;
  v.name = std::move(name);
  v.fn = std::make_shared<Function>(std::move(f));
  return v;
}

Value Value::from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null: return none();
    case nlohmann::ordered_json::value_t::boolean: return boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer: return integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: return integer(int64_t(j.get<uint64_t>()));
    case nlohmann::ordered_json::value_t::number_float: return number(j.get<double>());
    case nlohmann::ordered_json::value_t::string: return string(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      ValueList l;
      l.reserve(j.size());
      for (const auto& e : j) l.push_back(from_json(e));
      return make_list(std::move(l));
    }
    case nlohmann::ordered_json::value_t::object: {
      Dict d;
      for (const auto& [k, v] : j.items()) d.items.emplace_back(k, from_json(v));
      return make_dict(std::move(d));
    }
    default: return none();
  }
}

bool Value::truthy() const {
  switch (type) {
    case Type::Undefined:
    case Type::None: return false;
    case Type::Bool: return b;
    case Type::Int: return i != 0;
    case Type::Float: return f != 0;
    case Type::String: return !s->empty();
    case Type::List: return !list->empty();
    case Type::Dict: return !dict->items.empty();
    default: return true;
  }
}

double Value::as_double() const {
  if (type == Type::Float) return f;
  if (type == Type::Int) return double(i);
  if (type == Type::Bool) return b ? 1 : 0;
  return 0;
}

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  // Shortest round-trip digits, then Python's layout: fixed for 1e-4 <= |v| < 1e16, else scientific.
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  const size_t epos = sci.find('e');
  std::string mant = sci.substr(0, epos);
  const int exp = std::stoi(sci.substr(epos + 1));
  const bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  std::string out = neg ? "-" : "";
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out += "0." + std::string(size_t(-exp - 1), '0') + digits;
    } else if (size_t(exp) + 1 >= digits.size()) {
      out += digits + std::string(size_t(exp) + 1 - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, size_t(exp) + 1) + "." + digits.substr(size_t(exp) + 1);
    }
    return out;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  out += fmt::format("e{}{:02d}", exp < 0 ? '-' : '+', std::abs(exp));
  return out;
}

bool py_isspace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

namespace {

bool py_printable(char32_t c) {
  if (c < 0x20 || c == 0x7F) return false;
  if (c >= 0x80 && c <= 0xA0) return false;
  if (c == 0xAD || c == 0x2028 || c == 0x2029 || c == 0xFEFF || (c >= 0x200B && c <= 0x200F) || c == 0x3000 ||
      (c >= 0x2000 && c <= 0x200A) || c == 0x1680 || c == 0x202F || c == 0x205F)
    return false;
  return true;
}

std::string py_str_repr(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos, has_double = s.find('"') != std::string::npos;
  const char q = (has_single && !has_double) ? '"' : '\'';
  std::string out(1, q);
  for (size_t i = 0; i < s.size();) {
    size_t len = 0;
    const char32_t c = utf8::decode(s, i, len);
    if (c == char32_t(q) || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (!py_printable(c)) {
      out += c < 0x100 ? fmt::format("\\x{:02x}", uint32_t(c))
                       : c < 0x10000 ? fmt::format("\\u{:04x}", uint32_t(c)) : fmt::format("\\U{:08x}", uint32_t(c));
    } else {
      out.append(s, i, len);
    }
    i += len;
  }
  out += q;
  return out;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) out += fmt::format("\\u{:04x}", c);
        else out += char(c);
    }
  }
  return out + "\"";
}

}  // namespace

std::string Value::to_str() const {
  switch (type) {
    case Type::Undefined: return "";
    case Type::String: return *s;
    default: return repr();
  }
}

std::string Value::repr() const {
  switch (type) {
    case Type::Undefined: return "";
    case Type::None: return "None";
    case Type::Bool: return b ? "True" : "False";
    case Type::Int: return std::to_string(i);
    case Type::Float: return python_float_repr(f);
    case Type::String: return py_str_repr(*s);
    case Type::List: {
      std::string out = is_tuple ? "(" : "[";
      for (size_t k = 0; k < list->size(); ++k) out += (k ? ", " : "") + (*list)[k].repr();
      if (is_tuple && list->size() == 1) out += ",";
      return out + (is_tuple ? ")" : "]");
    }
    case Type::Dict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, v] : dict->items) {
        out += (first ? "" : ", ") + py_str_repr(k) + ": " + v.repr();
        first = false;
      }
      return out + "}";
    }
    case Type::Namespace: return "<Namespace>";
    case Type::Function: return "<function " + name + ">";
  }
  return "";
}

std::string Value::to_json(int indent, bool have_indent, const std::string& item_sep, const std::string& key_sep,
                           bool sort_keys, int depth) const {
  auto newline = [&](int d) {
    std::string s;
    if (have_indent) {
      s += '\n';
      s.append(size_t(indent * d), ' ');
    }
    return s;
  };
  switch (type) {
    case Type::None: return "null";
    case Type::Bool: return b ? "true" : "false";
    case Type::Int: return std::to_string(i);
    case Type::Float:
      if (std::isnan(f)) return "NaN";
      if (std::isinf(f)) return f > 0 ? "Infinity" : "-Infinity";
      return python_float_repr(f);
    case Type::String: return json_string(*s);
    case Type::List: {
      if (list->empty()) return "[]";
      std::string out = "[";
      for (size_t k = 0; k < list->size(); ++k)
        out += (k ? item_sep : "") + newline(depth + 1) +
               (*list)[k].to_json(indent, have_indent, item_sep, key_sep, sort_keys, depth + 1);
      return out + newline(depth) + "]";
    }
    case Type::Dict:
    case Type::Namespace: {
      if (type == Type::Namespace) break;
      if (dict->items.empty()) return "{}";
      auto items = dict->items;
      if (sort_keys)
        std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      std::string out = "{";
      bool first = true;
      for (const auto& [k, v] : items) {
        out += (first ? "" : item_sep) + newline(depth + 1) + json_string(k) + key_sep +
               v.to_json(indent, have_indent, item_sep, key_sep, sort_keys, depth + 1);
        first = false;
      }
      return out + newline(depth) + "}";
    }
    default: break;
  }
  fail("Object of type {} is not JSON serializable", type_name());
}

std::string Value::type_name() const {
  switch (type) {
    case Type::Undefined: return "Undefined";
    case Type::None: return "NoneType";
    case Type::Bool: return "bool";
    case Type::Int: return "int";
    case Type::Float: return "float";
    case Type::String: return "str";
    case Type::List: return is_tuple ? "tuple" : "list";
    case Type::Dict: return "dict";
    case Type::Namespace: return "Namespace";
    case Type::Function: return "function";
  }
  return "object";
}

bool equals(const Value& a, const Value& b) {
  using T = Value::Type;
  if (a.is_number() && b.is_number()) {
    if (a.type == T::Float || b.type == T::Float) return a.as_double() == b.as_double();
    const int64_t x = a.type == T::Bool ? a.b : a.i, y = b.type == T::Bool ? b.b : b.i;
    return x == y;
  }
  if (a.type != b.type) return false;
  switch (a.type) {
    case T::Undefined:
    case T::None: return true;
    case T::String: return *a.s == *b.s;
    case T::List:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!equals((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case T::Dict:
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, v] : a.dict->items) {
        const Value* o = b.dict->find(k);
        if (!o || !equals(v, *o)) return false;
      }
      return true;
    default: return a.dict == b.dict && a.fn == b.fn;
  }
}

}  // namespace dsv3::jinja
