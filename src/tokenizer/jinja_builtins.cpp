#include "tokenizer/jinja_builtins.h"

#include <algorithm>
#include <cmath>
#include <ctime>

#include <fmt/format.h>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace dsv3::jinja {

void template_error(int line, const std::string& msg) { fail("line {}: {}", line, msg); }

void require_defined(const Value& v, int line) {
  if (v.is_undefined()) template_error(line, v.name);
}

std::vector<std::string> code_points(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    size_t len = utf8::valid_seq_len(s, i);
    if (len == 0) len = 1;
    out.push_back(s.substr(i, len));
    i += len;
  }
  return out;
}

namespace {

using T = Value::Type;

// ---- argument helpers

const Value* arg(CallArgs& a, size_t pos, const char* key) {
  for (auto& [k, v] : a.keyword)
    if (k == key) return &v;
  return pos < a.positional.size() ? &a.positional[pos] : nullptr;
}

std::string arg_str(CallArgs& a, size_t pos, const char* key, const std::string& dflt) {
  const Value* v = arg(a, pos, key);
  return (v && !v->is_none() && !v->is_undefined()) ? v->to_str() : dflt;
}

bool arg_bool(CallArgs& a, size_t pos, const char* key, bool dflt) {
  const Value* v = arg(a, pos, key);
  return v ? v->truthy() : dflt;
}

int64_t arg_int(CallArgs& a, size_t pos, const char* key, int64_t dflt) {
  const Value* v = arg(a, pos, key);
  if (!v || v->is_none()) return dflt;
  if (v->type == T::Int) return v->i;
  if (v->type == T::Bool) return v->b;
  if (v->type == T::Float) return int64_t(v->f);
  return dflt;
}

// ---- Python string operations on code points

bool is_space_at(const std::string& s, size_t i, size_t& len) {
  const char32_t c = utf8::decode(s, i, len);
  return utf8::valid_seq_len(s, i) != 0 && py_isspace(c);
}

std::string py_strip(const std::string& s, const Value* chars, bool left, bool right) {
  const auto cps = code_points(s);
  std::vector<std::string> set;
  const bool by_chars = chars && chars->is_string();
  if (by_chars) set = code_points(chars->str_ref());
  auto strip_it = [&](const std::string& cp) {
    if (by_chars) return std::find(set.begin(), set.end(), cp) != set.end();
    size_t len = 0;
    return is_space_at(cp, 0, len);
  };
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strip_it(cps[b])) ++b;
  if (right)
    while (e > b && strip_it(cps[e - 1])) --e;
  std::string out;
  for (size_t k = b; k < e; ++k) out += cps[k];
  return out;
}

std::vector<std::string> py_split(const std::string& s, const Value* sep, int64_t maxsplit) {
  std::vector<std::string> out;
  if (!sep || sep->is_none()) {
    size_t i = 0, len = 0;
    while (i < s.size()) {
      while (i < s.size() && is_space_at(s, i, len)) i += len;
      if (i >= s.size()) break;
      if (maxsplit >= 0 && int64_t(out.size()) == maxsplit) {
        std::string rest = s.substr(i);
        // Python keeps the remainder as is, trailing whitespace stripped.
        out.push_back(py_strip(rest, nullptr, false, true));
        return out;
      }
      size_t j = i;
      while (j < s.size() && !is_space_at(s, j, len)) j += std::max<size_t>(len, 1);
      out.push_back(s.substr(i, j - i));
      i = j;
    }
    return out;
  }
  const std::string d = sep->to_str();
  if (d.empty()) fail("empty separator");
  size_t start = 0;
  while (true) {
    if (maxsplit >= 0 && int64_t(out.size()) == maxsplit) break;
    const size_t p = s.find(d, start);
    if (p == std::string::npos) break;
    out.push_back(s.substr(start, p - start));
    start = p + d.size();
  }
  out.push_back(s.substr(start));
  return out;
}

