#include "eval/tasks.h"

#include <cmath>
#include <fstream>
#include <regex>

#include "core/error.h"
#include "eval/pass_at_k.h"
#include "tokenizer/utf8.h"

namespace dsv3 {

using json = nlohmann::json;

std::vector<json> read_jsonl(const std::string& path, int64_t limit) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot open {}", path);
  std::vector<json> out;
  std::string line;
  int64_t n = 0;
  while (std::getline(f, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) fail("{}:{}: not a JSON object", path, n);
    out.push_back(std::move(j));
    if (limit > 0 && int64_t(out.size()) >= limit) break;
  }
  if (out.empty()) fail("{} holds no documents", path);
  return out;
}

std::string render_template(const std::string& t, const json& doc) {
  std::string out;
  for (size_t i = 0; i < t.size(); ++i) {
    if (t.compare(i, 2, "{{") == 0 || t.compare(i, 2, "}}") == 0) {
      out += t[i];
      ++i;
      continue;
    }
    if (t[i] != '{') {
      out += t[i];
      continue;
    }
    const size_t e = t.find('}', i);
    if (e == std::string::npos) fail("template: unclosed '{{' at {}", i);
    const std::string key = t.substr(i + 1, e - i - 1);
    if (!doc.contains(key)) fail("template field '{}' is not in the document", key);
    const json& v = doc[key];
    out += v.is_string() ? v.get<std::string>() : v.dump();
    i = e;
  }
  return out;
}

ScoreRequest encode_pair(const Tokenizer& tok, const std::string& context, const std::string& continuation,
                         bool bos, int64_t context_len) {
  std::string ctx = context, cont = continuation;
  const size_t keep = ctx.find_last_not_of(" \t\r\n\v\f");
  const size_t cut = keep == std::string::npos ? 0 : keep + 1;
  cont = ctx.substr(cut) + cont;
  ctx.resize(cut);
  auto enc = [&](const std::string& s) { return bos ? tok.encode_with_bos(s) : tok.encode(s); };
  ScoreRequest r;
  r.tokens = enc(ctx + cont);
  const size_t nctx = enc(ctx).size();
  if (nctx == 0) fail("an empty context has nothing to condition on (use bos)");
  if (nctx >= r.tokens.size()) fail("the continuation '{}' encodes to no tokens", continuation);
  r.score_from = nctx;
  if (int64_t(r.tokens.size()) > context_len) {  // keep the last context_len tokens (the continuation must fit)
    const size_t drop = r.tokens.size() - size_t(context_len);
    if (drop >= r.score_from) fail("the continuation does not fit the context ({} tokens)", context_len);
    r.tokens.erase(r.tokens.begin(), r.tokens.begin() + drop);
    r.score_from -= drop;
  }
  return r;
}

namespace {

std::vector<std::string> choices_of(const json& d, size_t line) {
  std::vector<std::string> c;
  if (d.contains("choices")) {
    if (!d["choices"].is_array() || d["choices"].empty()) fail("document {}: 'choices' must be a non-empty list", line);
    for (auto& x : d["choices"]) c.push_back(x.is_string() ? x.get<std::string>() : x.dump());
    return c;
  }
  for (char L = 'A'; L <= 'Z' && d.contains(std::string(1, L)); ++L) c.push_back(d[std::string(1, L)].get<std::string>());
  if (c.size() < 2) fail("document {}: no 'choices' list and no fields A, B, ...", line);
  return c;
}

int64_t gold_of(const json& d, const std::vector<std::string>& choices, size_t line) {
  if (!d.contains("answer")) fail("document {}: 'answer' is missing", line);
  const json& a = d["answer"];
  int64_t g = -1;
  if (a.is_number_integer()) g = a.get<int64_t>();
  else if (a.is_string()) {
    const std::string s = a;
    if (s.size() == 1 && s[0] >= 'A' && s[0] <= 'Z') g = s[0] - 'A';
    for (size_t i = 0; g < 0 && i < choices.size(); ++i)
      if (choices[i] == s) g = int64_t(i);
  }
  if (g < 0 || g >= int64_t(choices.size())) fail("document {}: answer {} is not one of the {} choices", line, a.dump(), choices.size());
  return g;
}

int64_t argmax(const std::vector<double>& v) {
  int64_t b = 0;
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] > v[size_t(b)]) b = int64_t(i);
  return b;
}

