#include "model/v4_weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "io/safetensors.h"
#include "ops/backend.h"

namespace dsv3 {

namespace {

struct SpecAdder {
  ParamLayout& L;
  std::vector<V4Store>& store;
  void operator()(std::string name, Shape s, V4Store st = V4Store::Plain, bool norm = false, bool bias = false) {
    ParamSpec p;
    p.name = std::move(name);
    p.shape = std::move(s);
    p.is_norm = norm;
    p.is_bias = bias;
    L.specs.push_back(p);
    store.push_back(st);
  }
};

}  // namespace

// Shapes (d hidden, N hc_mult, H heads, c head_dim, d_c q_lora_rank, g o_groups, d_g o_lora_rank, F expert width,
// E experts, m / m' compression rates, c_I / H_I indexer width / heads): see the spec's checkpoint table.
ParamLayout make_v4_param_layout(const V4Config& c, std::vector<V4Store>* store_out) {
  ParamLayout L;
  std::vector<V4Store> store;
  SpecAdder add{L, store};
  const int64_t d = c.hidden_size, N = c.hc_mult, H = c.num_attention_heads, hd = c.head_dim, dc = c.q_lora_rank,
                g = c.o_groups, dg = c.o_lora_rank, F = c.moe_intermediate_size, E = c.n_routed_experts,
                cI = c.index_head_dim, HI = c.index_n_heads, V = c.vocab_size;
  const int64_t mix = (2 + N) * N;  // mHC rows: N pre, N post, N*N residual
  add("embed.weight", {V, d});
  // One V4 block (main layer l, or MTP block k = l - num_hidden_layers), names under prefix p.
  auto block = [&](int64_t l) {
    const std::string p = c.block_prefix(l);
    add(p + "attn_norm.weight", {d}, V4Store::Plain, true);
    add(p + "ffn_norm.weight", {d}, V4Store::Plain, true);
    for (const char* hc : {"hc_attn_", "hc_ffn_"}) {
      add(p + hc + "fn", {mix, N * d});
      add(p + hc + "base", {mix});
      add(p + hc + "scale", {3});
    }
    add(p + "attn.attn_sink", {H});
    add(p + "attn.wq_a.weight", {dc, d}, V4Store::Fp8);
    add(p + "attn.q_norm.weight", {dc}, V4Store::Plain, true);
    add(p + "attn.wq_b.weight", {H * hd, dc}, V4Store::Fp8);
    add(p + "attn.wkv.weight", {hd, d}, V4Store::Fp8);
    add(p + "attn.kv_norm.weight", {hd}, V4Store::Plain, true);
    add(p + "attn.wo_a.weight", {g * dg, H * hd / g}, V4Store::Fp8);
    add(p + "attn.wo_b.weight", {d, g * dg}, V4Store::Fp8);
    const V4Attn t = c.attn_type(l);
    if (t != V4Attn::Sliding) {
      const bool csa = t == V4Attn::CSA;
      const int64_t m = c.compress_rate(l), w = csa ? 2 * hd : hd;  // CSA: overlapped windows, two halves
      add(p + "attn.compressor.wkv.weight", {w, d});
      add(p + "attn.compressor.wgate.weight", {w, d});
      add(p + "attn.compressor.ape", {m, w});
      add(p + "attn.compressor.norm.weight", {hd}, V4Store::Plain, true);
      if (csa) {
        add(p + "attn.indexer.wq_b.weight", {HI * cI, dc}, V4Store::Fp8);
        add(p + "attn.indexer.weights_proj.weight", {HI, d});
        add(p + "attn.indexer.compressor.wkv.weight", {2 * cI, d});
        add(p + "attn.indexer.compressor.wgate.weight", {2 * cI, d});
        add(p + "attn.indexer.compressor.ape", {m, 2 * cI});
        add(p + "attn.indexer.compressor.norm.weight", {cI}, V4Store::Plain, true);
      }
    }
    add(p + "ffn.gate.weight", {E, d});
    if (c.mlp_type(l) == V4Mlp::Moe) add(p + "ffn.gate.bias", {E}, V4Store::Plain, false, true);
    for (const char* w : {"w1", "w3", "w2"})  // experts of one kind contiguous: grouped [E, F, d] / [E, d, F]
      for (int64_t e = 0; e < E; ++e)
        add(p + "ffn.experts." + std::to_string(e) + "." + w + ".weight", std::string(w) == "w2" ? Shape{d, F} : Shape{F, d},
            V4Store::Expert);
    add(p + "ffn.shared_experts.w1.weight", {F, d}, V4Store::Fp8);
    add(p + "ffn.shared_experts.w3.weight", {F, d}, V4Store::Fp8);
    add(p + "ffn.shared_experts.w2.weight", {d, F}, V4Store::Fp8);
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) block(l);
  add("norm.weight", {d}, V4Store::Plain, true);
  add("hc_head_fn", {N, N * d});
  add("hc_head_base", {N});
  add("hc_head_scale", {1});
  add("head.weight", {V, d});
  // MTP blocks after the main model (so the main model's offsets do not depend on them): the input projections
  // and norms, the block, its own hc_head and norm (the embedding and head are the main model's).
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const std::string p = "mtp." + std::to_string(k) + ".";
    add(p + "e_proj.weight", {d, d}, V4Store::Fp8);
    add(p + "h_proj.weight", {d, d}, V4Store::Fp8);
    add(p + "enorm.weight", {d}, V4Store::Plain, true);
    add(p + "hnorm.weight", {d}, V4Store::Plain, true);
    block(c.num_hidden_layers + k);
    add(p + "norm.weight", {d}, V4Store::Plain, true);
    add(p + "hc_head_fn", {N, N * d});
    add(p + "hc_head_base", {N});
    add(p + "hc_head_scale", {1});
  }
  for (size_t i = 0; i < L.specs.size(); ++i) {
    auto& s = L.specs[i];
    int64_t& counter = s.is_bias ? L.num_bias : L.num_params;
    s.offset = counter;
    counter += shape_numel(s.shape);
    L.index[s.name] = i;
  }
  if (store_out) *store_out = std::move(store);
  return L;
}

