#include "tokenizer/tokenizer_files.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include <fmt/format.h>

#include "core/error.h"

namespace dsv3 {
namespace fs = std::filesystem;

namespace {

std::string executable_dir() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : exe.parent_path().string();
}

std::string& extra_bundled_dir() {
  static std::string dir;
  return dir;
}

}  // namespace

void set_bundled_tokenizer_dir(const std::string& dir) { extra_bundled_dir() = dir; }

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read {}", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string bundled_tokenizer_dir() {
  std::vector<fs::path> candidates;
  if (!extra_bundled_dir().empty()) candidates.push_back(extra_bundled_dir());
  const std::string exe_dir = executable_dir();
  if (!exe_dir.empty()) {
    candidates.push_back(fs::path(exe_dir) / ".." / "data" / "tokenizers" / "deepseek-v3");
    candidates.push_back(fs::path(exe_dir) / ".." / ".." / "data" / "tokenizers" / "deepseek-v3");
  }
#ifdef DSV3_SOURCE_DIR
  candidates.push_back(fs::path(DSV3_SOURCE_DIR) / "data" / "tokenizers" / "deepseek-v3");
#endif
  std::string searched;
  for (const auto& c : candidates) {
    std::error_code ec;
    if (fs::is_regular_file(c / "tokenizer.json", ec)) return fs::weakly_canonical(c, ec).string();
    searched += (searched.empty() ? "" : ", ") + c.lexically_normal().string();
  }
  fail("the bundled deepseek-v3 tokenizer was not found (searched: {}); pass --tokenizer PATH to a tokenizer.json "
       "or a directory holding one", searched);
}

TokenizerFiles locate_tokenizer(const std::string& path_or_name) {
  fs::path p = path_or_name;
  std::error_code ec;
  if (path_or_name == kBundledTokenizerName && !fs::exists(p, ec)) p = bundled_tokenizer_dir();
  if (fs::is_directory(p, ec)) {
    const fs::path json = p / "tokenizer.json";
    if (!fs::is_regular_file(json, ec)) fail("{} has no tokenizer.json", p.string());
    const fs::path config = p / "tokenizer_config.json";
    return {json.string(), fs::is_regular_file(config, ec) ? config.string() : std::string()};
  }
  if (fs::is_regular_file(p, ec)) {
    const fs::path config = p.parent_path() / "tokenizer_config.json";
    return {p.string(), fs::is_regular_file(config, ec) ? config.string() : std::string()};
  }
  fail("tokenizer {:?} not found: expected a tokenizer.json file, a directory holding one, or \"{}\"", path_or_name,
       kBundledTokenizerName);
}

}  // namespace dsv3
