#include "cli/common.h"

#include <CLI/CLI.hpp>
#include <filesystem>
#include <fmt/format.h>

#include "core/error.h"
#include "model/sampler.h"

namespace dsv3::cli {

std::string human(int64_t n) {
  double v = double(n);
  if (v >= 1e9) return fmt::format("{:.2f}B", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}K", v / 1e3);
  return std::to_string(n);
}

std::vector<int32_t> parse_id_list(const std::string& s) {
  std::vector<int32_t> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string part = s.substr(i, j - i);
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(part, &used);
    } catch (...) {
      fail("bad token id '{}' in '{}'", part, s);
    }
    if (used != part.size() || v < 0 || v > INT32_MAX) fail("bad token id '{}' in '{}'", part, s);
    out.push_back(int32_t(v));
    i = j + 1;
  }
  if (out.empty()) fail("empty token id list");
  return out;
}

void copy_tokenizer_files(const std::string& from_dir, const std::string& to_dir) {
  namespace fs = std::filesystem;
  bool any = false;
  for (const char* n : {"tokenizer.json", "tokenizer_config.json"}) {
    fs::path src = fs::path(from_dir) / n;
    if (fs::exists(src)) {
      fs::copy_file(src, fs::path(to_dir) / n, fs::copy_options::overwrite_existing);
      any = true;
    }
  }
  if (!any) fail("no tokenizer.json in {}", from_dir);
}

void add_model_options(CLI::App* c, std::string& dir, std::string& device, std::string& dtype) {
  c->add_option("--model", dir, "Model directory")->required();
  c->add_option("--device", device, "cpu | cuda | cuda:N");
  c->add_option("--dtype", dtype, "weights in memory: auto | f32 | bf16 | fp8 (block-scaled e4m3 matrices, the rest bf16)");
}

void add_sampling_options(CLI::App* c, SamplingParams& sp) {
  c->add_option("--temperature", sp.temperature, "0 = greedy");
  c->add_option("--top-k", sp.top_k, "Sample among the k most likely (0 = off)");
  c->add_option("--top-p", sp.top_p, "Nucleus sampling threshold (1 = off)");
  c->add_option("--seed", sp.seed, "Sampling seed");
}

}  // namespace dsv3::cli
