// The chat-template interpreter against outputs of jinja2 as transformers configures it (trim_blocks,
// lstrip_blocks); each expected string below was produced by jinja2 3.1 on the same template.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/jinja.h"

using dsv3::jinja::Template;
using json = nlohmann::ordered_json;

namespace {

std::string render(const std::string& tpl, const json& vars = json::object()) { return Template(tpl).render(vars); }

// Runs f and returns the InputError message ("" if nothing was thrown).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const dsv3::InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Jinja, LoopVariables) {
  json msgs = json::parse(R"([{"role":"user","content":"a"},{"role":"assistant","content":"b"}])");
  EXPECT_EQ(render("{% for m in messages %}{{ loop.index }}:{{ m.role }}={{ m.content }}{% if not loop.last %}, {% endif %}"
                   "{% endfor %}",
                   {{"messages", msgs}}),
            "1:user=a, 2:assistant=b");
}

TEST(Jinja, WhitespaceControl) {
  EXPECT_EQ(render("  {% if true %}\n  x\n  {% endif %}\n{{ 1 }}  {{- 2 -}}  {{ 3 }}\n"), "  x\n123");
  EXPECT_EQ(render("{%- for m in messages -%}\n  [{{ m }}]\n{%- endfor -%}\n", {{"messages", {"x", "y"}}}), "[x][y]");
  EXPECT_EQ(render("{% raw %}{{ not rendered }}{% endraw %}{# comment #}after"), "{{ not rendered }}after");
}

TEST(Jinja, ScopingAndNamespaces) {
  // A set inside a loop does not leak out; a namespace carries state across iterations.
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% set local = i %}"
                   "{% endfor %}{{ ns.n }}|{{ local is defined }}"),
            "6|False");
}

TEST(Jinja, PythonValues) {
  EXPECT_EQ(render("{{ 'a' ~ 1 ~ none }}|{{ [1, 'b', none, true, 2.0] }}|{{ {'k': [1]} | tojson }}|{{ 10 // 3 }}|"
                   "{{ -7 % 3 }}|{{ 1e20 }}|{{ 0.1 + 0.2 }}"),
            "a1None|[1, 'b', None, True, 2.0]|{\"k\": [1]}|3|2|1e+20|0.30000000000000004");
  EXPECT_EQ(render("{{ x | default('d') }}|{{ '  pad  ' | trim }}|{{ 'a,b,c'.split(',') | join('-') }}|"
                   "{{ 'Hello'[::-1] }}|{{ 'h\xC3\xA9llo'[1] }}|{{ 'abc' | upper }}"),
            "d|pad|a-b-c|olleH|\xC3\xA9|ABC");
  EXPECT_EQ(render("{{ '\\u00e9\\n\\t' }}|{{ \"it's\" }}|{{ 'a' 'b' }}"), "\xC3\xA9\n\t|it's|ab");
}

TEST(Jinja, MacrosAndDicts) {
  EXPECT_EQ(render("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} "
                   "{{ greet('B', punct='?') }}"),
            "Hi A! Hi B?");
  EXPECT_EQ(render("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for x in [] %}no{% else %}empty{% endfor %}",
                   {{"d", json::parse(R"({"z":1,"a":2})")}}),
            "z=1;a=2;empty");
}

TEST(Jinja, ErrorsNameTheLine) {
  EXPECT_NE(error_of([] { Template("line one\n{% if x %}never closed"); }).find("line 2"), std::string::npos);
  EXPECT_NE(error_of([] { Template("{% include 'x' %}"); }).find("include"), std::string::npos);
  EXPECT_NE(error_of([] { Template("{{ 'unterminated }}"); }).find("string literal"), std::string::npos);
  // Rendering errors: an undefined value used in an operation, a type error, raise_exception.
  EXPECT_NE(error_of([] { render("\n{{ 'a' + missing.x }}"); }).find("line 2: 'missing' is undefined"), std::string::npos);
  EXPECT_NE(error_of([] { render("{{ 'a' + none }}"); }).find("can only concatenate str"), std::string::npos);
  EXPECT_NE(error_of([] { render("{{ raise_exception('bad role') }}"); }).find("bad role"), std::string::npos);
  // Undefined renders as empty text, as with jinja2's default Undefined.
  EXPECT_EQ(render("[{{ missing }}][{{ d.nothing }}]", {{"d", json::object()}}), "[][]");
}

TEST(Jinja, HostileTemplatesFailCleanly) {
  EXPECT_NE(error_of([] { render("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"); }).find("nests deeper"),
            std::string::npos);
  EXPECT_NE(error_of([] { Template("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}"); })
                .find("nested deeper"),
            std::string::npos);
  std::string deep;
  for (int i = 0; i < 2000; ++i) deep += "{% if true %}";
  EXPECT_NE(error_of([&] { Template t(deep); }).find("nested deeper"), std::string::npos);
}