std::string py_replace(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
  std::string out;
  if (from.empty()) {
    const auto cps = code_points(s);
    int64_t n = 0;
    for (const auto& cp : cps) {
      if (count < 0 || n < count) {
        out += to;
        ++n;
      }
      out += cp;
    }
    if (count < 0 || n < count) out += to;
    return out;
  }
  size_t start = 0;
  int64_t n = 0;
  while (count < 0 || n < count) {
    const size_t p = s.find(from, start);
    if (p == std::string::npos) break;
    out.append(s, start, p - start);
    out += to;
    start = p + from.size();
    ++n;
  }
  out.append(s, start, std::string::npos);
  return out;
}

// Case mapping covers ASCII only (dsv3 carries no Unicode case tables); other characters are unchanged.
std::string ascii_upper(std::string s) {
  for (char& c : s)
    if (c >= 'a' && c <= 'z') c = char(c - 32);
  return s;
}
std::string ascii_lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = char(c + 32);
  return s;
}
std::string py_capitalize(const std::string& s) {
  std::string out = ascii_lower(s);
  if (!out.empty() && out[0] >= 'a' && out[0] <= 'z') out[0] = char(out[0] - 32);
  return out;
}
std::string py_title(const std::string& s) {
  std::string out = s;
  bool prev_alpha = false;
  for (char& c : out) {
    const bool alpha = std::isalpha(static_cast<unsigned char>(c)) != 0;
    if (alpha) c = prev_alpha ? char(std::tolower(static_cast<unsigned char>(c))) : char(std::toupper(static_cast<unsigned char>(c)));
    prev_alpha = alpha;
  }
  return out;
}

std::vector<std::string> py_splitlines(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\n' || s[i] == '\r') {
      out.push_back(s.substr(start, i - start));
      if (s[i] == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
      start = i + 1;
    }
  }
  if (start < s.size()) out.push_back(s.substr(start));
  return out;
}

int64_t py_len(const Value& v, int line) {
  switch (v.type) {
    case T::Undefined: return 0;
    case T::String: return int64_t(code_points(v.str_ref()).size());
    case T::List: return int64_t(v.list->size());
    case T::Dict:
    case T::Namespace: return int64_t(v.dict->items.size());
    default: template_error(line, fmt::format("object of type '{}' has no len()", v.type_name()));
  }
}

bool less_than(const Value& a, const Value& b, int line) {
  if (a.is_number() && b.is_number()) return a.as_double() < b.as_double();
  if (a.is_string() && b.is_string()) return a.str_ref() < b.str_ref();
  template_error(line, fmt::format("'<' not supported between instances of '{}' and '{}'", a.type_name(), b.type_name()));
}

Value list_of(std::vector<std::string> items) {
  ValueList l;
  for (auto& s : items) l.push_back(Value::string(std::move(s)));
  return Value::make_list(std::move(l));
}

std::string json_dumps(const Value& v, CallArgs& a, int line) {
  const Value* indent_v = arg(a, 0, "indent");
  const bool have_indent = indent_v && !indent_v->is_none();
  const int indent = have_indent ? int(arg_int(a, 0, "indent", 0)) : 0;
  std::string item_sep = have_indent ? "," : ", ", key_sep = ": ";
  if (const Value* sep = arg(a, 99, "separators"); sep && sep->is_list() && sep->list->size() == 2) {
    item_sep = (*sep->list)[0].to_str();
    key_sep = (*sep->list)[1].to_str();
  }
  std::string out;
  try {
    out = v.to_json(indent, have_indent, item_sep, key_sep, arg_bool(a, 99, "sort_keys", false));
  } catch (const InputError& e) {
    template_error(line, e.what());
  }
  if (arg_bool(a, 99, "ensure_ascii", false)) {
    std::string esc;
    for (size_t i = 0; i < out.size();) {
      size_t len = 0;
      const char32_t c = utf8::decode(out, i, len);
      if (c < 0x80) esc += char(c);
      else if (c < 0x10000) esc += fmt::format("\\u{:04x}", uint32_t(c));
      else {
        const uint32_t u = uint32_t(c) - 0x10000;
        esc += fmt::format("\\u{:04x}\\u{:04x}", 0xD800 + (u >> 10), 0xDC00 + (u & 0x3FF));
      }
      i += len;
    }
    out = esc;
  }
  return out;
}

