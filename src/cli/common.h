#pragma once
// Small helpers shared by the subcommands.
#include <memory>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace dsv3 {
struct SamplingParams;
}

namespace dsv3::cli {

// --model (required), --device and --dtype: the options of every command that runs a model directory.
void add_model_options(CLI::App* c, std::string& dir, std::string& device, std::string& dtype);
// --temperature, --top-k, --top-p and --seed of the sampler.
void add_sampling_options(CLI::App* c, SamplingParams& sp);

// Re-executes the binary with OPENBLAS_CORETYPE set when OpenBLAS fell back to generic kernels (blas_env.cpp).
void select_blas_kernels(char** argv);

std::string human(int64_t n);                          // 1234567 -> "1.23M"
std::vector<int32_t> parse_id_list(const std::string& s);  // "5,6,7" -> {5, 6, 7}; InputError on junk
void copy_tokenizer_files(const std::string& from_dir, const std::string& to_dir);

// Incremental detokenization for streaming: returns only complete UTF-8 text.
class TextStream {
 public:
  virtual ~TextStream() = default;
  virtual std::string push(int32_t id) = 0;
  virtual std::string flush() = 0;
};

// Text <-> ids for the CLI, over the tokenizer found in a model directory (or a tokenizer path).
class TextCodec {
 public:
  virtual ~TextCodec() = default;
  virtual std::vector<int32_t> encode(const std::string& text) = 0;  // with BOS when the tokenizer says so
  virtual std::string decode(const std::vector<int32_t>& ids) = 0;
  virtual std::unique_ptr<TextStream> stream() = 0;
};
std::unique_ptr<TextCodec> open_text_codec(const std::string& path);

}  // namespace dsv3::cli