namespace {

// The names a tensor may have in a checkpoint: the release name, then transformers' save_pretrained spelling.
std::vector<std::string> candidate_names(const std::string& n) {
  std::vector<std::string> out = {n};
  if (n == "embed.weight") out.push_back("model.embed_tokens.weight");
  else if (n == "norm.weight") out.push_back("model.norm.weight");
  else if (n == "head.weight") out.push_back("lm_head.weight");
  else if (n.rfind("hc_head_", 0) == 0) out.push_back("model.hc_head.hc_" + n.substr(8));
  else out.push_back("model." + n);
  const std::string kv = ".attn.kv_norm.weight";
  if (n.size() > kv.size() && n.compare(n.size() - kv.size(), kv.size(), kv) == 0) {
    const std::string alt = n.substr(0, n.size() - kv.size()) + ".attn.norm.weight";
    out.push_back(alt);
    out.push_back("model." + alt);
  }
  return out;
}

// Scale tensor names of a quantized weight X.weight: the release's X.scale or X.weight_scale_inv.
std::vector<std::string> scale_names(const std::string& found) {
  const std::string w = ".weight";
  std::string base = found.size() > w.size() ? found.substr(0, found.size() - w.size()) : found;
  return {base + ".scale", found + "_scale_inv"};
}

std::vector<float> scale_values(const Tensor& sc, const std::string& name, const std::string& dir) {
  if (sc.dtype != DType::F8E8M0 && sc.dtype != DType::F32 && sc.dtype != DType::BF16 && sc.dtype != DType::F16)
    fail("tensor {} in {} has dtype {}; expected F8_E8M0 or a float type", name, dir, dtype_name(sc.dtype));
  std::vector<float> v(size_t(sc.numel()));
  convert_to_f32(sc.dtype, sc.data, v.data(), v.size());
  for (float x : v)
    if (!(x > 0) || !std::isfinite(x)) fail("tensor {} in {} holds a scale that is not a positive finite number", name, dir);
  return v;
}

// A quantized weight [N, K] (FP8 codes [N, K] with [ceil(N/bn), ceil(K/bk)] block scales, or FP4 pairs [N, K/2]
// with [N, K/32] scales) as bf16 into dst: code x scale in fp32 (the fp32 path's values), in chunks of rows so
// that no fp32 copy of the tensor is made, each value checked to be exact in bf16 (see v4_weights.h).
void quantized_to_bf16(uint16_t* dst, const uint8_t* data, bool fp4, const float* scale, int64_t N, int64_t K,
                       int64_t bn, int64_t bk, const std::string& name, const std::string& dir) {
  const int64_t chunk = fp4 ? 128 : bn, sk = (K + bk - 1) / bk;
  std::vector<float> v(static_cast<size_t>(std::min(chunk, N) * K));
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    if (fp4) {
      dequant_fp4_e2m1(v.data(), data + r0 * (K / 2), scale + r0 * sk, rows, K, bk);
    } else {
      convert_to_f32(DType::F8E4M3, data + r0 * K, v.data(), size_t(rows * K));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < K; ++c) v[size_t(r * K + c)] *= scale[((r0 + r) / bn) * sk + c / bk];
    }
    for (int64_t i = 0; i < rows * K; ++i) {
      const float x = v[size_t(i)];
      const uint16_t b = f32_to_bf16(x);
      if (bf16_to_f32(b) != x && !std::isnan(x))
        fail("tensor {} in {}: element [{}, {}] = {:g} (code x scale) is not exactly representable in bf16 (a scale "
             "that is not a power of two, or a tiny one); load this checkpoint with --dtype f32",
             name, dir, r0 + i / K, i % K, x);
      dst[r0 * K + i] = b;
    }
  }
}

}  // namespace