Value bound(const Value& obj, const std::string& name, int line);

}  // namespace

bool contains(const Value& c, const Value& item, int line) {
  switch (c.type) {
    case T::Undefined: return false;
    case T::String:
      if (!item.is_string())
        template_error(line, fmt::format("'in <string>' requires string as left operand, not {}", item.type_name()));
      return c.str_ref().find(item.str_ref()) != std::string::npos;
    case T::List:
      for (const auto& e : *c.list)
        if (equals(e, item)) return true;
      return false;
    case T::Dict:
      return item.is_string() && c.dict->find(item.str_ref()) != nullptr;
    default: template_error(line, fmt::format("argument of type '{}' is not iterable", c.type_name()));
  }
}

ValueList iterate(const Value& v, int line) {
  switch (v.type) {
    case T::Undefined: return {};
    case T::List: return *v.list;
    case T::Dict: {
      ValueList keys;
      for (const auto& [k, x] : v.dict->items) keys.push_back(Value::string(k));
      return keys;
    }
    case T::String: {
      ValueList out;
      for (auto& cp : code_points(v.str_ref())) out.push_back(Value::string(cp));
      return out;
    }
    default: template_error(line, fmt::format("'{}' object is not iterable", v.type_name()));
  }
}

Value get_attribute(const Value& obj, const std::string& name, int line) {
  require_defined(obj, line);
  switch (obj.type) {
    case T::Dict: {
      static const char* methods[] = {"items", "keys", "values", "get", "copy"};
      for (const char* m : methods)
        if (name == m) return bound(obj, name, line);
      if (const Value* v = obj.dict->find(name)) return *v;
      return Value::undefined(fmt::format("'dict object' has no attribute '{}'", name));
    }
    case T::Namespace:
      if (const Value* v = obj.dict->find(name)) return *v;
      return Value::undefined(fmt::format("'jinja2.utils.Namespace object' has no attribute '{}'", name));
    case T::String: {
      static const char* methods[] = {"strip", "lstrip", "rstrip", "split", "startswith", "endswith", "upper", "lower",
                                      "replace", "title", "capitalize", "find", "count", "join", "splitlines",
                                      "isdigit", "isspace"};
      for (const char* m : methods)
        if (name == m) return bound(obj, name, line);
      return Value::undefined(fmt::format("'str object' has no attribute '{}'", name));
    }
    case T::List:
      if (name == "index" || name == "count") return bound(obj, name, line);
      if (name == "append" || name == "pop" || name == "extend" || name == "insert" || name == "remove" ||
          name == "clear" || name == "sort" || name == "reverse")
        template_error(line, fmt::format("access to attribute '{}' of '{}' object is unsafe", name, obj.type_name()));
      return Value::undefined(fmt::format("'list object' has no attribute '{}'", name));
    case T::None: return Value::undefined(fmt::format("'None' has no attribute '{}'", name));
    default: return Value::undefined(fmt::format("'{} object' has no attribute '{}'", obj.type_name(), name));
  }
}

Value get_item(const Value& obj, const Value& key, int line) {
  require_defined(obj, line);
  if (obj.type == T::Dict && key.is_string()) {
    if (const Value* v = obj.dict->find(key.str_ref())) return *v;
    return get_attribute(obj, key.str_ref(), line).is_undefined()
               ? Value::undefined(fmt::format("'dict object' has no attribute '{}'", key.str_ref()))
               : get_attribute(obj, key.str_ref(), line);
  }
  if ((obj.type == T::List || obj.type == T::String) && (key.type == T::Int || key.type == T::Bool)) {
    const int64_t raw = key.type == T::Bool ? key.b : key.i;
    if (obj.type == T::List) {
      const int64_t n = int64_t(obj.list->size());
      const int64_t idx = raw < 0 ? raw + n : raw;
      if (idx < 0 || idx >= n) return Value::undefined(fmt::format("list object has no element {}", raw));
      return (*obj.list)[size_t(idx)];
    }
    const auto cps = code_points(obj.str_ref());
    const int64_t n = int64_t(cps.size());
    const int64_t idx = raw < 0 ? raw + n : raw;
    if (idx < 0 || idx >= n) return Value::undefined(fmt::format("str object has no element {}", raw));
    return Value::string(cps[size_t(idx)]);
  }
  if (key.is_string()) return get_attribute(obj, key.str_ref(), line);
  if (obj.type == T::None) return Value::undefined(fmt::format("'None' has no attribute '{}'", key.to_str()));
  return Value::undefined(fmt::format("'{} object' has no element {}", obj.type_name(), key.repr()));
}

