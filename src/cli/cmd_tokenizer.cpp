// Tokenizer subcommands: tokenize, detokenize, chat-template (JSON lines on stdin -> JSON lines on stdout)
// and train-tokenizer.
#include <omp.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "tokenizer/bpe_trainer.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_files.h"

namespace dsv3::cli {
namespace {

// Reads stdin line by line; blank lines are skipped; a line that is not a JSON object fails with its number.
template <typename F>
void for_each_json_line(const char* expected, F&& handle) {
  std::string line;
  size_t number = 0;
  while (std::getline(std::cin, line)) {
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::ordered_json j;
    try {
      j = nlohmann::ordered_json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      fail("stdin line {}: not valid JSON ({}); expected {}", number, e.what(), expected);
    }
    if (!j.is_object()) fail("stdin line {}: expected a JSON object {}", number, expected);
    try {
      handle(j);
    } catch (const InputError& e) {
      fail("stdin line {}: {}", number, e.what());
    }
  }
}

void write_line(const std::string& s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

std::string ids_json(const std::vector<int32_t>& ids) {
  std::string out = "{\"ids\": [";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(ids[i]);
  }
  return out + "]}";
}

// The text of a {"text": ...} line, or the raw bytes of a {"bytes": [0-255, ...]} line (JSON strings cannot
// carry invalid UTF-8, bytes can).
std::string text_of(const nlohmann::ordered_json& j) {
  if (j.contains("text")) {
    if (!j["text"].is_string()) fail("\"text\" must be a string");
    return j["text"].get<std::string>();
  }
  if (j.contains("bytes") && j["bytes"].is_array()) {
    std::string out;
    for (const auto& b : j["bytes"]) {
      if (!b.is_number_integer() || b.get<int>() < 0 || b.get<int>() > 255) fail("\"bytes\" must hold integers 0-255");
      out += char(b.get<int>());
    }
    return out;
  }
  fail("expected {{\"text\": string}} (or {{\"bytes\": [0-255, ...]}})");
}

struct BenchResult {
  double seconds;
  size_t tokens;
};

// Throughput of encoding the documents of a JSON-lines file, single-threaded and as one batch over threads.
void run_bench(const Tokenizer& tok, const std::string& file, int threads, int repeat) {
  std::vector<std::string> docs;
  size_t bytes = 0;
  {
    const std::string all = read_text_file(file);
    size_t start = 0, number = 0;
    while (start < all.size()) {
      size_t end = all.find('\n', start);
      if (end == std::string::npos) end = all.size();
      ++number;
      const std::string line = all.substr(start, end - start);
      start = end + 1;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      try {
        docs.push_back(text_of(nlohmann::ordered_json::parse(line)));
      } catch (const std::exception& e) {
        fail("{} line {}: {}", file, number, e.what());
      }
      bytes += docs.back().size();
    }
  }
  using clock = std::chrono::steady_clock;
  auto single = [&] {
    const auto t0 = clock::now();
    size_t n = 0;
    for (const auto& d : docs) n += tok.encode(d).size();
    return BenchResult{std::chrono::duration<double>(clock::now() - t0).count(), n};
  };
  auto batch = [&] {
    const auto t0 = clock::now();
    const auto out = tok.encode_batch(docs);
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    size_t n = 0;
    for (const auto& o : out) n += o.size();
    return BenchResult{s, n};
  };
  const BenchResult cold = single();  // first pass: the word cache starts empty
  BenchResult best_single = cold;
  for (int r = 0; r < repeat; ++r) {
    const auto b = single();
    if (b.seconds < best_single.seconds) best_single = b;
  }
  omp_set_num_threads(threads);
  BenchResult best_batch = batch();  // warms every thread's cache
  for (int r = 0; r < repeat; ++r) {
    const auto b = batch();
    if (b.seconds < best_batch.seconds) best_batch = b;
  }
  nlohmann::ordered_json out;
  out["docs"] = docs.size();
  out["bytes"] = bytes;
  out["tokens"] = best_single.tokens;
  out["single_cold_mb_s"] = bytes / cold.seconds / 1e6;
  out["single_mb_s"] = bytes / best_single.seconds / 1e6;
  out["threads"] = threads;
  out["batch_mb_s"] = bytes / best_batch.seconds / 1e6;
  write_line(out.dump());
}

}  // namespace

void add_tokenizer_commands(CLI::App& app) {
  {
    auto* cmd = app.add_subcommand("tokenize", "Text to token ids: {\"text\": ...} lines on stdin -> {\"ids\": [...]} lines");
    auto opt = std::make_shared<std::string>(kBundledTokenizerName);
    auto add_special = std::make_shared<bool>(false);
    auto add_bos = std::make_shared<bool>(false);
    auto bench = std::make_shared<std::string>();
    auto threads = std::make_shared<int>(omp_get_max_threads());
    auto repeat = std::make_shared<int>(3);
    cmd->add_option("--tokenizer", *opt, "tokenizer.json, a directory with one, or deepseek-v3 (bundled)");
    cmd->add_flag("--add-special", *add_special,
                  "add the special tokens tokenizer.json's post-processor adds (HF add_special_tokens=True)");
    cmd->add_flag("--add-bos", *add_bos, "start with BOS when tokenizer_config.json says add_bos_token");
    cmd->add_option("--bench", *bench, "measure encoding throughput on a JSON-lines file of {\"text\": ...} documents");
    cmd->add_option("--threads", *threads, "threads for --bench batch encoding");
    cmd->add_option("--repeat", *repeat, "timed passes for --bench (best is reported)");
    cmd->callback([=] {
      const Tokenizer tok = Tokenizer::load(*opt);
      if (!bench->empty()) {
        run_bench(tok, *bench, *threads, *repeat);
        return;
      }
      for_each_json_line("{\"text\": ...}", [&](const nlohmann::ordered_json& j) {
        const std::string text = text_of(j);
        std::vector<int32_t> ids = tok.encode(text, *add_special);
        if (*add_bos && tok.add_bos_token() && tok.bos_id() >= 0) ids.insert(ids.begin(), tok.bos_id());
        write_line(ids_json(ids));
      });
    });
  }
  {
    auto* cmd = app.add_subcommand("detokenize", "Token ids to text: {\"ids\": [...]} lines on stdin -> {\"text\": ...} lines");
    auto opt = std::make_shared<std::string>(kBundledTokenizerName);
    auto skip = std::make_shared<bool>(false);
    cmd->add_option("--tokenizer", *opt, "tokenizer.json, a directory with one, or deepseek-v3 (bundled)");
    cmd->add_flag("--skip-special", *skip, "leave special tokens out of the text");
    cmd->callback([=] {
      const Tokenizer tok = Tokenizer::load(*opt);
      for_each_json_line("{\"ids\": [...]}", [&](const nlohmann::ordered_json& j) {
        if (!j.contains("ids") || !j["ids"].is_array()) fail("expected {{\"ids\": [integers]}}");
        std::vector<int32_t> ids;
        for (const auto& x : j["ids"]) {
          if (!x.is_number_integer()) fail("\"ids\" must hold integers");
          // Out-of-range ids are unknown ids, which decoding skips (as Hugging Face does), not wrapped ones.
          const int64_t v = x.is_number_unsigned() && x.get<uint64_t>() > uint64_t(INT64_MAX) ? -1 : x.get<int64_t>();
          ids.push_back(v < 0 || v > INT32_MAX ? -1 : int32_t(v));
        }
        nlohmann::ordered_json out;
        out["text"] = tok.decode(ids, *skip);
        write_line(out.dump());
      });
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "chat-template", "Render the chat template: {\"messages\": [...], \"add_generation_prompt\": bool} lines -> {\"text\": ...}");
    auto dir = std::make_shared<std::string>(kBundledTokenizerName);
    cmd->add_option("--tokenizer-dir,--tokenizer", *dir, "directory with tokenizer_config.json, or deepseek-v3 (bundled)");
    cmd->callback([=] {
      // The template needs no vocabulary: a directory with only tokenizer_config.json is enough.
      std::function<std::string(const nlohmann::ordered_json&, bool, const nlohmann::ordered_json&)> render;
      namespace fs = std::filesystem;
      std::error_code ec;
      if (fs::is_directory(*dir, ec) && !fs::exists(fs::path(*dir) / "tokenizer.json", ec) &&
          fs::exists(fs::path(*dir) / "tokenizer_config.json", ec)) {
        const std::string path = (fs::path(*dir) / "tokenizer_config.json").string();
        nlohmann::json cfg;
        try {
          cfg = nlohmann::json::parse(read_text_file(path));
        } catch (const nlohmann::json::parse_error& e) {
          fail("{} is not valid JSON: {}", path, e.what());
        }
        auto config = std::make_shared<ChatTemplateConfig>(ChatTemplateConfig::from_config(cfg));
        if (config->source.empty()) fail("{} has no chat_template", path);
        auto tpl = std::make_shared<ChatTemplate>(config->source);
        render = [config, tpl](const nlohmann::ordered_json& m, bool gen, const nlohmann::ordered_json& extra) {
          return tpl->render(chat_template_variables(m, gen, config->special_tokens, extra));
        };
      } else {
        auto tok = std::make_shared<Tokenizer>(Tokenizer::load(*dir));
        render = [tok](const nlohmann::ordered_json& m, bool gen, const nlohmann::ordered_json& extra) {
          return tok->apply_chat_template(m, gen, extra);
        };
      }
      for_each_json_line("{\"messages\": [...], \"add_generation_prompt\": bool}", [&](const nlohmann::ordered_json& j) {
        if (!j.contains("messages") || !j["messages"].is_array()) fail("expected \"messages\": [...]");
        bool gen = false;
        if (j.contains("add_generation_prompt")) {
          if (!j["add_generation_prompt"].is_boolean()) fail("\"add_generation_prompt\" must be true or false");
          gen = j["add_generation_prompt"].get<bool>();
        }
        // Other keys (tools, documents, ...) become template variables, as keyword arguments do in transformers.
        nlohmann::ordered_json extra = nlohmann::ordered_json::object();
        for (const auto& [k, v] : j.items())
          if (k != "messages" && k != "add_generation_prompt") extra[k] = v;
        nlohmann::ordered_json out;
        out["text"] = render(j["messages"], gen, extra);
        write_line(out.dump());
      });
    });
  }
  {
    auto* cmd = app.add_subcommand("train-tokenizer",
                                   "Learn a byte-level BPE tokenizer (DeepSeek-V3's pre-tokenizer, special tokens and chat template)");
    auto inputs = std::make_shared<std::vector<std::string>>();
    auto vocab = std::make_shared<int>(0);
    auto output = std::make_shared<std::string>();
    auto like = std::make_shared<std::string>(kBundledTokenizerName);
    auto min_freq = std::make_shared<int>(2);
    cmd->add_option("--input", *inputs, "training text files")->required();
    cmd->add_option("--vocab-size", *vocab, "vocabulary size, special tokens and the 256 bytes included")->required();
    cmd->add_option("--output", *output, "directory to write tokenizer.json and tokenizer_config.json to")->required();
    cmd->add_option("--like", *like, "tokenizer whose pre-tokenizer, special tokens and chat template to keep");
    cmd->add_option("--min-frequency", *min_freq, "stop when the best pair occurs fewer times than this");
    cmd->callback([=] {
      BpeTrainerOptions o;
      o.vocab_size = *vocab;
      o.min_frequency = *min_freq;
      const auto t0 = std::chrono::steady_clock::now();
      const BpeTrainerReport r = train_bpe_tokenizer(*inputs, *like, *output, o);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::fprintf(stderr, "trained %zu merges (vocab %zu) on %zu bytes, %zu distinct words, in %.2fs -> %s\n",
                   r.merges, r.vocab_size, r.corpus_bytes, r.distinct_words, s, output->c_str());
      if (r.vocab_size < size_t(*vocab))
        std::fprintf(stderr, "note: the corpus ran out of pairs seen %d+ times before reaching vocab size %d\n", *min_freq, *vocab);
    });
  }
}

}  // namespace dsv3::cli
