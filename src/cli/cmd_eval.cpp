// eval: perplexity / bits per byte, multiple-choice log-likelihood, generation with answer extraction and
// sandboxed code tasks, all through the serving engine (continuous batching over the latent cache; DeepSeek-V4
// models through V4ServingModel, each sequence on its own V4 cache).
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "eval/perplexity.h"
#include "eval/tasks.h"
#include "model/loader.h"
#include "model/v4_config.h"
#include "model/v4_loader.h"
#include "model/sampler.h"
#include "serve/engine.h"
#include "serve/serving_model.h"
#include "train/data.h"

namespace dsv3::cli {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct EvalArgs {
  std::string dir, device = "cpu", dtype = "auto", tokenizer, output, samples_out, name;
  int64_t max_batch = 16, limit = 0, context = 0, kv_tokens = 0;
  bool no_bos = false, progress = false;
};

void add_common(CLI::App* c, EvalArgs& a) {
  add_model_options(c, a.dir, a.device, a.dtype);
  c->add_option("--tokenizer", a.tokenizer, "Tokenizer file or directory (default: the model's, else the bundled one)");
  c->add_option("--max-batch", a.max_batch, "Sequences the engine runs together");
  c->add_option("--context", a.context, "Longest sequence scored or generated (0: the model's context, at most 4096)");
  c->add_option("--kv-cache-tokens", a.kv_tokens, "Latent KV-cache capacity (0: max-batch x (context + 1))");
  c->add_option("--output,-o", a.output, "Write the results JSON here too (it is always printed)");
  c->add_option("--log-samples", a.samples_out, "Write per-document results as JSONL here");
  c->add_option("--limit", a.limit, "Only the first N documents of each file (0: all)");
  c->add_option("--name", a.name, "Task name in the results (default: the file's name)");
  c->add_flag("--no-bos", a.no_bos, "Do not start sequences with BOS");
  c->add_flag("--progress", a.progress, "Show the progress line even when stderr is not a terminal");
}

// The engine and tokenizer for one evaluation run: a DeepSeek-V3 / R1 / V3.2 model (lm) or a DeepSeek-V4 one (lm4),
// both behind the same engine and scorer; lim: the model's vocabulary, context and EOS.
struct Session {
  const EvalArgs& a;
  const bool v4;
  LoadedModel lm;
  LoadedV4Model lm4;
  ServingLimits lim;
  Tokenizer tok;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Scorer> scorer;
  int64_t context = 0;

  static std::string tokenizer_path(const EvalArgs& a) {
    if (!a.tokenizer.empty()) return a.tokenizer;
    return fs::exists(fs::path(a.dir) / "tokenizer.json") ? a.dir : "deepseek-v3";
  }

  explicit Session(const EvalArgs& args)
      : a(args), v4(fs::exists(fs::path(args.dir) / "config.json") && config_model_type(args.dir) == "deepseek_v4"),
        lm(v4 ? LoadedModel{} : open_model(args.dir, args.device, args.dtype)),
        lm4(v4 ? open_v4_model(args.dir, args.device, args.dtype) : LoadedV4Model{}),
        lim(v4 ? v4_serving_limits(lm4.model->config()) : latent_serving_limits(lm.model->config())),
        tok(Tokenizer::load(tokenizer_path(args))) {
    if (a.max_batch < 1 || a.max_batch > 4096) fail("--max-batch must be in [1, 4096], got {}", a.max_batch);
    if (a.limit < 0) fail("--limit must be >= 0");
    if (int64_t(tok.vocab_size()) > lim.vocab_size)
      fail("tokenizer {} has {} tokens but the model's vocab_size is {}; pass the model's own with --tokenizer", tok.source(),
           tok.vocab_size(), lim.vocab_size);
    // The cache holds max_batch whole sequences; a 128K-token context would reserve far more than evaluations use.
    context = std::min<int64_t>(a.context > 0 ? a.context : 4096, lim.max_positions);
    if (context < 2) fail("--context must be >= 2");
    EngineConfig ec;
    ec.max_batch = a.max_batch;
    if (a.kv_tokens < 0) fail("--kv-cache-tokens must be >= 0");
    ec.kv_cache_tokens = a.kv_tokens > 0 ? a.kv_tokens : a.max_batch * (context + 1);
    if (ec.kv_cache_tokens < context + 1) fail("--kv-cache-tokens must hold one whole sequence ({} tokens)", context + 1);
    ec.max_queue = 4 * a.max_batch;
    if (v4) {
      V4Model& m4 = *lm4.model;
      engine = std::make_unique<Engine>(
          lim, [&m4](int64_t tokens, int64_t block) { return std::make_unique<V4ServingModel>(m4, tokens, block); },
          tok, ec);
    } else {
      engine = std::make_unique<Engine>(*lm.model, tok, ec);
    }
    scorer = std::make_unique<Scorer>(*engine, 2 * a.max_batch);
  }
  bool bos() const { return !a.no_bos && tok.bos_id() >= 0; }
  ProgressLine progress(const std::string& what) const { return ProgressLine(what, a.progress || isatty(2)); }
};

void emit(const EvalArgs& a, json results, const std::vector<json>& samples) {
  results["model"] = a.dir;
  const std::string text = results.dump(2);
  std::printf("%s\n", text.c_str());
  if (!a.output.empty()) {
    std::ofstream f(a.output);
    f << text << "\n";
    if (!f) fail("cannot write {}", a.output);
  }
  if (!a.samples_out.empty()) {
    std::ofstream f(a.samples_out);
    for (auto& s : samples) f << s.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    if (!f) fail("cannot write {}", a.samples_out);
  }
}

std::string task_name(const EvalArgs& a, const std::string& file) {
  return a.name.empty() ? fs::path(file).stem().string() : a.name;
}

std::string read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) fail("cannot open {}", p);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

}  // namespace