double stderr_of(double p, int64_t n) { return n > 1 ? std::sqrt(p * (1 - p) / double(n - 1)) : 0.0; }

size_t codepoints(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

json eval_multiple_choice(Scorer& sc, const Tokenizer& tok, const std::vector<json>& docs, const McOptions& o,
                          int64_t context_len, std::vector<McItem>* items, const Progress& progress) {
  std::vector<ScoreRequest> reqs;
  std::vector<std::vector<std::string>> choices(docs.size());
  std::vector<McItem> it(docs.size());
  for (size_t i = 0; i < docs.size(); ++i) {
    choices[i] = choices_of(docs[i], i + 1);
    it[i].gold = gold_of(docs[i], choices[i], i + 1);
    const std::string ctx = render_template(o.prompt_template, docs[i]);
    for (auto& c : choices[i]) reqs.push_back(encode_pair(tok, ctx, o.target_delimiter + c, o.bos, context_len));
  }
  auto res = sc.score(reqs, progress);
  size_t k = 0;
  double acc = 0, acc_norm = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    std::vector<double> norm;
    for (auto& c : choices[i]) {
      it[i].loglik.push_back(res[k].logprob);
      it[i].greedy.push_back(res[k].greedy);
      norm.push_back(res[k].logprob / double(std::max<size_t>(1, codepoints(c))));
      ++k;
    }
    it[i].pred = argmax(it[i].loglik);
    it[i].pred_norm = argmax(norm);
    acc += it[i].pred == it[i].gold;
    acc_norm += it[i].pred_norm == it[i].gold;
  }
  const int64_t n = int64_t(docs.size());
  acc /= double(n), acc_norm /= double(n);
  if (items) *items = std::move(it);
  return {{"type", "multiple_choice"}, {"documents", n}, {"requests", int64_t(reqs.size())},
          {"acc", acc}, {"acc_stderr", stderr_of(acc, n)}, {"acc_norm", acc_norm}, {"acc_norm_stderr", stderr_of(acc_norm, n)}};
}

std::string normalize_answer(std::string s) {
  std::string out;
  for (char c : s)
    if (c != ',' && c != '$') out += c;
  const size_t a = out.find_first_not_of(" \t\r\n"), b = out.find_last_not_of(" \t\r\n");
  out = a == std::string::npos ? "" : out.substr(a, b - a + 1);
  while (!out.empty() && out.back() == '.') out.pop_back();
  return out;
}

std::string extract_answer(const std::string& output, const std::string& regex) {
  std::smatch m;
  if (!regex.empty()) {
    std::regex re(regex);
    if (std::regex_search(output, m, re)) return normalize_answer(m.size() > 1 ? m[1].str() : m[0].str());
  }
  static const std::regex num("-?[0-9][0-9,]*(\\.[0-9]+)?");
  std::string last;
  for (auto i = std::sregex_iterator(output.begin(), output.end(), num); i != std::sregex_iterator(); ++i) last = i->str();
  return normalize_answer(last);
}

json eval_generation(Scorer& sc, const Tokenizer& tok, const std::vector<json>& docs, const GenOptions& o,
                     int64_t context_len, std::vector<json>* samples, const Progress& progress) {
  try {
    std::regex check(o.answer_regex);
  } catch (const std::regex_error& e) {
    fail("--answer-regex '{}' is not a valid regular expression: {}", o.answer_regex, e.what());
  }
  std::vector<GenRequest> reqs;
  std::vector<std::string> gold;
  for (size_t i = 0; i < docs.size(); ++i) {
    if (!docs[i].contains("answer")) fail("document {}: 'answer' is missing", i + 1);
    const json& a = docs[i]["answer"];
    std::string g = a.is_string() ? a.get<std::string>() : a.dump();
    const size_t h = g.rfind("####");
    gold.push_back(normalize_answer(h == std::string::npos ? g : g.substr(h + 4)));
    GenRequest r;
    const std::string p = render_template(o.prompt_template, docs[i]);
    r.prompt = o.bos ? tok.encode_with_bos(p) : tok.encode(p);
    if (int64_t(r.prompt.size()) >= context_len) fail("document {}: the prompt ({} tokens) does not fit the context", i + 1, r.prompt.size());
    r.max_tokens = std::min(o.max_tokens, context_len - int64_t(r.prompt.size()));
    r.stop = o.stop;
    reqs.push_back(std::move(r));
  }
  auto outs = sc.generate(reqs, progress);
  double em = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    const std::string pred = extract_answer(outs[i], o.answer_regex);
    const bool ok = !pred.empty() && pred == gold[i];
    em += ok;
    if (samples) samples->push_back({{"doc", int64_t(i)}, {"output", outs[i]}, {"extracted", pred}, {"target", gold[i]}, {"exact_match", ok}});
  }
  const int64_t n = int64_t(docs.size());
  em /= double(n);
  return {{"type", "generation"}, {"documents", n}, {"exact_match", em}, {"exact_match_stderr", stderr_of(em, n)}};
}

