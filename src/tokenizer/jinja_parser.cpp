// Parser for the Jinja subset: statements by recursive descent over the lexer's tokens, expressions with
// jinja2's precedence (condexpr < or < and < not < compare < +,- < ~ < *,/,//,% < ** < unary < postfix,
// filters and tests).
#include <set>

#include <fmt/format.h>

#include "core/error.h"
#include "tokenizer/jinja.h"
#include "tokenizer/jinja_lexer.h"

namespace dsv3::jinja {
namespace {

using K = Token::Kind;

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  Body parse_template() {
    std::string end;
    Body body = parse_body({}, end);
    return body;
  }

 private:
  const Token& cur() const { return t_[p_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool is_op(const char* op) const { return cur().kind == K::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().kind == K::Name && cur().text == n; }
  [[noreturn]] void error(const std::string& msg) const { fail("line {}: {}", cur().line, msg); }
  std::string describe(const Token& t) const {
    switch (t.kind) {
      case K::End: return "end of template";
      case K::BlockEnd: return "end of statement block";
      case K::VarEnd: return "end of print statement";
      case K::Data: return "template data";
      default: return fmt::format("{:?}", t.text);
    }
  }
  void expect_op(const char* op) {
    if (!is_op(op)) error(fmt::format("expected {:?}, got {}", op, describe(cur())));
    ++p_;
  }
  std::string expect_name() {
    if (cur().kind != K::Name) error(fmt::format("expected a name, got {}", describe(cur())));
    return t_[p_++].text;
  }
  void expect_block_end() {
    if (cur().kind != K::BlockEnd) error(fmt::format("expected end of statement block, got {}", describe(cur())));
    ++p_;
  }

  // Statements until a {% name %} with name in ends; that name is consumed and returned in `end`.
  Body parse_body(const std::set<std::string>& ends, std::string& end) {
    if (++depth_ > kMaxDepth) error(fmt::format("blocks nested deeper than {} levels", kMaxDepth));
    struct Leave {
      int& d;
      ~Leave() { --d; }
    } leave{depth_};
    Body body;
    while (true) {
      const Token& tok = cur();
      if (tok.kind == K::End) {
        if (!ends.empty()) error(fmt::format("unexpected end of template, expected one of: {}", join(ends)));
        return body;
      }
      if (tok.kind == K::Data) {
        auto s = make_stmt(Stmt::Kind::Text);
        s->text = tok.text;
        body.push_back(std::move(s));
        ++p_;
      } else if (tok.kind == K::VarBegin) {
        ++p_;
        auto s = make_stmt(Stmt::Kind::Output);
        s->expr = parse_tuple();
        if (cur().kind != K::VarEnd) error(fmt::format("expected end of print statement, got {}", describe(cur())));
        ++p_;
        body.push_back(std::move(s));
      } else if (tok.kind == K::BlockBegin) {
        ++p_;
        if (cur().kind != K::Name) error("expected a statement name after {%");
        const std::string kw = cur().text;
        if (ends.count(kw)) {
          ++p_;
          end = kw;
          return body;
        }
        body.push_back(parse_statement());
      } else {
        error(fmt::format("unexpected {}", describe(tok)));
      }
    }
  }

  static std::string join(const std::set<std::string>& s) {
    std::string out;
    for (const auto& x : s) out += (out.empty() ? "" : ", ") + x;
    return out;
  }

  StmtPtr make_stmt(Stmt::Kind k) {
    auto s = std::make_unique<Stmt>();
    s->kind = k;
    s->line = cur().line;
    return s;
  }

  StmtPtr parse_statement() {
    const std::string kw = expect_name();
    if (kw == "if") return parse_if();
    if (kw == "for") return parse_for();
    if (kw == "set") return parse_set();
    if (kw == "macro") return parse_macro();
    if (kw == "break" || kw == "continue") {
      auto s = make_stmt(kw == "break" ? Stmt::Kind::Break : Stmt::Kind::Continue);
      expect_block_end();
      return s;
    }
    if (kw == "generation") {  // transformers' assistant-mask extension: renders its body
      auto s = make_stmt(Stmt::Kind::Block);
      expect_block_end();
      std::string end;
      s->body = parse_body({"endgeneration"}, end);
      expect_block_end();
      return s;
    }
    --p_;
    error(fmt::format("unsupported or unexpected tag {:?}", kw));
  }

  StmtPtr parse_if() {
    auto s = make_stmt(Stmt::Kind::If);
    ExprPtr cond = parse_tuple(false);
    expect_block_end();
    while (true) {
      std::string end;
      Body body = parse_body({"elif", "else", "endif"}, end);
      s->branches.emplace_back(std::move(cond), std::move(body));
      if (end == "elif") {
        cond = parse_tuple(false);
        expect_block_end();
        continue;
      }
      if (end == "else") {
        expect_block_end();
        std::string end2;
        s->else_body = parse_body({"endif"}, end2);
      }
      expect_block_end();
      return s;
    }
  }

  StmtPtr parse_for() {
    auto s = make_stmt(Stmt::Kind::For);
    const bool paren = is_op("(");
    if (paren) ++p_;
    s->targets.push_back(expect_name());
    while (is_op(",")) {
      ++p_;
      if (cur().kind != K::Name) break;
      s->targets.push_back(expect_name());
    }
    if (paren) expect_op(")");
    if (!is_name("in")) error(fmt::format("expected 'in' in for loop, got {}", describe(cur())));
    ++p_;
    s->expr = parse_tuple(false);
    if (is_name("if")) {
      ++p_;
      s->filter = parse_expression();
    }
    if (is_name("recursive")) error("recursive for loops are not supported");
    expect_block_end();
    std::string end;
    s->body = parse_body({"else", "endfor"}, end);
    if (end == "else") {
      expect_block_end();
      std::string end2;
      s->else_body = parse_body({"endfor"}, end2);
    }
    expect_block_end();
    return s;
  }

  StmtPtr parse_set() {
    auto s = make_stmt(Stmt::Kind::Set);
    s->targets.push_back(expect_name());
    if (is_op(".")) {
      ++p_;
      s->attr = expect_name();
    } else {
      while (is_op(",")) {
        ++p_;
        s->targets.push_back(expect_name());
      }
    }
    if (is_op("=")) {
      ++p_;
      s->expr = parse_tuple();
      expect_block_end();
      return s;
    }
    if (!s->attr.empty() || s->targets.size() != 1) error("a {% set %} block takes a single name");
    if (is_op("|")) error("filters on {% set %} blocks are not supported");
    expect_block_end();
    s->kind = Stmt::Kind::SetBlock;
    std::string end;
    s->body = parse_body({"endset"}, end);
    expect_block_end();
    return s;
  }

  StmtPtr parse_macro() {
    auto s = make_stmt(Stmt::Kind::Macro);
    s->name = expect_name();
    expect_op("(");
    while (!is_op(")")) {
      std::string param = expect_name();
      ExprPtr dflt;
      if (is_op("=")) {
        ++p_;
        dflt = parse_expression();
      }
      s->params.emplace_back(std::move(param), std::move(dflt));
      if (!is_op(",")) break;
      ++p_;
    }
    expect_op(")");
    expect_block_end();
    std::string end;
    s->body = parse_body({"endmacro"}, end);
    if (cur().kind == K::Name) ++p_;  // {% endmacro name %}
    expect_block_end();
    return s;
  }

  // ---- expressions

  ExprPtr node(Expr::Kind k, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    e->line = line;
    return e;
  }

  // expression, or a tuple of them when commas follow (as jinja2's parse_tuple)
  ExprPtr parse_tuple(bool with_condexpr = true) {
    const int line = cur().line;
    ExprPtr first = parse_expression(with_condexpr);
    if (!is_op(",")) return first;
    auto t = node(Expr::Kind::Tuple, line);
    t->args.push_back(std::move(first));
    while (is_op(",")) {
      ++p_;
      if (cur().kind == K::VarEnd || cur().kind == K::BlockEnd || is_op(")")) break;
      t->args.push_back(parse_expression(with_condexpr));
    }
    return t;
  }

  ExprPtr parse_expression(bool with_condexpr = true) {
    ExprPtr e = parse_or();
    if (!with_condexpr) return e;
    while (is_name("if")) {
      const int line = cur().line;
      ++p_;
      auto c = node(Expr::Kind::Cond, line);
      c->args.push_back(parse_or());
      c->args.push_back(std::move(e));
      if (is_name("else")) {
        ++p_;
        c->args.push_back(parse_expression());
      } else {
        c->args.push_back(nullptr);
      }
      e = std::move(c);
    }
    return e;
  }

  ExprPtr binary(const std::string& op, ExprPtr a, ExprPtr b, int line) {
    auto e = node(Expr::Kind::Binary, line);
    e->name = op;
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (is_name("or")) {
      const int line = cur().line;
      ++p_;
      e = binary("or", std::move(e), parse_and(), line);
    }
    return e;
  }

  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (is_name("and")) {
      const int line = cur().line;
      ++p_;
      e = binary("and", std::move(e), parse_not(), line);
    }
    return e;
  }

  ExprPtr parse_not() {
    if (is_name("not")) {
      auto e = node(Expr::Kind::Unary, cur().line);
      ++p_;
      e->name = "not";
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    const int line = cur().line;
    ExprPtr first = parse_math1();
    std::unique_ptr<Expr> cmp;
    while (true) {
      std::string op;
      if (cur().kind == K::Op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                  cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        op = cur().text;
        ++p_;
      } else if (is_name("in")) {
        op = "in";
        ++p_;
      } else if (is_name("not") && peek().kind == K::Name && peek().text == "in") {
        op = "not in";
        p_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(Expr::Kind::Compare, line);
        cmp->args.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(first);
  }

  // One precedence level of left-associative binary operators: operand (op operand)*.
  ExprPtr parse_left(std::initializer_list<const char*> ops, ExprPtr (Parser::*operand)()) {
    ExprPtr e = (this->*operand)();
    for (;;) {
      const char* hit = nullptr;
      for (const char* op : ops)
        if (is_op(op)) hit = op;
      if (!hit) return e;
      const int line = cur().line;
      ++p_;
      e = binary(hit, std::move(e), (this->*operand)(), line);
    }
  }
  ExprPtr parse_math1() { return parse_left({"+", "-"}, &Parser::parse_concat); }
  ExprPtr parse_concat() { return parse_left({"~"}, &Parser::parse_math2); }
  ExprPtr parse_math2() { return parse_left({"*", "/", "//", "%"}, &Parser::parse_pow); }
  ExprPtr parse_pow() { return parse_left({"**"}, &Parser::parse_unary_filtered); }
  ExprPtr parse_unary_filtered() { return parse_unary(true); }

  ExprPtr parse_unary(bool with_filter = true) {
    // Every nested expression passes through here; bound the depth so hostile input cannot overflow the stack.
    if (++depth_ > kMaxDepth) error(fmt::format("expression nested deeper than {} levels", kMaxDepth));
    struct Leave {
      int& d;
      ~Leave() { --d; }
    } leave{depth_};
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      e = node(Expr::Kind::Unary, cur().line);
      e->name = cur().text;
      ++p_;
      e->args.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token& tok = cur();
    const int line = tok.line;
    if (tok.kind == K::Name) {
      ++p_;
      auto e = node(Expr::Kind::Literal, line);
      if (tok.text == "true" || tok.text == "True") e->value = Value::boolean(true);
      else if (tok.text == "false" || tok.text == "False") e->value = Value::boolean(false);
      else if (tok.text == "none" || tok.text == "None") e->value = Value::none();
      else {
        e->kind = Expr::Kind::Name;
        e->name = tok.text;
      }
      return e;
    }
    if (tok.kind == K::String) {
      std::string s;
      while (cur().kind == K::String) s += t_[p_++].text;  // adjacent literals concatenate
      auto e = node(Expr::Kind::Literal, line);
      e->value = Value::string(std::move(s));
      return e;
    }
    if (tok.kind == K::Int || tok.kind == K::Float) {
      ++p_;
      auto e = node(Expr::Kind::Literal, line);
      e->value = tok.kind == K::Int ? Value::integer(tok.int_value) : Value::number(tok.float_value);
      return e;
    }
    if (is_op("(")) {
      ++p_;
      if (is_op(")")) {
        ++p_;
        return node(Expr::Kind::Tuple, line);
      }
      ExprPtr first = parse_expression();
      if (is_op(")")) {
        ++p_;
        return first;
      }
      auto t = node(Expr::Kind::Tuple, line);
      t->args.push_back(std::move(first));
      while (is_op(",")) {
        ++p_;
        if (is_op(")")) break;
        t->args.push_back(parse_expression());
      }
      expect_op(")");
      return t;
    }
    if (is_op("[")) {
      ++p_;
      auto l = node(Expr::Kind::List, line);
      while (!is_op("]")) {
        l->args.push_back(parse_expression());
        if (!is_op(",")) break;
        ++p_;
      }
      expect_op("]");
      return l;
    }
    if (is_op("{")) {
      ++p_;
      auto d = node(Expr::Kind::Dict, line);
      while (!is_op("}")) {
        d->args.push_back(parse_expression());
        expect_op(":");
        d->args.push_back(parse_expression());
        if (!is_op(",")) break;
        ++p_;
      }
      expect_op("}");
      return d;
    }
    error(fmt::format("unexpected {}", describe(tok)));
  }

  void parse_call_args(Expr& call) {
    expect_op("(");
    while (!is_op(")")) {
      if (cur().kind == K::Name && peek().kind == K::Op && peek().text == "=") {
        std::string key = cur().text;
        p_ += 2;
        call.kwargs.emplace_back(std::move(key), parse_expression());
      } else {
        if (!call.kwargs.empty()) error("positional argument after keyword argument");
        call.args.push_back(parse_expression());
      }
      if (!is_op(",")) break;
      ++p_;
    }
    expect_op(")");
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      const int line = cur().line;
      if (is_op(".")) {
        ++p_;
        if (cur().kind == K::Int) {  // a.0 is a[0]
          auto it = node(Expr::Kind::Item, line);
          auto idx = node(Expr::Kind::Literal, line);
          idx->value = Value::integer(cur().int_value);
          ++p_;
          it->args.push_back(std::move(e));
          it->args.push_back(std::move(idx));
          e = std::move(it);
          continue;
        }
        auto a = node(Expr::Kind::Attr, line);
        a->name = expect_name();
        a->args.push_back(std::move(e));
        e = std::move(a);
      } else if (is_op("[")) {
        ++p_;
        ExprPtr start, stop, step;
        bool slice = false;
        if (!is_op(":")) start = parse_expression();
        if (is_op(":")) {
          slice = true;
          ++p_;
          if (!is_op("]") && !is_op(":")) stop = parse_expression();
          if (is_op(":")) {
            ++p_;
            if (!is_op("]")) step = parse_expression();
          }
        }
        expect_op("]");
        auto it = node(slice ? Expr::Kind::Slice : Expr::Kind::Item, line);
        it->args.push_back(std::move(e));
        it->args.push_back(std::move(start));
        if (slice) {
          it->args.push_back(std::move(stop));
          it->args.push_back(std::move(step));
        }
        e = std::move(it);
      } else if (is_op("(")) {
        auto c = node(Expr::Kind::Call, line);
        c->args.push_back(std::move(e));
        parse_call_args(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      const int line = cur().line;
      if (is_op("|")) {
        ++p_;
        auto f = node(Expr::Kind::Filter, line);
        f->name = expect_name();
        while (is_op(".")) {  // dotted filter names
          ++p_;
          f->name += "." + expect_name();
        }
        f->args.push_back(std::move(e));
        if (is_op("(")) parse_call_args(*f);
        e = std::move(f);
      } else if (is_name("is")) {
        ++p_;
        auto t = node(Expr::Kind::Test, line);
        if (is_name("not")) {
          t->negated = true;
          ++p_;
        }
        t->name = expect_name();
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          parse_call_args(*t);
        } else if ((cur().kind == K::Name || cur().kind == K::String || cur().kind == K::Int ||
                    cur().kind == K::Float || is_op("(") || is_op("[") || is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and")) {
          if (is_name("is")) error("you cannot chain multiple tests with is");
          t->args.push_back(parse_postfix(parse_primary()));
        }
        e = std::move(t);
      } else if (is_op("(")) {
        auto c = node(Expr::Kind::Call, line);
        c->args.push_back(std::move(e));
        parse_call_args(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  size_t p_ = 0;
  static constexpr int kMaxDepth = 256;
  int depth_ = 0;
};

}  // namespace

Body parse(const std::string& source) { return Parser(lex(source)).parse_template(); }

}  // namespace dsv3::jinja
