#include "model/weights.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/fp8.h"
#include "core/rng.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "ops/backend.h"

namespace dsv3 {

namespace fs = std::filesystem;

const ParamSpec& ParamLayout::at(const std::string& name) const {
  auto it = index.find(name);
  if (it == index.end()) fail("no parameter named {}", name);
  return specs[it->second];
}

namespace {

void add_layer_specs(const ModelConfig& c, int64_t li, int64_t elo, int64_t en, std::vector<ParamSpec>& out) {
  const std::string p = "model.layers." + std::to_string(li) + ".";
  const int64_t H = c.hidden_size, nh = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim,
                dv = c.v_head_dim, r = c.kv_lora_rank;
  auto add = [&](std::string n, Shape s, bool norm = false, bool bias = false, bool zero = false) {
    ParamSpec ps;
    ps.name = p + n;
    ps.shape = std::move(s);
    ps.is_norm = norm;
    ps.is_bias = bias;
    ps.init_zero = zero;
    out.push_back(ps);
  };
  add("input_layernorm.weight", {H}, true);
  if (c.q_lora_rank > 0) {
    add("self_attn.q_a_proj.weight", {c.q_lora_rank, H});
    add("self_attn.q_a_layernorm.weight", {c.q_lora_rank}, true);
    add("self_attn.q_b_proj.weight", {nh * (dn + dr), c.q_lora_rank});
  } else {
    add("self_attn.q_proj.weight", {nh * (dn + dr), H});
  }
  add("self_attn.kv_a_proj_with_mqa.weight", {r + dr, H});
  add("self_attn.kv_a_layernorm.weight", {r}, true);
  add("self_attn.kv_b_proj.weight", {nh * (dn + dv), r});
  add("self_attn.o_proj.weight", {H, nh * dv});
  if (c.has_indexer()) {
    const int64_t nI = c.index_n_heads, dI = c.index_head_dim;
    add("self_attn.indexer.wq_b.weight", {nI * dI, c.q_lora_rank});
    add("self_attn.indexer.wk.weight", {dI, H});
    add("self_attn.indexer.k_norm.weight", {dI}, true);
    add("self_attn.indexer.k_norm.bias", {dI}, false, false, true);
    add("self_attn.indexer.weights_proj.weight", {nI, H});
  }
  add("post_attention_layernorm.weight", {H}, true);
  if (c.is_moe_layer(li)) {
    const int64_t E = c.n_routed_experts, I = c.moe_intermediate_size;
    add("mlp.gate.weight", {E, H});
    if (c.topk_method == "noaux_tc") add("mlp.gate.e_score_correction_bias", {E}, false, true);
    for (const char* w : {"gate_proj", "up_proj", "down_proj"})
      for (int64_t e = elo; e < elo + en; ++e)
        add("mlp.experts." + std::to_string(e) + "." + w + ".weight", std::string(w) == "down_proj" ? Shape{H, I} : Shape{I, H});
    if (c.n_shared_experts > 0) {
      const int64_t Is = I * c.n_shared_experts;
      add("mlp.shared_experts.gate_proj.weight", {Is, H});
      add("mlp.shared_experts.up_proj.weight", {Is, H});
      add("mlp.shared_experts.down_proj.weight", {H, Is});
    }
  } else {
    const int64_t I = c.intermediate_size;
    add("mlp.gate_proj.weight", {I, H});
    add("mlp.up_proj.weight", {I, H});
    add("mlp.down_proj.weight", {H, I});
  }
}

}  // namespace

bool fp8_release_quantized(const std::string& name, const Shape& shape) {
  if (shape.size() != 2) return false;
  auto ends = [&](const char* suf) {
    const size_t n = std::strlen(suf);
    return name.size() >= n && name.compare(name.size() - n, n, suf) == 0;
  };
  // Kept in higher precision by the release: embedding, output head, router; everything else 2-D is fp8.
  return !(ends("embed_tokens.weight") || ends("lm_head.weight") || ends("shared_head.head.weight") ||
           ends("mlp.gate.weight"));
}

bool fp8_inference_quantized(const std::string& name, const Shape& shape) {
  return fp8_release_quantized(name, shape) && name.find("kv_b_proj") == std::string::npos;
}

ParamLayout make_param_layout(const ModelConfig& c, int64_t expert_lo, int64_t expert_n, bool fp8) {
  ParamLayout L;
  L.fp8 = fp8;
  if (expert_n < 0) expert_lo = 0, expert_n = c.n_routed_experts;
  if (expert_lo < 0 || expert_lo + expert_n > c.n_routed_experts)
    fail("internal: expert slice [{}, {}) outside the {} routed experts", expert_lo, expert_lo + expert_n,
         c.n_routed_experts);
  L.expert_lo = expert_lo, L.expert_n = expert_n;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  L.specs.push_back({"model.embed_tokens.weight", {V, H}});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) add_layer_specs(c, i, expert_lo, expert_n, L.specs);
  L.specs.push_back({"model.norm.weight", {H}, 0, false, true});
  L.specs.push_back({"lm_head.weight", {V, H}});
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const int64_t li = c.num_hidden_layers + k;
    const std::string p = "model.layers." + std::to_string(li) + ".";
    L.specs.push_back({p + "enorm.weight", {H}, 0, false, true});
    L.specs.push_back({p + "hnorm.weight", {H}, 0, false, true});
    L.specs.push_back({p + "eh_proj.weight", {H, 2 * H}});
    add_layer_specs(c, li, expert_lo, expert_n, L.specs);
    L.specs.push_back({p + "shared_head.norm.weight", {H}, 0, false, true});
  }
  for (size_t i = 0; i < L.specs.size(); ++i) {
    auto& s = L.specs[i];
    if (fp8 && !s.is_bias && fp8_inference_quantized(s.name, s.shape)) {
      // Specs come in layout order, so a layer's experts (and their scale grids) stay contiguous here too.
      s.fp8 = true;
      s.offset = L.num_fp8;
      s.scale_offset = L.num_scales;
      L.num_fp8 += shape_numel(s.shape);
      L.num_scales += fp8::tiles(s.shape[0]) * fp8::tiles(s.shape[1]);
      L.index[s.name] = i;
      continue;
    }
    int64_t& counter = s.is_bias ? L.num_bias : L.num_params;
    s.offset = counter;
    counter += shape_numel(s.shape);
    L.index[s.name] = i;
  }
  return L;
}

