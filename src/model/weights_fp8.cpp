// Loading a hub directory into the FP8 inference layout (--dtype fp8): the matrices fp8_inference_quantized()
// names go to flat8 (F8E4M3 codes [N, K]) and scale_flat (fp32 [tiles(N), tiles(K)] per matrix), the rest to
// a BF16 flat buffer. FP8 checkpoints with 128x128 blocks keep their codes and scales byte for byte; BF16/F32
// checkpoints (and fp8 ones with other block sizes) are quantized here with fp8::quantize_128x128. Every
// buffer comes from the target backend and every byte goes through it, so the same code fills GPU memory.
#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <vector>

#include "core/fp8.h"
#include "io/safetensors.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace dsv3 {

namespace {

// Where the tensors come from: a checkpoint directory or weights already in host memory.
struct Source {
  std::function<bool(const std::string&)> has;
  std::function<Tensor(const std::string&)> get;
};

// A checkpoint fp8 tensor's block scales as fp32, checked against the config's block size.
std::vector<float> read_scales(const Source& ws, const ModelConfig& cfg, const std::string& name, const Tensor& t,
                               const std::string& dir) {
  const std::string sn = name + "_scale_inv";
  if (!ws.has(sn)) fail("fp8 tensor {} has no {} in {}", name, sn, dir);
  if (t.ndim() != 2) fail("fp8 tensor {} must be a 2-D weight, got {}", name, shape_str(t.shape));
  const int64_t N = t.dim(0), K = t.dim(1), bn = cfg.fp8_block_n, bk = cfg.fp8_block_k;
  Tensor sc = ws.get(sn);
  const Shape want = {(N + bn - 1) / bn, (K + bk - 1) / bk};
  if (sc.shape != want)
    fail("tensor {}: expected shape {} for weight {} with {}x{} blocks, got {}", sn, shape_str(want),
         shape_str(t.shape), bn, bk, shape_str(sc.shape));
  if (sc.dtype != DType::F32 && sc.dtype != DType::BF16 && sc.dtype != DType::F16)
    fail("tensor {} in {} has dtype {}; expected a float type", sn, dir, dtype_name(sc.dtype));
  std::vector<float> scale(size_t(sc.numel()));
  convert_to_f32(sc.dtype, sc.data, scale.data(), scale.size());
  for (float v : scale)
    if (!std::isfinite(v) || v < 0.f) fail("tensor {} in {} holds a negative or non-finite scale", sn, dir);
  return scale;
}

ModelWeights build_fp8(const ModelConfig& cfg, const Source& ws, const std::string& dir, Backend* target) {
  std::unique_ptr<Backend> own;
  if (!target) own = make_cpu_backend();
  Backend& be = target ? *target : *own;
  ModelWeights w;
  w.cfg = cfg;
  w.layout = make_fp8_param_layout(cfg);
  const ParamLayout& L = w.layout;
  for (auto& s : L.specs)
    if (!s.is_bias && !ws.has(s.name))
      fail("missing tensor {} in {} (expected shape {})", s.name, dir, shape_str(s.shape));
  w.flat = be.alloc(DType::BF16, {std::max<int64_t>(L.num_params, 1)}, "params");
  w.flat8 = be.alloc(DType::F8E4M3, {std::max<int64_t>(L.num_fp8, 1)}, "params_fp8");
  w.scale_flat = be.alloc(DType::F32, {std::max<int64_t>(L.num_scales, 1)}, "params_fp8_scales");
  w.bias_flat = Tensor::zeros(DType::F32, {std::max<int64_t>(L.num_bias, 1)}, "biases");
  auto put = [&](const ParamSpec& s) {
    if (s.is_bias && !ws.has(s.name)) fail("missing tensor {} in {} (expected shape {})", s.name, dir, shape_str(s.shape));
    Tensor t = ws.get(s.name);
    if (t.shape != s.shape)
      fail("tensor {} in {}: expected shape {} from config.json, got {}", s.name, dir, shape_str(s.shape), shape_str(t.shape));
    const bool src8 = t.dtype == DType::F8E4M3;
    if (!src8 && t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16)
      fail("tensor {} in {} has dtype {}; expected a float type", s.name, dir, dtype_name(t.dtype));
    if (src8 && s.is_bias) fail("fp8 tensor {} must be a 2-D weight, got {}", s.name, shape_str(t.shape));
    if (s.is_bias) {
      write_weights_host(w.bias_flat, s.offset, t.data, t.dtype, t.numel());
      return;
    }
    if (!s.fp8) {  // kept in bf16: fp8 sources dequantized exactly, then rounded
      if (src8) {
        std::vector<float> scale = read_scales(ws, cfg, s.name, t, dir);
        be.write_weights_fp8(w.flat, s.offset, static_cast<const uint8_t*>(t.data), scale.data(), t.dim(0), t.dim(1),
                             cfg.fp8_block_n, cfg.fp8_block_k);
      } else {
        be.write_weights(w.flat, s.offset, t.data, t.dtype, t.numel());
      }
      return;
    }
    const int64_t N = s.shape[0], K = s.shape[1], nscale = fp8::tiles(N) * fp8::tiles(K);
    if (src8) {
      std::vector<float> scale = read_scales(ws, cfg, s.name, t, dir);
      if (cfg.fp8_block_n == fp8::kTile && cfg.fp8_block_k == fp8::kTile) {  // the release layout: as stored
        be.write_raw(w.flat8, size_t(s.offset), t.data, size_t(N * K));
        be.write_raw(w.scale_flat, size_t(s.scale_offset) * 4, scale.data(), size_t(nscale) * 4);
        return;
      }
      // Other block sizes: dequantize exactly, then requantize in 128x128 blocks.
      std::vector<float> v(size_t(N * K));
      const auto* w8 = static_cast<const uint8_t*>(t.data);
      const int64_t bn = cfg.fp8_block_n, bk = cfg.fp8_block_k, kb = (K + bk - 1) / bk;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k)
          v[size_t(n * K + k)] = fp8::e4m3_to_f32(w8[n * K + k]) * scale[size_t((n / bn) * kb + k / bk)];
      std::vector<uint8_t> codes(size_t(N * K));
      std::vector<float> sc(static_cast<size_t>(nscale));
      fp8::quantize_128x128(codes.data(), sc.data(), v.data(), N, K);
      be.write_raw(w.flat8, size_t(s.offset), codes.data(), codes.size());
      be.write_raw(w.scale_flat, size_t(s.scale_offset) * 4, sc.data(), sc.size() * 4);
      return;
    }
    std::vector<float> v(size_t(N * K));
    convert_to_f32(t.dtype, t.data, v.data(), v.size());
    for (float x : v)
      if (!std::isfinite(x)) fail("tensor {} in {} holds NaN or Inf values; cannot quantize it to fp8", s.name, dir);
    std::vector<uint8_t> codes(size_t(N * K));
    std::vector<float> sc(static_cast<size_t>(nscale));
    fp8::quantize_128x128(codes.data(), sc.data(), v.data(), N, K);
    be.write_raw(w.flat8, size_t(s.offset), codes.data(), codes.size());
    be.write_raw(w.scale_flat, size_t(s.scale_offset) * 4, sc.data(), sc.size() * 4);
  };
  std::vector<std::string> errors;
  auto guarded = [&](const ParamSpec& s) {
    try {
      put(s);
    } catch (const std::exception& e) {
#pragma omp critical
      errors.push_back(e.what());
    }
  };
  if (be.device() != Device::CPU) {
    for (const ParamSpec& s : L.specs) guarded(s);  // device copies are ordered on one stream
  } else {
#pragma omp parallel for schedule(dynamic)
    for (size_t i = 0; i < L.specs.size(); ++i) guarded(L.specs[i]);
  }
  if (!errors.empty()) {
    std::sort(errors.begin(), errors.end());
    throw InputError(errors.front());
  }
  if (be.device() != Device::CPU) w.bias_flat = be.upload(w.bias_flat);
  w.bind();
  return w;
}

}  // namespace

ModelWeights load_weights_fp8(const ModelConfig& cfg, const std::string& dir, Backend* target) {
  WeightSet ws(dir);
  Source src{[&](const std::string& n) { return ws.has(n); }, [&](const std::string& n) { return ws.get(n); }};
  return build_fp8(cfg, src, dir, target);
}

ModelWeights quantize_weights_fp8(ModelWeights& host, Backend* target) {
  DSV3_CHECK(!host.layout.fp8 && host.flat.device == Device::CPU, "quantize_weights_fp8 needs plain host weights");
  Source src{[&](const std::string& n) { return host.layout.index.count(n) != 0; },
             [&](const std::string& n) { return host.view(n); }};
  return build_fp8(host.cfg, src, "memory", target);
}

}  // namespace dsv3