bool v4_bf16_resident(const ParamSpec& s) {
  if (s.shape.size() != 2 || s.is_bias) return false;
  const std::string& n = s.name;
  auto ends = [&](const std::string& suf) { return n.size() >= suf.size() && n.compare(n.size() - suf.size(), suf.size(), suf) == 0; };
  return n.find("hc_") == std::string::npos && !ends(".ape") && !ends("ffn.gate.weight");
}

int64_t v4_weight_bytes(const ParamLayout& L, DType matrices) {
  int64_t b = 0;
  for (const ParamSpec& s : L.specs)
    b += shape_numel(s.shape) * (matrices == DType::BF16 && v4_bf16_resident(s) ? 2 : 4);
  return b;
}

void dequant_fp4_e2m1(float* out, const uint8_t* packed, const float* scale, int64_t N, int64_t K, int64_t block) {
  const int64_t sk = (K + block - 1) / block;
  for (int64_t r = 0; r < N; ++r)
    for (int64_t c = 0; c < K; ++c) {
      const uint8_t b = packed[r * (K / 2) + c / 2];
      out[r * K + c] = fp4e2m1_to_f32(c % 2 ? uint8_t(b >> 4) : uint8_t(b & 15)) * scale[r * sk + c / block];
    }
}

Tensor V4Weights::view(const std::string& name) const {
  const ParamSpec& s = layout.at(name);
  const V4Place p = s.is_bias || place.empty() ? V4Place{false, s.offset} : place[layout.index.at(name)];
  const Tensor& base = s.is_bias ? bias_flat : p.bf16 ? flat16 : flat;
  Tensor t = base;
  t.name = name;
  t.shape = s.shape;
  t.data = static_cast<char*>(base.data) + size_t(p.offset) * dtype_size(base.dtype);
  return t;
}