Tensor ModelWeights::view(const std::string& name) {
  const ParamSpec& s = layout.at(name);
  if (s.fp8) {
    Tensor t = flat8;
    t.name = name;
    t.shape = s.shape;
    t.data = static_cast<char*>(flat8.data) + size_t(s.offset);
    t.scale = static_cast<const float*>(scale_flat.data) + s.scale_offset;
    return t;
  }
  Tensor& base = s.is_bias ? bias_flat : flat;
  Tensor t = base;
  t.name = name;
  t.shape = s.shape;
  t.data = static_cast<char*>(base.data) + size_t(s.offset) * dtype_size(base.dtype);
  return t;
}

namespace {

// The layout's experts [lo, lo + E) of one projection as one grouped tensor [E, ...].
Tensor grouped(ModelWeights& w, const std::string& prefix, int64_t lo, int64_t E, const char* which) {
  if (E == 0) return Tensor();
  Tensor first = w.view(prefix + "experts." + std::to_string(lo) + "." + which + ".weight");
  Tensor g = first;
  g.name = prefix + "experts.*." + which + ".weight";
  g.shape = {E, first.shape[0], first.shape[1]};
  // The layout places experts.e.<which> right after experts.(e-1).<which>; check it once.
  if (E > 1) {
    Tensor last = w.view(prefix + "experts." + std::to_string(lo + E - 1) + "." + which + ".weight");
    DSV3_CHECK(static_cast<char*>(last.data) - static_cast<char*>(first.data) ==
                   ptrdiff_t((E - 1) * first.numel() * dtype_size(first.dtype)),
               "experts of {} are not contiguous", prefix);
  }
  return g;
}

void bind_layer(ModelWeights& w, const ModelConfig& c, LayerWeights& L, int64_t li) {
  const std::string p = "model.layers." + std::to_string(li) + ".";
  L.index = li;
  L.input_norm = w.view(p + "input_layernorm.weight");
  L.post_norm = w.view(p + "post_attention_layernorm.weight");
  auto& a = L.attn;
  if (c.q_lora_rank > 0) {
    a.q_a_proj = w.view(p + "self_attn.q_a_proj.weight");
    a.q_a_norm = w.view(p + "self_attn.q_a_layernorm.weight");
    a.q_b_proj = w.view(p + "self_attn.q_b_proj.weight");
  } else {
    a.q_proj = w.view(p + "self_attn.q_proj.weight");
  }
  a.kv_a_proj = w.view(p + "self_attn.kv_a_proj_with_mqa.weight");
  a.kv_a_norm = w.view(p + "self_attn.kv_a_layernorm.weight");
  a.kv_b_proj = w.view(p + "self_attn.kv_b_proj.weight");
  a.o_proj = w.view(p + "self_attn.o_proj.weight");
  a.has_indexer = c.has_indexer();
  if (a.has_indexer) {
    a.indexer.wq_b = w.view(p + "self_attn.indexer.wq_b.weight");
    a.indexer.wk = w.view(p + "self_attn.indexer.wk.weight");
    a.indexer.k_norm_w = w.view(p + "self_attn.indexer.k_norm.weight");
    a.indexer.k_norm_b = w.view(p + "self_attn.indexer.k_norm.bias");
    a.indexer.weights_proj = w.view(p + "self_attn.indexer.weights_proj.weight");
  }
  L.is_moe = c.is_moe_layer(li);
  if (L.is_moe) {
    auto& m = L.moe;
    m.router = w.view(p + "mlp.gate.weight");
    if (c.topk_method == "noaux_tc") m.bias = w.view(p + "mlp.gate.e_score_correction_bias");
    m.gate = grouped(w, p + "mlp.", w.layout.expert_lo, w.layout.expert_n, "gate_proj");
    m.up = grouped(w, p + "mlp.", w.layout.expert_lo, w.layout.expert_n, "up_proj");
    m.down = grouped(w, p + "mlp.", w.layout.expert_lo, w.layout.expert_n, "down_proj");
    m.has_shared = c.n_shared_experts > 0;
    if (m.has_shared) {
      m.shared.gate = w.view(p + "mlp.shared_experts.gate_proj.weight");
      m.shared.up = w.view(p + "mlp.shared_experts.up_proj.weight");
      m.shared.down = w.view(p + "mlp.shared_experts.down_proj.weight");
    }
  } else {
    L.mlp.gate = w.view(p + "mlp.gate_proj.weight");
    L.mlp.up = w.view(p + "mlp.up_proj.weight");
    L.mlp.down = w.view(p + "mlp.down_proj.weight");
  }
}

}  // namespace