Value get_slice(const Value& obj, const Value& start, const Value& stop, const Value& step, int line) {
  require_defined(obj, line);
  ValueList items;
  const bool is_str = obj.is_string();
  if (is_str) items = iterate(obj, line);
  else if (obj.is_list()) items = *obj.list;
  else template_error(line, fmt::format("'{}' object is not subscriptable", obj.type_name()));
  const int64_t n = int64_t(items.size());
  const int64_t st = step.is_none() || step.is_undefined() ? 1 : step.i;
  if (st == 0) template_error(line, "slice step cannot be zero");
  auto norm = [&](const Value& v, int64_t dflt) {
    if (v.is_none() || v.is_undefined()) return dflt;
    int64_t x = v.i;
    if (x < 0) x += n;
    if (st > 0) return std::clamp<int64_t>(x, 0, n);
    return std::clamp<int64_t>(x, -1, n - 1);
  };
  const int64_t b = norm(start, st > 0 ? 0 : n - 1), e = norm(stop, st > 0 ? n : -1);
  ValueList out;
  for (int64_t k = b; st > 0 ? k < e : k > e; k += st) out.push_back(items[size_t(k)]);
  if (!is_str) return Value::make_list(std::move(out), obj.is_tuple);
  std::string s;
  for (const auto& v : out) s += v.str_ref();
  return Value::string(std::move(s));
}