void add_eval_commands(CLI::App& app) {
  auto* ev = app.add_subcommand("eval", "Evaluate a model: perplexity, multiple choice, generation, code (pass@k)");
  ev->require_subcommand(1);
  {
    auto* c = ev->add_subcommand("perplexity", "Perplexity and bits per byte of text files or prepared token shards");
    auto a = std::make_shared<EvalArgs>();
    auto files = std::make_shared<std::vector<std::string>>();
    auto shards = std::make_shared<std::vector<std::string>>();
    auto stride = std::make_shared<int64_t>(0);
    add_common(c, *a);
    c->add_option("--input", *files, "Text files, each one document");
    c->add_option("--shards", *shards, "Token shards from prepare-data (documents split at EOS; bytes from the tokenizer)");
    c->add_option("--stride", *stride, "New tokens predicted per window (0: context - 1, disjoint windows)");
    c->callback([=] {
      if (files->empty() == shards->empty()) fail("give either --input text files or --shards token shards");
      if (*stride < 0) fail("--stride must be >= 0");
      Session s(*a);
      std::vector<std::vector<int32_t>> docs;
      std::vector<int64_t> bytes;
      for (auto& f : *files) {
        const std::string text = read_file(f);
        docs.push_back(s.tok.encode(text));
        bytes.push_back(int64_t(text.size()));
      }
      const int32_t eos = s.lim.eos_token_id;
      for (auto& p : *shards) {
        TokenShard sh(p);
        if (int64_t(sh.max_token()) >= s.lim.vocab_size)
          fail("{} holds token {} beyond the model's vocab_size", p, sh.max_token());
        std::vector<int32_t> cur;
        auto close = [&] {
          if (cur.empty()) return;
          bytes.push_back(int64_t(s.tok.decode_bytes(cur).size()));
          docs.push_back(std::move(cur));
          cur.clear();
        };
        for (int64_t i = 0; i < sh.size(); ++i) {
          cur.push_back(int32_t(sh.tokens()[i]));
          if (int32_t(sh.tokens()[i]) == eos) close();  // the EOS ends (and belongs to) its document
        }
        close();
      }
      if (a->limit > 0 && int64_t(docs.size()) > a->limit) docs.resize(size_t(a->limit)), bytes.resize(size_t(a->limit));
      const int32_t prefix = s.tok.bos_id() >= 0 && !a->no_bos ? s.tok.bos_id() : eos;
      auto pl = s.progress("perplexity");
      PerplexityResult r = perplexity(*s.scorer, docs, bytes, prefix, s.context, *stride > 0 ? *stride : s.context - 1,
                                      [&](int64_t d, int64_t t) { pl(d, t); });
      pl.finish();
      json out = {{"task", a->name.empty() ? "perplexity" : a->name}, {"type", "perplexity"}, {"documents", r.documents},
                  {"tokens", r.tokens}, {"bytes", r.bytes}, {"windows", r.windows}, {"loglikelihood", r.logprob},
                  {"perplexity", r.perplexity()}, {"bits_per_byte", r.bits_per_byte()}, {"context", s.context}};
      emit(*a, out, {});
    });
  }
  {
    auto* c = ev->add_subcommand("mc", "Multiple-choice log-likelihood tasks from JSONL (acc, acc_norm)");
    auto a = std::make_shared<EvalArgs>();
    auto o = std::make_shared<McOptions>();
    auto file = std::make_shared<std::string>();
    add_common(c, *a);
    c->add_option("--task", *file, "JSONL: question, choices (or A, B, ...), answer")->required();
    c->add_option("--template", o->prompt_template, "Prompt template ({field} = the document's field)");
    c->add_option("--target-delimiter", o->target_delimiter, "Text between the prompt and each choice");
    c->callback([=] {
      auto docs = read_jsonl(*file, a->limit);
      Session s(*a);
      McOptions opt = *o;
      opt.bos = s.bos();
      std::vector<McItem> items;
      auto pl = s.progress(task_name(*a, *file));
      json r = eval_multiple_choice(*s.scorer, s.tok, docs, opt, s.context, &items, [&](int64_t d, int64_t t) { pl(d, t); });
      pl.finish();
      r["task"] = task_name(*a, *file);
      std::vector<json> samples;
      for (size_t i = 0; i < items.size(); ++i)
        samples.push_back({{"doc", int64_t(i)}, {"loglikelihoods", items[i].loglik}, {"greedy", items[i].greedy},
                           {"gold", items[i].gold}, {"pred", items[i].pred}, {"pred_norm", items[i].pred_norm}});
      emit(*a, r, samples);
    });
  }
  {
    auto* c = ev->add_subcommand("gen", "Generation tasks from JSONL with answer extraction (exact match)");
    auto a = std::make_shared<EvalArgs>();
    auto o = std::make_shared<GenOptions>();
    auto file = std::make_shared<std::string>();
    add_common(c, *a);
    c->add_option("--task", *file, "JSONL: question, answer")->required();
    c->add_option("--template", o->prompt_template, "Prompt template ({field} = the document's field)");
    c->add_option("--stop", o->stop, "Stop strings (default: a blank line, 'Question:')");
    c->add_option("--answer-regex", o->answer_regex, "Answer = its first group (fallback: the last number)");
    c->add_option("--max-new-tokens,-n", o->max_tokens, "Longest answer");
    c->callback([=] {
      if (o->max_tokens < 1) fail("--max-new-tokens must be >= 1");
      auto docs = read_jsonl(*file, a->limit);
      Session s(*a);
      GenOptions opt = *o;
      opt.bos = s.bos();
      std::vector<json> samples;
      auto pl = s.progress(task_name(*a, *file));
      json r = eval_generation(*s.scorer, s.tok, docs, opt, s.context, &samples, [&](int64_t d, int64_t t) { pl(d, t); });
      pl.finish();
      r["task"] = task_name(*a, *file);
      emit(*a, r, samples);
    });
  }
  {
    auto* c = ev->add_subcommand("code", "Code tasks from JSONL (HumanEval style) run in a sandbox: pass@k");
    auto a = std::make_shared<EvalArgs>();
    auto o = std::make_shared<CodeOptions>();
    auto file = std::make_shared<std::string>();
    o->sampling.temperature = 0.8;
    o->sampling.top_p = 0.95;
    add_common(c, *a);
    c->add_option("--task", *file, "JSONL: task_id, prompt, test, entry_point (canonical_solution for --references)")->required();
    c->add_option("--samples", o->samples, "Completions per task (n)");
    c->add_option("--k", o->ks, "pass@k for these k (each <= --samples)");
    c->add_option("--max-new-tokens,-n", o->max_tokens, "Longest completion");
    c->add_option("--stop", o->stop, "Stop strings (default: HumanEval's)");
    c->add_option("--timeout", o->limits.wall_seconds, "Wall-clock seconds per program");
    c->add_option("--cpu-seconds", o->limits.cpu_seconds, "CPU seconds per program (RLIMIT_CPU)");
    c->add_option("--memory-mb", o->limits.memory_bytes, "Address space per program in MiB (RLIMIT_AS)")
        ->transform([](std::string s) { return std::to_string(std::stoll(s) << 20); });
    c->add_flag("--references", o->references, "Run the tasks' canonical solutions instead (checks tasks and sandbox)");
    add_sampling_options(c, o->sampling);
    c->callback([=] {
      if (o->max_tokens < 1) fail("--max-new-tokens must be >= 1");
      if (!(o->limits.wall_seconds > 0) || !(o->limits.cpu_seconds > 0) || o->limits.memory_bytes < (int64_t(16) << 20))
        fail("--timeout and --cpu-seconds must be > 0 and --memory-mb >= 16");
      validate_sampling(o->sampling);
      auto docs = read_jsonl(*file, a->limit);
      Session s(*a);
      CodeOptions opt = *o;
      opt.bos = s.bos();
      std::vector<json> samples;
      auto pl = s.progress(task_name(*a, *file));
      json r = eval_code(*s.scorer, s.tok, docs, opt, s.context, &samples, [&](int64_t d, int64_t t) { pl(d, t); });
      pl.finish();
      r["task"] = task_name(*a, *file);
      emit(*a, r, samples);
    });
  }
}

}  // namespace dsv3::cli