void ModelWeights::bind() {
  const ModelConfig& c = cfg;
  embed = view("model.embed_tokens.weight");
  final_norm = view("model.norm.weight");
  lm_head = view("lm_head.weight");
  layers.assign(c.num_hidden_layers, {});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) bind_layer(*this, c, layers[i], i);
  mtp.assign(c.num_nextn_predict_layers, {});
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const int64_t li = c.num_hidden_layers + k;
    const std::string p = "model.layers." + std::to_string(li) + ".";
    mtp[k].enorm = view(p + "enorm.weight");
    mtp[k].hnorm = view(p + "hnorm.weight");
    mtp[k].eh_proj = view(p + "eh_proj.weight");
    mtp[k].head_norm = view(p + "shared_head.norm.weight");
    bind_layer(*this, c, mtp[k].layer, li);
  }
}

ModelWeights alloc_weights(const ModelConfig& cfg, DType dtype, bool allocate_flat, int64_t expert_lo,
                           int64_t expert_n) {
  ModelWeights w;
  w.cfg = cfg;
  w.layout = make_param_layout(cfg, expert_lo, expert_n);
  if (allocate_flat) w.flat = Tensor::zeros(dtype, {w.layout.num_params}, "params");
  w.bias_flat = Tensor::zeros(DType::F32, {std::max<int64_t>(w.layout.num_bias, 1)}, "biases");
  if (allocate_flat) w.bind();
  return w;
}

size_t weight_bytes(const ModelWeights& w) { return w.flat.nbytes() + w.flat8.nbytes() + w.scale_flat.nbytes(); }

