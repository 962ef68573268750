#pragma once
// Syntax tree of a parsed Jinja template (the subset chat templates use).
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tokenizer/jinja_value.h"

namespace dsv3::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    Literal,   // value
    Name,      // name
    List,      // args
    Tuple,     // args
    Dict,      // args: key, value, key, value, ...
    Attr,      // args[0].name
    Item,      // args[0][args[1]]
    Slice,     // args[0][args[1]:args[2]:args[3]] (null parts allowed)
    Call,      // args[0](args[1..], kwargs)
    Filter,    // args[0] | name(args[1..], kwargs)
    Test,      // args[0] is [not] name(args[1..]); negated
    Unary,     // op args[0]: "-", "+", "not"
    Binary,    // args[0] op args[1]: + - * / // % ** ~ and or
    Compare,   // args[0] ops[0] args[1] ops[1] args[2] ...: == != < <= > >= in "not in"
    Cond,      // args[1] if args[0] else args[2] (args[2] may be null)
  };
  Kind kind;
  int line = 0;
  Value value;
  std::string name;
  bool negated = false;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Stmt {
  enum class Kind { Text, Output, If, For, Set, SetBlock, Macro, Break, Continue, Block };
  Kind kind;
  int line = 0;
  std::string text;                 // Text
  ExprPtr expr;                     // Output, Set value, For iterable, SetBlock filter-less
  std::vector<std::pair<ExprPtr, Body>> branches;  // If: (condition, body) for if / elif
  Body body;                        // For / SetBlock / Macro / Block body
  Body else_body;                   // If else, For else
  std::vector<std::string> targets;  // For loop variables, Set names (several = tuple unpacking)
  std::string attr;                 // Set ns.attr: targets[0] is the namespace, attr the attribute
  ExprPtr filter;                   // For ... if filter
  std::string name;                 // Macro name
  std::vector<std::pair<std::string, ExprPtr>> params;  // Macro parameters with optional defaults
};

}  // namespace dsv3::jinja
