// Evaluator of the Jinja subset: statements with jinja2's scoping (each for-loop iteration and each macro
// call gets its own scope, so {% set %} inside them does not leak out; namespaces are how templates carry
// state across iterations) and expressions with Python semantics.
#include <cmath>
#include <unordered_map>

#include <fmt/format.h>

#include "core/error.h"
#include "tokenizer/jinja.h"
#include "tokenizer/jinja_builtins.h"

namespace dsv3::jinja {
namespace {

using T = Value::Type;

class Renderer {
 public:
  explicit Renderer(const nlohmann::ordered_json& vars) {
    scopes_.emplace_back();
    for (auto& [k, v] : make_globals().items) globals_[k] = v;
    for (const auto& [k, v] : vars.items()) scopes_[0][k] = Value::from_json(v);
  }

  std::string run(const Body& body) {
    std::string out;
    exec_body(body, out);
    return out;
  }

 private:
  enum class Flow { Normal, Break, Continue };

  Flow exec_body(const Body& body, std::string& out) {
    for (const auto& s : body) {
      const Flow f = exec(*s, out);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Flow exec(const Stmt& s, std::string& out) {
    switch (s.kind) {
      case Stmt::Kind::Text: out += s.text; return Flow::Normal;
      case Stmt::Kind::Output: out += eval(*s.expr).to_str(); return Flow::Normal;
      case Stmt::Kind::If:
        for (const auto& [cond, body] : s.branches)
          if (eval(*cond).truthy()) return exec_body(body, out);
        return exec_body(s.else_body, out);
      case Stmt::Kind::For: return exec_for(s, out);
      case Stmt::Kind::Set: {
        Value v = eval(*s.expr);
        if (!s.attr.empty()) {
          Value ns = lookup(s.targets[0]);
          if (ns.type != T::Namespace) template_error(s.line, "cannot assign attribute on non-namespace object");
          ns.dict->set(s.attr, std::move(v));
        } else {
          assign_targets(s.targets, v, s.line);
        }
        return Flow::Normal;
      }
      case Stmt::Kind::SetBlock: {
        std::string text;
        exec_body(s.body, text);
        scopes_.back()[s.targets[0]] = Value::string(std::move(text));
        return Flow::Normal;
      }
      case Stmt::Kind::Macro: define_macro(s); return Flow::Normal;
      case Stmt::Kind::Break: return Flow::Break;
      case Stmt::Kind::Continue: return Flow::Continue;
      case Stmt::Kind::Block: return exec_body(s.body, out);
    }
    return Flow::Normal;
  }

  void assign_targets(const std::vector<std::string>& targets, const Value& v, int line) {
    if (targets.size() == 1) {
      scopes_.back()[targets[0]] = v;
      return;
    }
    const ValueList items = iterate(v, line);
    if (items.size() != targets.size())
      template_error(line, fmt::format("cannot unpack {} values into {} names", items.size(), targets.size()));
    for (size_t k = 0; k < targets.size(); ++k) scopes_.back()[targets[k]] = items[k];
  }

  Flow exec_for(const Stmt& s, std::string& out) {
    ValueList items = iterate(eval(*s.expr), s.line);
    if (s.filter) {  // {% for x in xs if cond %}: filtered before loop.index and loop.length are known
      ValueList kept;
      for (const auto& item : items) {
        scopes_.emplace_back();
        assign_targets(s.targets, item, s.line);
        const bool keep = eval(*s.filter).truthy();
        scopes_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t n = int64_t(items.size());
    for (int64_t k = 0; k < n; ++k) {
      scopes_.emplace_back();
      assign_targets(s.targets, items[size_t(k)], s.line);
      Dict loop;
      loop.set("index", Value::integer(k + 1));
      loop.set("index0", Value::integer(k));
      loop.set("revindex", Value::integer(n - k));
      loop.set("revindex0", Value::integer(n - k - 1));
      loop.set("first", Value::boolean(k == 0));
      loop.set("last", Value::boolean(k == n - 1));
      loop.set("length", Value::integer(n));
      loop.set("depth", Value::integer(1));
      loop.set("depth0", Value::integer(0));
      loop.set("previtem", k > 0 ? items[size_t(k - 1)] : Value::undefined("there is no previous item"));
      loop.set("nextitem", k + 1 < n ? items[size_t(k + 1)] : Value::undefined("there is no next item"));
      loop.set("cycle", Value::function("cycle", [k](CallArgs& a) -> Value {
                 if (a.positional.empty()) fail("no items for cycling given");
                 return a.positional[size_t(k) % a.positional.size()];
               }));
      scopes_.back()["loop"] = Value::make_dict(std::move(loop));
      const Flow f = exec_body(s.body, out);
      scopes_.pop_back();
      if (f == Flow::Break) break;
    }
    if (n == 0) exec_body(s.else_body, out);
    return Flow::Normal;
  }

  void define_macro(const Stmt& s) {
    const Stmt* def = &s;
    scopes_.back()[s.name] = Value::function(s.name, [this, def](CallArgs& a) {
      std::unordered_map<std::string, Value> frame;
      for (size_t k = 0; k < def->params.size(); ++k) {
        const auto& [pname, dflt] = def->params[k];
        const Value* given = k < a.positional.size() ? &a.positional[k] : nullptr;
        for (const auto& [key, v] : a.keyword)
          if (key == pname) given = &v;
        frame[pname] = given ? *given : dflt ? eval(*dflt) : Value::undefined(fmt::format("parameter '{}' was not provided", pname));
      }
      if (macro_depth_ >= kMaxMacroDepth) fail("macro '{}' nests deeper than {} calls", def->name, kMaxMacroDepth);
      ++macro_depth_;
      // A macro sees the template's top-level variables and its parameters, not the caller's locals.
      const size_t saved_barrier = barrier_;
      barrier_ = scopes_.size();
      scopes_.push_back(std::move(frame));
      std::string text;
      exec_body(def->body, text);
      scopes_.pop_back();
      barrier_ = saved_barrier;
      --macro_depth_;
      return Value::string(std::move(text));
    });
  }

  Value lookup(const std::string& name) const {
    for (size_t k = scopes_.size(); k-- > 0;) {
      if (k < barrier_ && k != 0) continue;
      auto it = scopes_[k].find(name);
      if (it != scopes_[k].end()) return it->second;
    }
    auto g = globals_.find(name);
    if (g != globals_.end()) return g->second;
    return Value::undefined(fmt::format("'{}' is undefined", name));
  }

  CallArgs eval_args(const Expr& e, size_t first) {
    CallArgs a;
    for (size_t k = first; k < e.args.size(); ++k) a.positional.push_back(eval(*e.args[k]));
    for (const auto& [key, x] : e.kwargs) a.keyword.emplace_back(key, eval(*x));
    return a;
  }

  Value eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::Literal: return e.value;
      case Expr::Kind::Name: return lookup(e.name);
      case Expr::Kind::List:
      case Expr::Kind::Tuple: {
        ValueList l;
        for (const auto& x : e.args) l.push_back(eval(*x));
        return Value::make_list(std::move(l), e.kind == Expr::Kind::Tuple);
      }
      case Expr::Kind::Dict: {
        Dict d;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          const Value key = eval(*e.args[k]);
          if (!key.is_string()) template_error(e.line, "dict keys must be strings in dsv3's template interpreter");
          d.set(key.str_ref(), eval(*e.args[k + 1]));
        }
        return Value::make_dict(std::move(d));
      }
      case Expr::Kind::Attr: return get_attribute(eval(*e.args[0]), e.name, e.line);
      case Expr::Kind::Item: return get_item(eval(*e.args[0]), eval(*e.args[1]), e.line);
      case Expr::Kind::Slice: {
        auto part = [&](size_t k) { return e.args[k] ? eval(*e.args[k]) : Value::none(); };
        return get_slice(eval(*e.args[0]), part(1), part(2), part(3), e.line);
      }
      case Expr::Kind::Call: {
        const Value callee = eval(*e.args[0]);
        require_defined(callee, e.line);
        if (callee.type != T::Function) template_error(e.line, fmt::format("'{}' object is not callable", callee.type_name()));
        CallArgs a = eval_args(e, 1);
        return with_line(e.line, [&] { return (*callee.fn)(a); });
      }
      case Expr::Kind::Filter: {
        const Value v = eval(*e.args[0]);
        CallArgs a = eval_args(e, 1);
        return with_line(e.line, [&] { return apply_filter(e.name, v, a, e.line); });
      }
      case Expr::Kind::Test: {
        const Value v = eval(*e.args[0]);
        ValueList args;
        for (size_t k = 1; k < e.args.size(); ++k) args.push_back(eval(*e.args[k]));
        return Value::boolean(apply_test(e.name, v, args, e.line) != e.negated);
      }
      case Expr::Kind::Unary: {
        const Value v = eval(*e.args[0]);
        if (e.name == "not") return Value::boolean(!v.truthy());
        require_defined(v, e.line);
        if (v.type == T::Int) return Value::integer(e.name == "-" ? -v.i : v.i);
        if (v.type == T::Bool) return Value::integer(e.name == "-" ? -int64_t(v.b) : v.b);
        if (v.type == T::Float) return Value::number(e.name == "-" ? -v.f : v.f);
        template_error(e.line, fmt::format("bad operand type for unary {}: '{}'", e.name, v.type_name()));
      }
      case Expr::Kind::Binary: return eval_binary(e);
      case Expr::Kind::Compare: {
        Value left = eval(*e.args[0]);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k + 1]);
          if (!compare(e.ops[k], left, right, e.line)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case Expr::Kind::Cond:
        if (eval(*e.args[0]).truthy()) return eval(*e.args[1]);
        return e.args[2] ? eval(*e.args[2]) : Value::undefined("the conditional expression had no else branch");
    }
    return Value::undefined();
  }

  // Errors raised inside functions and filters get the template line.
  template <typename F>
  Value with_line(int line, F&& f) {
    try {
      return f();
    } catch (const InputError& err) {
      const std::string msg = err.what();
      if (msg.rfind("line ", 0) == 0) throw;
      template_error(line, msg);
    }
  }

  bool compare(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "==") return equals(a, b);
    if (op == "!=") return !equals(a, b);
    if (op == "in") return contains(b, a, line);
    if (op == "not in") return !contains(b, a, line);
    require_defined(a, line);
    require_defined(b, line);
    auto lt = [&](const Value& x, const Value& y) {
      if (x.is_number() && y.is_number()) return x.as_double() < y.as_double();
      if (x.is_string() && y.is_string()) return x.str_ref() < y.str_ref();
      template_error(line, fmt::format("'{}' not supported between instances of '{}' and '{}'", op, a.type_name(), b.type_name()));
    };
    if (op == "<") return lt(a, b);
    if (op == ">") return lt(b, a);
    if (op == "<=") return !lt(b, a);
    return !lt(a, b);  // >=
  }