ModelWeights load_weights(const ModelConfig& cfg, const std::string& dir, const LoadOptions& opt, Backend* target) {
  if (opt.dtype == "fp8") return load_weights_fp8(cfg, dir, target);
  WeightSet ws(dir);
  ParamLayout layout = make_param_layout(cfg, opt.expert_lo, opt.expert_n);
  // Decide the buffer dtype: bf16 only if every parameter is stored as bf16 (then it stays bf16 in memory).
  DType dt = DType::BF16;
  for (auto& s : layout.specs) {
    if (s.is_bias) continue;
    if (!ws.has(s.name)) fail("missing tensor {} in {} (expected shape {})", s.name, dir, shape_str(s.shape));
    Tensor t = ws.get(s.name);
    if (t.dtype != DType::BF16) dt = DType::F32;
  }
  if (opt.dtype == "f32") dt = DType::F32;
  else if (opt.dtype == "bf16") dt = DType::BF16;
  else if (opt.dtype != "auto") fail("unknown --dtype '{}' (auto, f32, bf16 or fp8)", opt.dtype);
  // A device backend gets its parameter buffer directly: every tensor goes from the mmap'd file to the device
  // (converted there), so the host never holds the whole model. Biases are small: host first, then uploaded.
  const bool device = target && target->device() != Device::CPU;
  ModelWeights w = alloc_weights(cfg, device ? DType::F32 : dt, /*allocate_flat=*/!device, opt.expert_lo, opt.expert_n);
  if (device) w.flat = target->alloc(dt, {layout.num_params}, "params");
  std::vector<std::string> errors;
  // One tensor: checks, then conversion into its place (fp8: times the block scales, exactly as in fp32).
  auto put = [&](const ParamSpec& s) {
    if (s.is_bias && !ws.has(s.name)) fail("missing tensor {} in {} (expected shape {})", s.name, dir, shape_str(s.shape));
    Tensor t = ws.get(s.name);
    if (t.shape != s.shape)
      fail("tensor {} in {}: expected shape {} from config.json, got {}", s.name, dir, shape_str(s.shape), shape_str(t.shape));
    if (t.dtype == DType::F8E4M3) {
      std::string sn = s.name + "_scale_inv";
      if (!ws.has(sn)) fail("fp8 tensor {} has no {} in {}", s.name, sn, dir);
      if (t.ndim() != 2 || s.is_bias) fail("fp8 tensor {} must be a 2-D weight, got {}", s.name, shape_str(t.shape));
      const int64_t N = t.dim(0), K = t.dim(1), bn = cfg.fp8_block_n, bk = cfg.fp8_block_k;
      Tensor sc = ws.get(sn);
      const Shape want = {(N + bn - 1) / bn, (K + bk - 1) / bk};
      if (sc.shape != want)
        fail("tensor {}: expected shape {} for weight {} with {}x{} blocks, got {}", sn, shape_str(want),
             shape_str(t.shape), bn, bk, shape_str(sc.shape));
      if (sc.dtype != DType::F32 && sc.dtype != DType::BF16 && sc.dtype != DType::F16)
        fail("tensor {} in {} has dtype {}; expected a float type", sn, dir, dtype_name(sc.dtype));
      std::vector<float> scale(static_cast<size_t>(sc.numel()));
      convert_to_f32(sc.dtype, sc.data, scale.data(), scale.size());
      const auto* w8 = static_cast<const uint8_t*>(t.data);
      if (device) target->write_weights_fp8(w.flat, s.offset, w8, scale.data(), N, K, bn, bk);
      else write_weights_fp8_host(w.flat, s.offset, w8, scale.data(), N, K, bn, bk);
    } else if (t.dtype == DType::F32 || t.dtype == DType::BF16 || t.dtype == DType::F16) {
      if (s.is_bias) write_weights_host(w.bias_flat, s.offset, t.data, t.dtype, t.numel());
      else if (device) target->write_weights(w.flat, s.offset, t.data, t.dtype, t.numel());
      else write_weights_host(w.flat, s.offset, t.data, t.dtype, t.numel());
    } else {
      fail("tensor {} in {} has dtype {}; expected a float type", s.name, dir, dtype_name(t.dtype));
    }
  };
  auto guarded = [&](const ParamSpec& s) {
    try {
      put(s);
    } catch (const std::exception& e) {
#pragma omp critical
      errors.push_back(e.what());
    }
  };
  if (device) {
    for (const ParamSpec& s : layout.specs) guarded(s);  // the device copies are ordered on one stream
  } else {
#pragma omp parallel for schedule(dynamic)
    for (size_t i = 0; i < layout.specs.size(); ++i) guarded(layout.specs[i]);
  }
  if (!errors.empty()) {
    std::sort(errors.begin(), errors.end());
    throw InputError(errors.front());
  }
  if (device) {
    w.bias_flat = target->upload(w.bias_flat);
    w.bind();
  }
  // MTP copies of the shared embedding and head: checked for shape if present (they duplicate the main ones).
  for (int64_t k = 0; k < cfg.num_nextn_predict_layers; ++k) {
    const std::string p = "model.layers." + std::to_string(cfg.num_hidden_layers + k) + ".";
    for (const char* n : {"embed_tokens.weight", "shared_head.head.weight"})
      if (ws.has(p + n) && ws.get(p + n).shape != Shape{cfg.vocab_size, cfg.hidden_size})
        fail("tensor {}{} in {}: expected shape {}", p, n, dir, shape_str({cfg.vocab_size, cfg.hidden_size}));
  }
  return w;
}