V4Weights load_v4_weights(const V4Config& c_in, const std::string& dir, bool dequantize, DType matrices) {
  if (matrices != DType::F32 && matrices != DType::BF16)
    fail("DeepSeek-V4 weights load as F32 or BF16, not {}", dtype_name(matrices));
  WeightSet ws(dir);
  V4Weights w;
  w.cfg = c_in;
  // MTP blocks: read when the checkpoint has any mtp.0.* tensor (then every one must be there); a checkpoint
  // without them (transformers drops mtp.* on save) loads with MTP off.
  if (w.cfg.num_nextn_predict_layers > 0) {
    bool any = false;
    for (const auto& n : ws.names()) any = any || n.rfind("mtp.0.", 0) == 0 || n.rfind("model.mtp.0.", 0) == 0;
    if (!any) {
      w.mtp_absent = true;
      w.cfg.num_nextn_predict_layers = 0;
      w.cfg.mtp_layer_types.clear();
    }
  }
  const V4Config& c = w.cfg;
  w.layout = make_v4_param_layout(c, &w.store);
  const bool bf16 = matrices == DType::BF16;
  int64_t n32 = w.layout.num_params, n16 = 0;
  if (bf16) {  // the resident matrices packed into flat16, the rest into a smaller flat, both in layout order
    n32 = 0;
    w.place.resize(w.layout.specs.size());
    for (size_t i = 0; i < w.layout.specs.size(); ++i) {
      const ParamSpec& s = w.layout.specs[i];
      if (s.is_bias) continue;
      const bool r = v4_bf16_resident(s);
      int64_t& counter = r ? n16 : n32;
      w.place[i] = {r, counter};
      counter += shape_numel(s.shape);
    }
  }
  if (dequantize) {
    w.flat = Tensor::zeros(DType::F32, {std::max<int64_t>(n32, 1)}, "v4_params");
    if (bf16) w.flat16 = Tensor::zeros(DType::BF16, {std::max<int64_t>(n16, 1)}, "v4_params_bf16");
    w.bias_flat = Tensor::zeros(DType::F32, {std::max<int64_t>(w.layout.num_bias, 1)}, "v4_biases");
  }
  int64_t from_float = 0;
  auto find = [&](const std::string& n) -> std::string {
    for (const auto& cand : candidate_names(n))
      if (ws.has(cand)) return cand;
    return "";
  };
  std::vector<std::string> errors;
  auto put = [&](size_t i) {
    const ParamSpec& s = w.layout.specs[i];
    const std::string src = find(s.name);
    if (src.empty()) {
      if (s.name.rfind("mtp.", 0) == 0)
        fail("missing tensor {} in {} (expected shape {}): the checkpoint has an incomplete MTP block (its other mtp.* "
             "tensors are there; num_nextn_predict_layers = {})", s.name, dir, shape_str(s.shape),
             c.num_nextn_predict_layers);
      fail("missing tensor {} in {} (expected shape {})", s.name, dir, shape_str(s.shape));
    }
    Tensor t = ws.get(src);
    const V4Place p = s.is_bias || !bf16 ? V4Place{false, s.offset} : w.place[i];
    Tensor& dst = s.is_bias ? w.bias_flat : p.bf16 ? w.flat16 : w.flat;
    float* out = dequantize && !p.bf16 ? dst.ptr<float>() + p.offset : nullptr;
    const int64_t n = shape_numel(s.shape);
    if (t.dtype == DType::F8E4M3 || t.dtype == DType::I8) {
      const bool fp4 = t.dtype == DType::I8;
      if (s.shape.size() != 2 || w.store[i] == V4Store::Plain)
        fail("tensor {} in {} is stored as {} but this parameter is never quantized", src, dir, dtype_name(t.dtype));
      if (fp4 && w.store[i] != V4Store::Expert)
        fail("tensor {} in {} is FP4 (I8) but only routed experts are stored in FP4", src, dir);
      const int64_t N = s.shape[0], K = s.shape[1];
      const Shape want = fp4 ? Shape{N, K / 2} : s.shape;
      if (fp4 && K % 2) fail("tensor {}: FP4 needs an even number of columns, got {}", s.name, K);
      if (t.shape != want)
        fail("tensor {} in {}: expected shape {} ({} of {}), got {}", src, dir, shape_str(want), fp4 ? "FP4 pairs" : "FP8",
             shape_str(s.shape), shape_str(t.shape));
      std::string sn;
      for (const auto& cand : scale_names(src))
        if (ws.has(cand)) sn = cand;
      if (sn.empty()) fail("quantized tensor {} has no scale ({}) in {}", src, scale_names(src)[0], dir);
      Tensor sc = ws.get(sn);
      const int64_t bn = fp4 ? 1 : c.fp8_block_n, bk = fp4 ? 32 : c.fp8_block_k;
      const Shape sw = {(N + bn - 1) / bn, (K + bk - 1) / bk};
      if (sc.shape != sw)
        fail("tensor {} in {}: expected shape {} for {} weight {} with {}x{} blocks, got {}", sn, dir, shape_str(sw),
             fp4 ? "FP4" : "FP8", shape_str(s.shape), bn, bk, shape_str(sc.shape));
      std::vector<float> scale = scale_values(sc, sn, dir);
      if (!dequantize) return;
      if (p.bf16) {
        quantized_to_bf16(dst.ptr<uint16_t>() + p.offset, static_cast<const uint8_t*>(t.data), fp4, scale.data(), N, K,
                          bn, bk, src, dir);
      } else if (fp4) {
        dequant_fp4_e2m1(out, static_cast<const uint8_t*>(t.data), scale.data(), N, K);
      } else {
        write_weights_fp8_host(dst, p.offset, static_cast<const uint8_t*>(t.data), scale.data(), N, K, bn, bk);
      }
      return;
    }
    if (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16)
      fail("tensor {} in {} has dtype {}; expected a float type", src, dir, dtype_name(t.dtype));
    if (t.shape != s.shape)
      fail("tensor {} in {}: expected shape {} from config.json, got {}", src, dir, shape_str(s.shape), shape_str(t.shape));
    if (p.bf16 && t.dtype != DType::BF16) {
#pragma omp atomic
      ++from_float;
    }
    if (!dequantize) return;
    if (!p.bf16) {
      convert_to_f32(t.dtype, t.data, out, size_t(n));
    } else if (t.dtype == DType::BF16) {
      std::memcpy(dst.ptr<uint16_t>() + p.offset, t.data, size_t(n) * 2);
    } else {  // F32 / F16 rounded to nearest bf16, in chunks (no fp32 copy of the whole tensor)
      const int64_t chunk = int64_t(1) << 20;
      for (int64_t i0 = 0; i0 < n; i0 += chunk)
        write_weights_host(dst, p.offset + i0, static_cast<const char*>(t.data) + size_t(i0) * dtype_size(t.dtype),
                           t.dtype, std::min(chunk, n - i0));
    }
  };
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < w.layout.specs.size(); ++i) {
    try {
      put(i);
    } catch (const std::exception& e) {
#pragma omp critical
      errors.push_back(e.what());
    }
  }
  if (!errors.empty()) {
    std::sort(errors.begin(), errors.end());
    throw InputError(errors.front());
  }
  w.bf16_from_float = from_float;
  // Hash-routing tables: tid2eid [V, K] integer expert ids, each in [0, E).
  w.tid2eid.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (c.mlp_layer_types[size_t(l)] != V4Mlp::Hash) continue;
    const std::string n = "layers." + std::to_string(l) + ".ffn.gate.tid2eid";
    const std::string src = find(n);
    if (src.empty()) fail("missing tensor {} in {} (hash_moe layer {} routes by it)", n, dir, l);
    Tensor t = ws.get(src);
    const Shape want = {c.vocab_size, c.num_experts_per_tok};
    if (t.shape != want) fail("tensor {} in {}: expected shape {}, got {}", src, dir, shape_str(want), shape_str(t.shape));
    if (t.dtype != DType::I64 && t.dtype != DType::I32)
      fail("tensor {} in {} has dtype {}; expected I64 or I32", src, dir, dtype_name(t.dtype));
    auto& ids = w.tid2eid[size_t(l)];
    ids.resize(size_t(t.numel()));
    for (int64_t i = 0; i < t.numel(); ++i) {
      const int64_t e = t.dtype == DType::I64 ? t.ptr<int64_t>()[i] : t.ptr<int32_t>()[i];
      if (e < 0 || e >= c.n_routed_experts)
        fail("tensor {} in {}: expert id {} at token {} is outside [0, {})", src, dir, e, i / c.num_experts_per_tok,
             c.n_routed_experts);
      ids[size_t(i)] = int32_t(e);
    }
  }
  return w;
}

int64_t v4_total_params(const V4Config& c_in) {
  V4Config c = c_in;
  c.num_nextn_predict_layers = 0;
  c.mtp_layer_types.clear();
  return make_v4_param_layout(c).num_params;
}

int64_t v4_mtp_params(const V4Config& c) { return make_v4_param_layout(c).num_params - v4_total_params(c); }

int64_t v4_active_params(const V4Config& c) {
  const int64_t idle = c.num_hidden_layers * (c.n_routed_experts - c.num_experts_per_tok) * 3 *
                       c.moe_intermediate_size * c.hidden_size;
  return v4_total_params(c) - idle - (c.vocab_size - 1) * c.hidden_size;
}

}  // namespace dsv3
