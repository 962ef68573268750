// dsv3 quantize: a BF16/F32 hub checkpoint -> the DeepSeek-V3 FP8 hub layout. Every 2-D weight the release
// stores in FP8 (all linear layers except embed_tokens, lm_head / shared_head.head and the router mlp.gate)
// becomes F8_E4M3 codes [N, K] plus `<name>_scale_inv` F32 [ceil(N/128), ceil(K/128)] (fp8::quantize_128x128:
// scale = amax / 448 per block, the value is code x scale); the rest is copied unchanged; config.json gets the
// release's quantization_config. transformers (FineGrainedFP8), vLLM and SGLang read this layout.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/fp8.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/weights.h"

namespace dsv3::cli {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

void quantize_dir(const std::string& in, const std::string& out) {
  if (!fs::is_directory(in)) fail("model directory {} does not exist", in);
  std::error_code ec;
  if (fs::exists(out) && fs::equivalent(in, out, ec)) fail("--output must differ from --model ({})", out);
  const ModelConfig cfg = ModelConfig::load(in);
  json cj;
  {
    std::ifstream f(fs::path(in) / "config.json");
    cj = json::parse(f, nullptr, /*allow_exceptions=*/false);
    if (cj.is_discarded() || !cj.is_object()) fail("{}/config.json is not a JSON object", in);
  }
  if (cfg.fp8 || cj.contains("quantization_config"))
    fail("{} is already quantized (config.json has a quantization_config)", in);
  WeightSet ws(in);
  const ParamLayout layout = make_param_layout(cfg);
  for (const ParamSpec& s : layout.specs)
    if (!s.is_bias && !ws.has(s.name)) fail("missing tensor {} in {} (expected shape {})", s.name, in, shape_str(s.shape));
  std::vector<Tensor> tensors;
  int64_t nq = 0;
  for (const std::string& name : ws.names()) {
    Tensor t = ws.get(name);
    if (t.dtype == DType::F8E4M3 || name.size() > 10 && name.compare(name.size() - 10, 10, "_scale_inv") == 0)
      fail("{} is already quantized ({} is {})", in, name, dtype_name(t.dtype));
    auto it = layout.index.find(name);
    const bool matrix = it != layout.index.end() && layout.specs[it->second].is_matrix();
    if (matrix && t.shape != layout.specs[it->second].shape)
      fail("tensor {} in {}: expected a 2-D weight of shape {}, got {}", name, in,
           shape_str(layout.specs[it->second].shape), shape_str(t.shape));
    if (!(matrix && fp8_release_quantized(name, t.shape))) {  // copied as stored
      Tensor c = Tensor::empty(t.dtype, t.shape, name);
      std::memcpy(c.data, t.data, t.nbytes());
      tensors.push_back(std::move(c));
      continue;
    }
    if (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16)
      fail("tensor {} in {} has dtype {}; expected a float type", name, in, dtype_name(t.dtype));
    const int64_t N = t.dim(0), K = t.dim(1);
    std::vector<float> v(size_t(N * K));
    convert_to_f32(t.dtype, t.data, v.data(), v.size());
    for (size_t i = 0; i < v.size(); ++i)
      if (!std::isfinite(v[i]))
        fail("tensor {} in {} holds a non-finite value ({} at row {}, column {}); cannot quantize it", name, in, v[i],
             int64_t(i) / K, int64_t(i) % K);
    Tensor codes = Tensor::empty(DType::F8E4M3, {N, K}, name);
    Tensor scales = Tensor::empty(DType::F32, {fp8::tiles(N), fp8::tiles(K)}, name + "_scale_inv");
    fp8::quantize_128x128(codes.ptr<uint8_t>(), scales.ptr<float>(), v.data(), N, K);
    tensors.push_back(std::move(codes));
    tensors.push_back(std::move(scales));
    ++nq;
  }
  fs::create_directories(out, ec);
  if (ec || !fs::is_directory(out)) fail("cannot create output directory {}: {}", out, ec ? ec.message() : "not a directory");
  write_safetensors((fs::path(out) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  cj["quantization_config"] = {{"activation_scheme", "dynamic"},
                               {"fmt", "e4m3"},
                               {"quant_method", "fp8"},
                               {"weight_block_size", {fp8::kTile, fp8::kTile}}};
  write_file_atomic((fs::path(out) / "config.json").string(), cj.dump(2) + "\n");
  for (const char* n : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"})
    if (fs::exists(fs::path(in) / n)) fs::copy_file(fs::path(in) / n, fs::path(out) / n, fs::copy_options::overwrite_existing);
  std::fprintf(stderr, "wrote %s: %lld fp8 matrices (e4m3, 128x128 block scales), %zu tensors\n", out.c_str(),
               (long long)nq, tensors.size());
}

}  // namespace

// Hidden: one fp32 matrix through a tile quantizer of core/fp8 (the tests' NumPy reference checks the codes and
// scales bit for bit). --tile 1x128 | 128x1 | 128x128.
void add_fp8_debug(CLI::App& app) {
  auto* c = app.add_subcommand("fp8-quantize-debug", "");
  c->group("");  // not listed in --help
  auto in = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto tile = std::make_shared<std::string>("1x128");
  c->add_option("--input", *in, "safetensors with a 2-D F32 tensor x")->required();
  c->add_option("--output", *out, "safetensors to write: codes (U8) and scales (F32)")->required();
  c->add_option("--tile", *tile, "1x128 | 128x1 | 128x128");
  c->callback([=] {
    SafetensorsFile f(*in);
    if (!f.has("x")) fail("{}: no tensor named x", *in);
    Tensor x = f.get("x");
    if (x.dtype != DType::F32 || x.ndim() != 2) fail("{}: x must be a 2-D F32 tensor", *in);
    const int64_t M = x.dim(0), K = x.dim(1);
    Tensor codes = Tensor::empty(DType::U8, {M, K}, "codes");
    Tensor scales;
    if (*tile == "1x128") {
      scales = Tensor::empty(DType::F32, {M, fp8::tiles(K)}, "scales");
      fp8::quantize_1x128(codes.ptr<uint8_t>(), scales.ptr<float>(), x.ptr<float>(), M, K, K);
    } else if (*tile == "128x1") {
      scales = Tensor::empty(DType::F32, {fp8::tiles(M), K}, "scales");
      fp8::quantize_128x1(codes.ptr<uint8_t>(), scales.ptr<float>(), x.ptr<float>(), M, K);
    } else if (*tile == "128x128") {
      scales = Tensor::empty(DType::F32, {fp8::tiles(M), fp8::tiles(K)}, "scales");
      fp8::quantize_128x128(codes.ptr<uint8_t>(), scales.ptr<float>(), x.ptr<float>(), M, K);
    } else {
      fail("unknown --tile '{}' (1x128, 128x1 or 128x128)", *tile);
    }
    write_safetensors(*out, {codes, scales});
  });
}

void add_quantize(CLI::App& app) {
  add_fp8_debug(app);
  auto* c = app.add_subcommand("quantize", "Write a checkpoint in the DeepSeek-V3 FP8 hub layout (e4m3 + 128x128 scales)");
  auto in = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto format = std::make_shared<std::string>("fp8");
  c->add_option("--model", *in, "Input model directory (BF16 or F32 safetensors)")->required();
  c->add_option("--output", *out, "Output directory")->required();
  c->add_option("--format", *format, "Target format: fp8 (DeepSeek-V3 block-scaled e4m3)")->capture_default_str();
  c->callback([=] {
    if (*format != "fp8") fail("unknown --format '{}' (only fp8)", *format);
    quantize_dir(*in, *out);
  });
}

}  // namespace dsv3::cli