  Value eval_binary(const Expr& e) {
    const std::string& op = e.name;
    if (op == "and") {
      Value a = eval(*e.args[0]);
      return a.truthy() ? eval(*e.args[1]) : a;
    }
    if (op == "or") {
      Value a = eval(*e.args[0]);
      return a.truthy() ? a : eval(*e.args[1]);
    }
    const Value a = eval(*e.args[0]);
    const Value b = eval(*e.args[1]);
    if (op == "~") return Value::string(a.to_str() + b.to_str());
    require_defined(a, e.line);
    require_defined(b, e.line);
    auto type_error = [&]() -> Value {
      if (op == "+" && a.is_string())
        template_error(e.line, fmt::format("can only concatenate str (not \"{}\") to str", b.type_name()));
      if (op == "+" && a.is_list() && !a.is_tuple)
        template_error(e.line, fmt::format("can only concatenate list (not \"{}\") to list", b.type_name()));
      template_error(e.line, fmt::format("unsupported operand type(s) for {}: '{}' and '{}'", op, a.type_name(), b.type_name()));
    };
    if (op == "+") {
      if (a.is_string() && b.is_string()) return Value::string(a.str_ref() + b.str_ref());
      if (a.is_list() && b.is_list() && a.is_tuple == b.is_tuple) {
        ValueList l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        return Value::make_list(std::move(l), a.is_tuple);
      }
    }
    if (op == "*") {
      const Value* seq = a.is_string() || a.is_list() ? &a : (b.is_string() || b.is_list()) ? &b : nullptr;
      const Value* cnt = seq == &a ? &b : &a;
      if (seq && (cnt->type == T::Int || cnt->type == T::Bool)) {
        const int64_t n = cnt->type == T::Int ? cnt->i : cnt->b;
        if (seq->is_string()) {
          std::string out;
          for (int64_t k = 0; k < n; ++k) out += seq->str_ref();
          return Value::string(out);
        }
        ValueList l;
        for (int64_t k = 0; k < n; ++k) l.insert(l.end(), seq->list->begin(), seq->list->end());
        return Value::make_list(std::move(l), seq->is_tuple);
      }
    }
    if (!a.is_number() || !b.is_number()) return type_error();
    const bool ints = a.type != T::Float && b.type != T::Float;
    const int64_t x = a.type == T::Bool ? a.b : a.i, y = b.type == T::Bool ? b.b : b.i;
    const double fx = a.as_double(), fy = b.as_double();
    if (op == "+") return ints ? Value::integer(x + y) : Value::number(fx + fy);
    if (op == "-") return ints ? Value::integer(x - y) : Value::number(fx - fy);
    if (op == "*") return ints ? Value::integer(x * y) : Value::number(fx * fy);
    if (op == "/") {
      if (fy == 0) template_error(e.line, "division by zero");
      return Value::number(fx / fy);
    }
    if (op == "//" || op == "%") {
      if (fy == 0) template_error(e.line, op == "//" ? "integer division or modulo by zero" : "modulo by zero");
      if (ints) {
        int64_t q = x / y, r = x % y;
        if (r != 0 && ((r < 0) != (y < 0))) {  // Python floors toward negative infinity
          --q;
          r += y;
        }
        return Value::integer(op == "//" ? q : r);
      }
      const double q = std::floor(fx / fy);
      return Value::number(op == "//" ? q : fx - q * fy);
    }
    if (op == "**") {
      if (ints && y >= 0) {
        int64_t r = 1;
        for (int64_t k = 0; k < y; ++k) r *= x;
        return Value::integer(r);
      }
      return Value::number(std::pow(fx, fy));
    }
    return type_error();
  }

  std::vector<std::unordered_map<std::string, Value>> scopes_;
  std::unordered_map<std::string, Value> globals_;
  size_t barrier_ = 0;  // scopes below this index (except the top level) are hidden inside a macro call
  static constexpr int kMaxMacroDepth = 200;  // a runaway recursive macro fails instead of overflowing the stack
  int macro_depth_ = 0;
};

}  // namespace

std::string render(const Body& body, const nlohmann::ordered_json& variables) {
  return Renderer(variables).run(body);
}

Template::Template(const std::string& source) : body_(parse(source)) {}
Template::~Template() = default;

std::string Template::render(const nlohmann::ordered_json& variables) const { return jinja::render(body_, variables); }

}  // namespace dsv3::jinja