ModelWeights init_weights(const ModelConfig& cfg, uint64_t seed, DType dtype) {
  ModelWeights w = alloc_weights(cfg, dtype);
  const auto& specs = w.layout.specs;
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < specs.size(); ++i) {
    const ParamSpec& s = specs[i];
    if (s.is_bias) continue;  // zeros
    const int64_t n = shape_numel(s.shape);
    std::vector<float> v(n);
    if (s.is_norm || s.init_zero) {
      std::fill(v.begin(), v.end(), s.is_norm ? 1.f : 0.f);
    } else {
      Rng rng(hash_str(s.name.c_str(), seed * 0x9e3779b97f4a7c15ull + 1));  // per-tensor stream: order-free
      for (auto& x : v) x = float(rng.normal() * cfg.initializer_range);
    }
    write_weights_host(w.flat, s.offset, v.data(), DType::F32, n);
  }
  return w;
}

void save_weights(const ModelConfig& cfg, const ModelWeights& w, const std::string& dir, DType dtype) {
  fs::create_directories(dir);
  std::vector<Tensor> out;
  auto emit = [&](const std::string& name, const ParamSpec& s) {
    const Tensor& base = s.is_bias ? w.bias_flat : w.flat;
    DSV3_CHECK(base.device == Device::CPU, "save_weights needs CPU weights");
    const DType odt = s.is_bias ? DType::F32 : dtype;
    Tensor t = Tensor::empty(odt, s.shape, name);
    const int64_t n = t.numel();
    std::vector<float> v(n);
    if (s.fp8) {  // FP8 layout: code x block scale, exactly
      DSV3_CHECK(w.flat8.device == Device::CPU, "save_weights needs CPU weights");
      fp8::dequantize_128x128(v.data(), static_cast<const uint8_t*>(w.flat8.data) + s.offset,
                              w.scale_flat.f32() + s.scale_offset, s.shape[0], s.shape[1]);
    } else {
      convert_to_f32(base.dtype, static_cast<const char*>(base.data) + size_t(s.offset) * dtype_size(base.dtype), v.data(), n);
    }
    if (odt == DType::F32) std::copy(v.begin(), v.end(), t.ptr<float>());
    else for (int64_t i = 0; i < n; ++i) t.ptr<uint16_t>()[i] = f32_to_bf16(v[i]);
    out.push_back(std::move(t));
  };
  for (auto& s : w.layout.specs) emit(s.name, s);
  for (int64_t k = 0; k < cfg.num_nextn_predict_layers; ++k) {
    const std::string p = "model.layers." + std::to_string(cfg.num_hidden_layers + k) + ".";
    emit(p + "embed_tokens.weight", w.layout.at("model.embed_tokens.weight"));
    emit(p + "shared_head.head.weight", w.layout.at("lm_head.weight"));
  }
  write_safetensors((fs::path(dir) / "model.safetensors").string(), out, {{"format", "pt"}});
  ModelConfig c = cfg;
  c.torch_dtype = dtype == DType::F32 ? "float32" : "bfloat16";
  c.fp8 = false;
  write_file_atomic((fs::path(dir) / "config.json").string(), c.to_json().dump(2) + "\n");
}

}  // namespace dsv3