namespace {

Value call_method(const Value& obj, const std::string& name, CallArgs& a, int line) {
  if (obj.type == T::Dict) {
    if (name == "items") {
      ValueList l;
      for (const auto& [k, v] : obj.dict->items) l.push_back(Value::make_list({Value::string(k), v}, true));
      return Value::make_list(std::move(l));
    }
    if (name == "keys") return Value::make_list(iterate(obj, line));
    if (name == "values") {
      ValueList l;
      for (const auto& [k, v] : obj.dict->items) l.push_back(v);
      return Value::make_list(std::move(l));
    }
    if (name == "get") {
      const Value* key = arg(a, 0, "key");
      const Value* dflt = arg(a, 1, "default");
      if (key && key->is_string())
        if (const Value* v = obj.dict->find(key->str_ref())) return *v;
      return dflt ? *dflt : Value::none();
    }
    if (name == "copy") return Value::make_dict(*obj.dict);
  }
  if (obj.type == T::List) {
    const Value* x = arg(a, 0, "value");
    if (!x) template_error(line, fmt::format("list.{}() takes exactly one argument", name));
    int64_t count = 0;
    for (size_t k = 0; k < obj.list->size(); ++k) {
      if (!equals((*obj.list)[k], *x)) continue;
      if (name == "index") return Value::integer(int64_t(k));
      ++count;
    }
    if (name == "index") template_error(line, fmt::format("{} is not in list", x->repr()));
    return Value::integer(count);
  }
  const std::string& s = obj.str_ref();
  if (name == "strip") return Value::string(py_strip(s, arg(a, 0, "chars"), true, true));
  if (name == "lstrip") return Value::string(py_strip(s, arg(a, 0, "chars"), true, false));
  if (name == "rstrip") return Value::string(py_strip(s, arg(a, 0, "chars"), false, true));
  if (name == "split") return list_of(py_split(s, arg(a, 0, "sep"), arg_int(a, 1, "maxsplit", -1)));
  if (name == "splitlines") return list_of(py_splitlines(s));
  if (name == "upper") return Value::string(ascii_upper(s));
  if (name == "lower") return Value::string(ascii_lower(s));
  if (name == "title") return Value::string(py_title(s));
  if (name == "capitalize") return Value::string(py_capitalize(s));
  if (name == "replace") {
    if (a.positional.size() < 2) template_error(line, "str.replace() takes at least 2 arguments");
    return Value::string(py_replace(s, a.positional[0].to_str(), a.positional[1].to_str(), arg_int(a, 2, "count", -1)));
  }
  if (name == "startswith" || name == "endswith") {
    const Value* p = arg(a, 0, "prefix");
    if (!p) template_error(line, fmt::format("str.{}() takes at least 1 argument", name));
    ValueList options = p->is_list() ? *p->list : ValueList{*p};
    for (const auto& o : options) {
      if (!o.is_string()) template_error(line, fmt::format("{} first arg must be str or a tuple of str", name));
      const std::string& x = o.str_ref();
      if (name == "startswith" ? s.compare(0, x.size(), x) == 0
                               : (s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0))
        return Value::boolean(true);
    }
    return Value::boolean(false);
  }
  if (name == "find") {
    const std::string sub = arg_str(a, 0, "sub", "");
    const size_t p = s.find(sub);
    return Value::integer(p == std::string::npos ? -1 : int64_t(code_points(s.substr(0, p)).size()));
  }
  if (name == "count") {
    const std::string sub = arg_str(a, 0, "sub", "");
    if (sub.empty()) return Value::integer(int64_t(code_points(s).size()) + 1);
    int64_t n = 0;
    for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
    return Value::integer(n);
  }
  if (name == "join") {
    const Value* items = arg(a, 0, "iterable");
    if (!items) template_error(line, "str.join() takes exactly one argument");
    std::string out;
    bool first = true;
    for (const auto& v : iterate(*items, line)) {
      if (!v.is_string()) template_error(line, fmt::format("sequence item: expected str instance, {} found", v.type_name()));
      out += (first ? "" : s) + v.str_ref();
      first = false;
    }
    return Value::string(out);
  }
  if (name == "isdigit" || name == "isspace") {
    if (s.empty()) return Value::boolean(false);
    for (size_t i = 0; i < s.size();) {
      size_t len = 0;
      const char32_t c = utf8::decode(s, i, len);
      if (name == "isdigit" ? !(c >= '0' && c <= '9') : !py_isspace(c)) return Value::boolean(false);
      i += len;
    }
    return Value::boolean(true);
  }
  template_error(line, fmt::format("'{}' object has no method '{}'", obj.type_name(), name));
}

Value bound(const Value& obj, const std::string& name, int line) {
  return Value::function(name, [obj, name, line](CallArgs& a) { return call_method(obj, name, a, line); });
}

Value sort_key(const Value& v, const std::string& attribute, bool case_sensitive, int line) {
  Value k = attribute.empty() ? v : get_item(v, Value::string(attribute), line);
  if (!case_sensitive && k.is_string()) return Value::string(ascii_lower(k.str_ref()));
  return k;
}

}  // namespace