json eval_code(Scorer& sc, const Tokenizer& tok, const std::vector<json>& docs, const CodeOptions& o,
               int64_t context_len, std::vector<json>* samples, const Progress& progress) {
  if (o.samples < 1) fail("--samples must be >= 1");
  for (auto k : o.ks)
    if (k < 1 || k > o.samples) fail("pass@{} needs at least {} samples per task (--samples {})", k, k, o.samples);
  for (size_t i = 0; i < docs.size(); ++i)
    for (const char* f : {"prompt", "test", "entry_point"})
      if (!docs[i].contains(f) || !docs[i][f].is_string()) fail("document {}: '{}' must be a string", i + 1, f);
  std::vector<std::string> completions;
  const int64_t n = o.references ? 1 : o.samples;
  if (o.references) {
    for (size_t i = 0; i < docs.size(); ++i) {
      if (!docs[i].contains("canonical_solution") || !docs[i]["canonical_solution"].is_string())
        fail("document {}: --references needs 'canonical_solution'", i + 1);
      completions.push_back(docs[i]["canonical_solution"]);
    }
  } else {
    std::vector<GenRequest> reqs;
    for (size_t i = 0; i < docs.size(); ++i)
      for (int64_t j = 0; j < n; ++j) {
        GenRequest r;
        const std::string p = docs[i]["prompt"];
        r.prompt = o.bos ? tok.encode_with_bos(p) : tok.encode(p);
        if (int64_t(r.prompt.size()) >= context_len) fail("document {}: the prompt does not fit the context", i + 1);
        r.max_tokens = std::min(o.max_tokens, context_len - int64_t(r.prompt.size()));
        r.stop = o.stop;
        r.sampling = o.sampling;
        if (n == 1) r.sampling.temperature = 0;
        r.sampling.seed = o.sampling.seed + uint64_t(i) * 1000003u + uint64_t(j);
        reqs.push_back(std::move(r));
      }
    completions = sc.generate(reqs, progress);
  }
  std::vector<double> pass_k(o.ks.size(), 0.0);
  int64_t passed_total = 0, timeouts = 0;
  for (size_t i = 0; i < docs.size(); ++i) {
    int64_t c = 0;
    for (int64_t j = 0; j < n; ++j) {
      const std::string& comp = completions[i * size_t(n) + size_t(j)];
      const std::string program = docs[i]["prompt"].get<std::string>() + comp + "\n\n" + docs[i]["test"].get<std::string>() +
                                  "\n\ncheck(" + docs[i]["entry_point"].get<std::string>() + ")\n";
      SandboxResult r = run_python(program, o.limits);
      c += r.passed;
      timeouts += r.timed_out;
      if (samples)
        samples->push_back({{"task_id", docs[i].value("task_id", std::to_string(i))}, {"sample", j}, {"completion", comp},
                            {"passed", r.passed}, {"timed_out", r.timed_out}, {"exit_code", r.exit_code},
                            {"output", utf8::to_valid_lossy(r.output.substr(0, 2000))}});
    }
    passed_total += c;
    for (size_t q = 0; q < o.ks.size(); ++q) pass_k[q] += o.references ? double(c) : pass_at_k(n, c, o.ks[q]);
  }
  json out = {{"type", "code"}, {"documents", int64_t(docs.size())}, {"samples_per_task", n},
              {"samples_passed", passed_total}, {"timeouts", timeouts}, {"references", o.references},
              {"network_isolated", sandbox_info().network_isolated}};
  for (size_t q = 0; q < o.ks.size(); ++q) out[fmt::format("pass@{}", o.ks[q])] = pass_k[q] / double(docs.size());
  return out;
}

}  // namespace dsv3