bool apply_test(const std::string& name, const Value& v, const ValueList& args, int line) {
  auto need = [&](size_t n) {
    if (args.size() < n) template_error(line, fmt::format("test '{}' needs {} argument(s)", name, n));
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "true") return v.type == T::Bool && v.b;
  if (name == "false") return v.type == T::Bool && !v.b;
  if (name == "boolean") return v.type == T::Bool;
  if (name == "integer") return v.type == T::Int;
  if (name == "float") return v.type == T::Float;
  if (name == "number") return v.is_number();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.is_dict();
  if (name == "iterable") return v.is_string() || v.is_list() || v.is_dict() || v.is_undefined();
  if (name == "sequence") return v.is_string() || v.is_list() || v.is_dict();
  if (name == "callable") return v.type == T::Function;
  if (name == "odd" || name == "even") {
    if (v.type != T::Int) template_error(line, fmt::format("test '{}' needs an integer", name));
    return (v.i % 2 != 0) == (name == "odd");
  }
  if (name == "divisibleby") {
    need(1);
    return args[0].i != 0 && v.i % args[0].i == 0;
  }
  if (name == "eq" || name == "equalto" || name == "==") return need(1), equals(v, args[0]);
  if (name == "ne" || name == "!=") return need(1), !equals(v, args[0]);
  if (name == "lt" || name == "<") return need(1), less_than(v, args[0], line);
  if (name == "gt" || name == ">") return need(1), less_than(args[0], v, line);
  if (name == "le" || name == "<=") return need(1), !less_than(args[0], v, line);
  if (name == "ge" || name == ">=") return need(1), !less_than(v, args[0], line);
  if (name == "in") return need(1), contains(args[0], v, line);
  if (name == "sameas") {
    need(1);
    if (v.type != args[0].type) return false;
    if (v.is_none() || v.type == T::Bool) return equals(v, args[0]);
    return v.list == args[0].list && v.dict == args[0].dict && v.s == args[0].s;
  }
  if (name == "lower") return v.is_string() && ascii_lower(v.str_ref()) == v.str_ref();
  if (name == "upper") return v.is_string() && ascii_upper(v.str_ref()) == v.str_ref();
  template_error(line, fmt::format("no test named '{}'", name));
}

Value apply_filter(const std::string& name, const Value& v, CallArgs& a, int line) {
  if (name == "default" || name == "d") {
    const Value* dflt = arg(a, 0, "default_value");
    const bool boolean = arg_bool(a, 1, "boolean", false);
    if (v.is_undefined() || (boolean && !v.truthy())) return dflt ? *dflt : Value::string("");
    return v;
  }
  if (name == "tojson") return Value::string(json_dumps(v, a, line));
  if (name == "safe") return v;
  if (name == "string") return Value::string(v.to_str());
  if (name == "length" || name == "count") return Value::integer(py_len(v, line));
  if (name == "list") return Value::make_list(iterate(v, line));
  // The rest need a defined value, as jinja2's filters raise on Undefined through str() or iteration.
  if (name == "trim") return Value::string(py_strip(v.to_str(), arg(a, 0, "chars"), true, true));
  if (name == "upper") return Value::string(ascii_upper(v.to_str()));
  if (name == "lower") return Value::string(ascii_lower(v.to_str()));
  if (name == "capitalize") return Value::string(py_capitalize(v.to_str()));
  if (name == "title") return Value::string(py_title(v.to_str()));
  if (name == "replace") {
    if (a.positional.size() < 2) template_error(line, "replace filter takes 2 arguments");
    return Value::string(py_replace(v.to_str(), a.positional[0].to_str(), a.positional[1].to_str(), arg_int(a, 2, "count", -1)));
  }
  if (name == "e" || name == "escape") {
    std::string out;
    for (char c : v.to_str()) {
      switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&#34;"; break;
        case '\'': out += "&#39;"; break;
        default: out += c;
      }
    }
    return Value::string(out);
  }
  if (name == "indent") {
    const Value* w = arg(a, 0, "width");
    const std::string ind = (w && w->is_string()) ? w->str_ref() : std::string(size_t(arg_int(a, 0, "width", 4)), ' ');
    const bool first = arg_bool(a, 1, "first", false), blank = arg_bool(a, 2, "blank", false);
    const auto lines = py_splitlines(v.to_str() + "\n");
    std::string rv;
    if (blank) {
      for (size_t k = 0; k < lines.size(); ++k) rv += (k ? "\n" + ind : "") + lines[k];
    } else if (!lines.empty()) {
      rv = lines[0];
      for (size_t k = 1; k < lines.size(); ++k) rv += "\n" + (lines[k].empty() ? "" : ind) + lines[k];
    }
    return Value::string(first ? ind + rv : rv);
  }
  if (name == "wordcount") return Value::integer(int64_t(py_split(v.to_str(), nullptr, -1).size()));
  if (name == "int") {
    if (v.type == T::Int) return v;
    if (v.type == T::Float) return Value::integer(int64_t(v.f));
    if (v.type == T::Bool) return Value::integer(v.b);
    try {
      return Value::integer(std::stoll(py_strip(v.to_str(), nullptr, true, true)));
    } catch (...) {
      return Value::integer(arg_int(a, 0, "default", 0));
    }
  }
  if (name == "float") {
    if (v.is_number()) return Value::number(v.as_double());
    try {
      return Value::number(std::stod(py_strip(v.to_str(), nullptr, true, true)));
    } catch (...) {
      return Value::number(0);
    }
  }
  if (name == "abs") {
    if (v.type == T::Int) return Value::integer(v.i < 0 ? -v.i : v.i);
    return Value::number(std::fabs(v.as_double()));
  }
  if (name == "round") {
    const int64_t prec = arg_int(a, 0, "precision", 0);
    const double m = std::pow(10.0, double(prec));
    return Value::number(std::round(v.as_double() * m) / m);
  }
  if (name == "items") {
    require_defined(v, line);
    if (!v.is_dict()) template_error(line, "items filter needs a mapping");
    CallArgs none;
    return call_method(v, "items", none, line);
  }
  if (name == "first" || name == "last") {
    const ValueList items = iterate(v, line);
    if (items.empty()) return Value::undefined(fmt::format("No {} item, sequence was empty.", name));
    return name == "first" ? items.front() : items.back();
  }
  if (name == "join") {
    const std::string sep = arg_str(a, 0, "d", "");
    const std::string attribute = arg_str(a, 1, "attribute", "");
    std::string out;
    bool first = true;
    for (const auto& item : iterate(v, line)) {
      const Value x = attribute.empty() ? item : get_item(item, Value::string(attribute), line);
      out += (first ? "" : sep) + x.to_str();
      first = false;
    }
    return Value::string(out);
  }
  if (name == "reverse") {
    if (v.is_string()) {
      auto cps = code_points(v.str_ref());
      std::string out;
      for (auto it = cps.rbegin(); it != cps.rend(); ++it) out += *it;
      return Value::string(out);
    }
    ValueList items = iterate(v, line);
    std::reverse(items.begin(), items.end());
    return Value::make_list(std::move(items));
  }
  if (name == "sort" || name == "unique" || name == "min" || name == "max") {
    const bool reverse = arg_bool(a, 0, "reverse", false);
    const bool case_sensitive = arg_bool(a, name == "sort" ? 1 : 0, "case_sensitive", false);
    const std::string attribute = arg_str(a, name == "sort" ? 2 : 1, "attribute", "");
    ValueList items = iterate(v, line);
    if (name == "unique") {
      ValueList out, keys;
      for (const auto& x : items) {
        const Value k = sort_key(x, attribute, case_sensitive, line);
        bool seen = false;
        for (const auto& s : keys) seen = seen || equals(s, k);
        if (!seen) {
          keys.push_back(k);
          out.push_back(x);
        }
      }
      return Value::make_list(std::move(out));
    }
    std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
      return less_than(sort_key(x, attribute, case_sensitive, line), sort_key(y, attribute, case_sensitive, line), line);
    });
    if (name == "min") return items.empty() ? Value::undefined("No aggregated item, sequence was empty.") : items.front();
    if (name == "max") return items.empty() ? Value::undefined("No aggregated item, sequence was empty.") : items.back();
    if (reverse) std::reverse(items.begin(), items.end());
    return Value::make_list(std::move(items));
  }
  if (name == "sum") {
    const std::string attribute = arg_str(a, 0, "attribute", "");
    const Value* start = arg(a, 1, "start");
    Value acc = start ? *start : Value::integer(0);
    for (const auto& x : iterate(v, line)) {
      const Value y = attribute.empty() ? x : get_item(x, Value::string(attribute), line);
      if (acc.type == T::Int && y.type == T::Int) acc = Value::integer(acc.i + y.i);
      else acc = Value::number(acc.as_double() + y.as_double());
    }
    return acc;
  }
  if (name == "map") {
    ValueList out;
    const Value* attribute = arg(a, 99, "attribute");
    for (const auto& x : iterate(v, line)) {
      if (attribute) {
        Value y = get_item(x, *attribute, line);
        if (y.is_undefined())
          if (const Value* d = arg(a, 99, "default")) y = *d;
        out.push_back(y);
      } else {
        if (a.positional.empty()) template_error(line, "map needs a filter name or attribute=");
        CallArgs rest;
        rest.positional.assign(a.positional.begin() + 1, a.positional.end());
        rest.keyword = a.keyword;
        out.push_back(apply_filter(a.positional[0].to_str(), x, rest, line));
      }
    }
    return Value::make_list(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    const bool by_attr = name == "selectattr" || name == "rejectattr";
    const bool keep_when = name == "select" || name == "selectattr";
    const size_t test_pos = by_attr ? 1 : 0;
    if (by_attr && a.positional.empty()) template_error(line, fmt::format("{} needs an attribute name", name));
    ValueList out;
    for (const auto& x : iterate(v, line)) {
      const Value y = by_attr ? get_item(x, a.positional[0], line) : x;
      bool ok;
      if (a.positional.size() > test_pos) {
        ValueList targs(a.positional.begin() + long(test_pos) + 1, a.positional.end());
        ok = apply_test(a.positional[test_pos].to_str(), y, targs, line);
      } else {
        ok = y.truthy();
      }
      if (ok == keep_when) out.push_back(x);
    }
    return Value::make_list(std::move(out));
  }
  if (name == "attr") return get_attribute(v, arg_str(a, 0, "name", ""), line);
  if (name == "dictsort") {
    if (!v.is_dict()) template_error(line, "dictsort needs a mapping");
    auto items = v.dict->items;
    std::stable_sort(items.begin(), items.end(), [](const auto& x, const auto& y) { return ascii_lower(x.first) < ascii_lower(y.first); });
    ValueList out;
    for (auto& [k, x] : items) out.push_back(Value::make_list({Value::string(k), x}, true));
    return Value::make_list(std::move(out));
  }
  template_error(line, fmt::format("no filter named '{}'", name));
}

Dict make_globals() {
  Dict g;
  g.set("raise_exception", Value::function("raise_exception", [](CallArgs& a) -> Value {
          fail("raise_exception: {}", a.positional.empty() ? std::string() : a.positional[0].to_str());
        }));
  g.set("strftime_now", Value::function("strftime_now", [](CallArgs& a) -> Value {
          const std::time_t now = std::time(nullptr);
          std::tm tm{};
          localtime_r(&now, &tm);
          char buf[256];
          const std::string f = a.positional.empty() ? std::string() : a.positional[0].to_str();
          const size_t n = std::strftime(buf, sizeof buf, f.c_str(), &tm);
          return Value::string(std::string(buf, n));
        }));
  auto make_dict_from_args = [](CallArgs& a) {
    Dict d;
    for (const auto& p : a.positional) {
      if (p.is_dict())
        for (const auto& [k, v] : p.dict->items) d.set(k, v);
    }
    for (const auto& [k, v] : a.keyword) d.set(k, v);
    return d;
  };
  g.set("namespace", Value::function("namespace", [make_dict_from_args](CallArgs& a) {
          return Value::make_namespace(make_dict_from_args(a));
        }));
  g.set("dict", Value::function("dict", [make_dict_from_args](CallArgs& a) { return Value::make_dict(make_dict_from_args(a)); }));
  g.set("range", Value::function("range", [](CallArgs& a) -> Value {
          int64_t start = 0, stop = 0, step = 1;
          auto num = [&](size_t k) { return a.positional[k].type == T::Int ? a.positional[k].i : int64_t(a.positional[k].as_double()); };
          if (a.positional.size() == 1) stop = num(0);
          else if (a.positional.size() >= 2) {
            start = num(0);
            stop = num(1);
            if (a.positional.size() >= 3) step = num(2);
          }
          if (step == 0) fail("range() arg 3 must not be zero");
          ValueList out;
          for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
            out.push_back(Value::integer(k));
            if (out.size() > 1000000) fail("range() too large for a template");
          }
          return Value::make_list(std::move(out));
        }));
  return g;
}

}  // namespace dsv3::jinja
