#include "model/v4_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"
#include "model/config_json.h"

namespace dsv3 {

using json = nlohmann::json;

const char* v4_attn_name(V4Attn a) {
  switch (a) {
    case V4Attn::Sliding: return "sliding_attention";
    case V4Attn::CSA: return "compressed_sparse_attention";
    case V4Attn::HCA: return "heavily_compressed_attention";
  }
  return "?";
}
const char* v4_mlp_name(V4Mlp m) { return m == V4Mlp::Hash ? "hash_moe" : "moe"; }

namespace {

// A list field of per-layer names; transformers truncates it to num_hidden_layers, then requires that length.
template <typename E, typename F>
std::vector<E> layer_list(const json& v, const char* key, int64_t L, F&& parse) {
  if (!v.is_array()) fail("config: field '{}' must be a list", key);
  std::vector<E> out;
  for (const json& e : v) {
    if (int64_t(out.size()) == L) break;
    out.push_back(parse(e));
  }
  if (int64_t(out.size()) != L)
    fail("config: field '{}' has {} entries for num_hidden_layers = {}", key, v.size(), L);
  return out;
}

V4Rope parse_rope(const json& r, const char* where, double theta_default) {
  if (!r.is_object()) fail("config: {} must be an object", where);
  V4Rope p;
  p.type = get_str(r, "rope_type", get_str(r, "type", "default"));
  if (p.type != "default" && p.type != "yarn")
    fail("config: {} rope_type '{}' is not supported (default or yarn)", where, p.type);
  p.theta = get_num<double>(r, "rope_theta", theta_default);
  if (p.type == "yarn") {
    p.factor = get_num<double>(r, "factor", std::nullopt);
    p.original_max_position = get_num<int64_t>(r, "original_max_position_embeddings", std::nullopt);
    p.beta_fast = get_num<double>(r, "beta_fast", 32.0);
    p.beta_slow = get_num<double>(r, "beta_slow", 1.0);
    p.attention_factor = get_num<double>(r, "attention_factor", 1.0);
    if (!(p.factor > 0)) fail("config: {}.factor must be positive", where);
    if (p.original_max_position <= 0) fail("config: {}.original_max_position_embeddings must be positive", where);
  }
  if (!(p.theta > 0)) fail("config: {}.rope_theta must be positive", where);
  return p;
}

}  // namespace

V4Attn V4Config::attn_type(int64_t b) const {
  return b < num_hidden_layers ? layer_types.at(size_t(b)) : mtp_layer_types.at(size_t(b - num_hidden_layers));
}

V4Mlp V4Config::mlp_type(int64_t b) const {
  return b < num_hidden_layers ? mlp_layer_types.at(size_t(b)) : V4Mlp::Moe;
}

std::string V4Config::block_prefix(int64_t b) const {
  return b < num_hidden_layers ? "layers." + std::to_string(b) + "." : "mtp." + std::to_string(b - num_hidden_layers) + ".";
}

int64_t V4Config::compress_rate(int64_t l) const {
  switch (attn_type(l)) {
    case V4Attn::CSA: return compress_rate_csa;
    case V4Attn::HCA: return compress_rate_hca;
    default: return 0;
  }
}

int64_t V4Config::num_hash_layers() const {
  return std::count(mlp_layer_types.begin(), mlp_layer_types.end(), V4Mlp::Hash);
}

V4Config V4Config::from_json(const json& j) {
  if (!j.is_object()) fail("config: not a JSON object");
  if (get_str(j, "model_type", "") != "deepseek_v4")
    fail("config: model_type must be deepseek_v4, got '{}'", get_str(j, "model_type", ""));
  V4Config c;
  auto num = [&](const char* k, int64_t d) { return get_num<int64_t>(j, k, d); };
  auto real = [&](const char* k, double d) { return get_num<double>(j, k, d); };
  c.vocab_size = num("vocab_size", c.vocab_size);
  c.hidden_size = num("hidden_size", c.hidden_size);
  // intermediate_size is transformers' alias of moe_intermediate_size (the shared expert's width).
  c.moe_intermediate_size = num("moe_intermediate_size", num("intermediate_size", c.moe_intermediate_size));
  c.num_hidden_layers = num("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = num("num_attention_heads", c.num_attention_heads);
  c.num_key_value_heads = num("num_key_value_heads", c.num_key_value_heads);
  c.head_dim = num("head_dim", c.head_dim);
  c.q_lora_rank = num("q_lora_rank", c.q_lora_rank);
  c.num_experts_per_tok = num("num_experts_per_tok", c.num_experts_per_tok);
  c.n_routed_experts = num("n_routed_experts", num("num_local_experts", c.n_routed_experts));
  c.n_shared_experts = num("n_shared_experts", c.n_shared_experts);
  c.scoring_func = get_str(j, "scoring_func", c.scoring_func);
  c.norm_topk_prob = get_num<bool>(j, "norm_topk_prob", c.norm_topk_prob);
  c.routed_scaling_factor = real("routed_scaling_factor", c.routed_scaling_factor);
  c.max_position_embeddings = num("max_position_embeddings", c.max_position_embeddings);
  c.rope_theta = real("rope_theta", c.rope_theta);
  c.compress_rope_theta = real("compress_rope_theta", c.compress_rope_theta);
  c.hc_mult = num("hc_mult", c.hc_mult);
  c.hc_sinkhorn_iters = num("hc_sinkhorn_iters", c.hc_sinkhorn_iters);
  c.hc_eps = real("hc_eps", c.hc_eps);
  c.swiglu_limit = real("swiglu_limit", c.swiglu_limit);
  c.sliding_window = num("sliding_window", c.sliding_window);
  c.o_groups = num("o_groups", c.o_groups);
  c.o_lora_rank = num("o_lora_rank", c.o_lora_rank);
  c.index_n_heads = num("index_n_heads", c.index_n_heads);
  c.index_head_dim = num("index_head_dim", c.index_head_dim);
  c.index_topk = num("index_topk", c.index_topk);
  c.num_nextn_predict_layers = num("num_nextn_predict_layers", c.num_nextn_predict_layers);
  c.router_aux_loss_coef = real("router_aux_loss_coef", c.router_aux_loss_coef);
  c.initializer_range = real("initializer_range", c.initializer_range);
  c.rms_norm_eps = real("rms_norm_eps", c.rms_norm_eps);
  c.bos_token_id = num("bos_token_id", c.bos_token_id);
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {
    if (j["eos_token_id"].empty() || !j["eos_token_id"][0].is_number_integer())
      fail("config: field 'eos_token_id' must be an integer or a list of integers");
    c.eos_token_id = j["eos_token_id"][0].get<int64_t>();
  } else {
    c.eos_token_id = num("eos_token_id", c.eos_token_id);
  }
  c.torch_dtype = get_str(j, "torch_dtype", get_str(j, "dtype", c.torch_dtype));
  if (get_num<bool>(j, "tie_word_embeddings", false)) fail("config: tie_word_embeddings true is not supported by deepseek_v4");
  if (get_num<bool>(j, "attention_bias", false)) fail("config: attention_bias true is not supported by deepseek_v4");
  if (get_num<bool>(j, "mlp_bias", false)) fail("config: mlp_bias true is not supported by deepseek_v4");
  if (get_str(j, "hidden_act", "silu") != "silu")
    fail("config: hidden_act '{}' is not supported (only silu)", get_str(j, "hidden_act", ""));
  const int64_t L = c.num_hidden_layers;
  if (L <= 0 || L > 4096) fail("config: field 'num_hidden_layers' must be in [1, 4096], got {}", L);

  // Rope dims: partial_rotary_factor, else the legacy qk_rope_head_dim / head_dim, else 64 / 512.
  if (j.contains("partial_rotary_factor") && !j["partial_rotary_factor"].is_null())
    c.partial_rotary_factor = real("partial_rotary_factor", 0.125);
  else if (j.contains("qk_rope_head_dim") && !j["qk_rope_head_dim"].is_null() && c.head_dim > 0)
    c.partial_rotary_factor = double(num("qk_rope_head_dim", 64)) / double(c.head_dim);
  c.qk_rope_head_dim = int64_t(double(c.head_dim) * c.partial_rotary_factor);

  // Compression rates: compress_rates dict, then the legacy scalar overrides.
  if (j.contains("compress_rates") && !j["compress_rates"].is_null()) {
    const json& cr = j["compress_rates"];
    if (!cr.is_object()) fail("config: field 'compress_rates' must be an object");
    for (auto it = cr.begin(); it != cr.end(); ++it)
      if (it.key() != "compressed_sparse_attention" && it.key() != "heavily_compressed_attention")
        fail("config: field 'compress_rates' has unknown key '{}'", it.key());
    c.compress_rate_csa = get_num<int64_t>(cr, "compressed_sparse_attention", c.compress_rate_csa);
    c.compress_rate_hca = get_num<int64_t>(cr, "heavily_compressed_attention", c.compress_rate_hca);
  }
  c.compress_rate_csa = num("compress_rate_csa", c.compress_rate_csa);
  c.compress_rate_hca = num("compress_rate_hca", c.compress_rate_hca);

  // Attention schedule: layer_types > legacy compress_ratios (0 / 4 / 128 per layer; the hub lists carry extra
  // trailing entries for the MTP layers) > transformers' default (2 HCA, then HCA / CSA alternating).
  if (j.contains("layer_types") && !j["layer_types"].is_null()) {
    c.layer_types = layer_list<V4Attn>(j["layer_types"], "layer_types", L, [](const json& e) {
      for (V4Attn a : {V4Attn::Sliding, V4Attn::CSA, V4Attn::HCA})
        if (e == v4_attn_name(a)) return a;
      fail("config: field 'layer_types' has entry {} (expected sliding_attention, compressed_sparse_attention or "
           "heavily_compressed_attention)", e.dump());
    });
  } else if (j.contains("compress_ratios") && !j["compress_ratios"].is_null()) {
    c.layer_types = layer_list<V4Attn>(j["compress_ratios"], "compress_ratios", L, [](const json& e) {
      if (e == 0) return V4Attn::Sliding;
      if (e == 4) return V4Attn::CSA;
      if (e == 128) return V4Attn::HCA;
      fail("config: field 'compress_ratios' has entry {} (expected 0, 4 or 128)", e.dump());
    });
  } else {
    for (int64_t l = 0; l < L; ++l)
      c.layer_types.push_back(l < 2 ? V4Attn::HCA : ((l - 2) % 2 ? V4Attn::CSA : V4Attn::HCA));
  }
  // MTP blocks: the schedule's entry past the main layers (the hub's compress_ratios carry one per MTP layer, e.g.
  // V4-Flash's trailing 0), sliding-only when the list ends at num_hidden_layers.
  if (c.num_nextn_predict_layers < 0 || c.num_nextn_predict_layers > 16)
    fail("config: field 'num_nextn_predict_layers' must be in [0, 16], got {}", c.num_nextn_predict_layers);
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    V4Attn t = V4Attn::Sliding;
    const size_t i = size_t(L + k);
    if (j.contains("layer_types") && j["layer_types"].is_array()) {
      if (j["layer_types"].size() > i)
        for (V4Attn a : {V4Attn::Sliding, V4Attn::CSA, V4Attn::HCA})
          if (j["layer_types"][i] == v4_attn_name(a)) t = a;
    } else if (j.contains("compress_ratios") && j["compress_ratios"].is_array() && j["compress_ratios"].size() > i) {
      const json& e = j["compress_ratios"][i];
      if (e == 4) t = V4Attn::CSA;
      else if (e == 128) t = V4Attn::HCA;
      else if (e != 0) fail("config: field 'compress_ratios' has entry {} for MTP layer {} (expected 0, 4 or 128)", e.dump(), k);
    }
    c.mtp_layer_types.push_back(t);
  }
  // MoE schedule: mlp_layer_types > legacy num_hash_layers (default 3) hash layers first.
  if (j.contains("mlp_layer_types") && !j["mlp_layer_types"].is_null()) {
    c.mlp_layer_types = layer_list<V4Mlp>(j["mlp_layer_types"], "mlp_layer_types", L, [](const json& e) {
      if (e == "hash_moe") return V4Mlp::Hash;
      if (e == "moe") return V4Mlp::Moe;
      fail("config: field 'mlp_layer_types' has entry {} (expected hash_moe or moe)", e.dump());
    });
  } else {
    const int64_t nh = num("num_hash_layers", 3);
    if (nh < 0) fail("config: field 'num_hash_layers' must be >= 0, got {}", nh);
    for (int64_t l = 0; l < L; ++l) c.mlp_layer_types.push_back(l < nh ? V4Mlp::Hash : V4Mlp::Moe);
  }

  // Rope parameters: nested {main, compress} kept as given; otherwise main = plain rope at rope_theta and
  // compress = the flat dict (rope_parameters or the legacy rope_scaling) at compress_rope_theta, with YaRN's
  // attention factor 1.0 unless given (the released code does not scale cos/sin).
  const json* rp = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) rp = &j["rope_parameters"];
  else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) rp = &j["rope_scaling"];
  if (rp && rp->contains("main") && rp->contains("compress") && (*rp)["main"].is_object() &&
      (*rp)["compress"].is_object()) {
    c.rope_main = parse_rope((*rp)["main"], "rope_parameters.main", c.rope_theta);
    c.rope_compress = parse_rope((*rp)["compress"], "rope_parameters.compress", c.compress_rope_theta);
  } else {
    c.rope_main.theta = c.rope_theta;
    json flat = rp ? *rp : json::object();
    flat["rope_theta"] = c.compress_rope_theta;
    c.rope_compress = parse_rope(flat, "rope_parameters", c.compress_rope_theta);
  }

  // Quantization: fp8 e4m3 blocks (scale_fmt ue8m0: power-of-two scales stored as exponent bytes), experts per
  // expert_dtype (top-level legacy key folded in as transformers does).
  c.expert_dtype = get_str(j, "expert_dtype", "");
  if (j.contains("quantization_config") && j["quantization_config"].is_object()) {
    const json& q = j["quantization_config"];
    const std::string m = get_str(q, "quant_method", "");
    if (m != "fp8") fail("config: quantization_config.quant_method '{}' is not supported (fp8 only)", m);
    const std::string fmt = get_str(q, "fmt", "e4m3");
    if (fmt != "e4m3") fail("config: quantization_config.fmt '{}' is not supported (e4m3 only)", fmt);
    c.fp8 = true;
    c.scale_fmt = get_str(q, "scale_fmt", "");
    if (!c.scale_fmt.empty() && c.scale_fmt != "ue8m0")
      fail("config: quantization_config.scale_fmt '{}' is not supported (ue8m0 or none)", c.scale_fmt);
    if (q.contains("expert_dtype")) c.expert_dtype = get_str(q, "expert_dtype", "");
    if (q.contains("weight_block_size")) {
      const json& b = q["weight_block_size"];
      if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer())
        fail("config: quantization_config.weight_block_size must be two integers");
      c.fp8_block_n = b[0].get<int64_t>();
      c.fp8_block_k = b[1].get<int64_t>();
    }
  }
  if (!c.expert_dtype.empty() && c.expert_dtype != "fp4" && c.expert_dtype != "fp8")
    fail("config: expert_dtype '{}' is not supported (fp4 or fp8)", c.expert_dtype);
  c.validate();
  return c;
}

void V4Config::validate() const {
  auto pos = [](int64_t v, const char* n) {
    if (v <= 0) fail("config: field '{}' must be positive, got {}", n, v);
  };
  pos(vocab_size, "vocab_size");
  pos(hidden_size, "hidden_size");
  pos(moe_intermediate_size, "moe_intermediate_size");
  pos(num_attention_heads, "num_attention_heads");
  pos(head_dim, "head_dim");
  pos(q_lora_rank, "q_lora_rank");
  pos(n_routed_experts, "n_routed_experts");
  pos(num_experts_per_tok, "num_experts_per_tok");
  pos(hc_mult, "hc_mult");
  pos(hc_sinkhorn_iters, "hc_sinkhorn_iters");
  pos(sliding_window, "sliding_window");
  pos(o_groups, "o_groups");
  pos(o_lora_rank, "o_lora_rank");
  pos(index_n_heads, "index_n_heads");
  pos(index_head_dim, "index_head_dim");
  pos(index_topk, "index_topk");
  pos(compress_rate_csa, "compress_rate_csa");
  pos(compress_rate_hca, "compress_rate_hca");
  pos(max_position_embeddings, "max_position_embeddings");
  if (num_key_value_heads != 1)
    fail("config: field 'num_key_value_heads' must be 1 (one shared key/value head), got {}", num_key_value_heads);
  if (qk_rope_head_dim <= 0 || qk_rope_head_dim % 2 || qk_rope_head_dim > head_dim)
    fail("config: rope dims head_dim * partial_rotary_factor = {} must be even and in [2, head_dim = {}]",
         qk_rope_head_dim, head_dim);
  if (qk_rope_head_dim > index_head_dim)
    fail("config: field 'index_head_dim' ({}) must be at least the rope dims ({})", index_head_dim, qk_rope_head_dim);
  if (num_attention_heads % o_groups)
    fail("config: field 'num_attention_heads' ({}) is not divisible by 'o_groups' ({})", num_attention_heads, o_groups);
  if (num_experts_per_tok > n_routed_experts)
    fail("config: field 'num_experts_per_tok' ({}) exceeds 'n_routed_experts' ({})", num_experts_per_tok, n_routed_experts);
  if (scoring_func == "softmax")
    fail("config: scoring_func 'softmax' is not supported (transformers' deepseek_v4 cannot build it either)");
  if (scoring_func != "sqrtsoftplus" && scoring_func != "sigmoid")
    fail("config: field 'scoring_func' must be sqrtsoftplus or sigmoid, got '{}'", scoring_func);
  if (!(rms_norm_eps > 0) || !(hc_eps > 0)) fail("config: fields 'rms_norm_eps' and 'hc_eps' must be positive");
  if (!(swiglu_limit > 0)) fail("config: field 'swiglu_limit' must be positive, got {}", swiglu_limit);
  if (num_nextn_predict_layers < 0 || num_nextn_predict_layers > 16)
    fail("config: field 'num_nextn_predict_layers' must be in [0, 16], got {}", num_nextn_predict_layers);
  if (int64_t(mtp_layer_types.size()) != num_nextn_predict_layers)
    fail("config: {} MTP layer types for num_nextn_predict_layers = {}", mtp_layer_types.size(), num_nextn_predict_layers);
  if (fp8 && (fp8_block_n <= 0 || fp8_block_k <= 0)) fail("config: quantization_config.weight_block_size must be positive");
  if (vocab_size > (int64_t(1) << 31) || hidden_size > (1 << 20) || num_attention_heads > 4096 || head_dim > 65536 ||
      hc_mult > 64 || n_routed_experts > 65536 || hc_sinkhorn_iters > 10000)
    fail("config: sizes are absurd (vocab {}, hidden {}, heads {}, head_dim {}, hc_mult {}, experts {})", vocab_size,
         hidden_size, num_attention_heads, head_dim, hc_mult, n_routed_experts);
}

V4Config V4Config::load(const std::string& path_or_dir) {
  std::string p = path_or_dir;
  if (std::filesystem::is_directory(p)) p = (std::filesystem::path(p) / "config.json").string();
  json j;
  try {
    j = json::parse(read_file(p));
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", p, e.what());
  }
  try {
    return from_json(j);
  } catch (const InputError& e) {
    throw InputError(p + ": " + e.what());
  }
}

std::string config_model_type(const std::string& path_or_dir) {
  std::string p = path_or_dir;
  if (std::filesystem::is_directory(p)) p = (std::filesystem::path(p) / "config.json").string();
  json j = json::parse(read_file(p), nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("model_type") || !j["model_type"].is_string()) return "";
  return j["model_type"].get<std::string>();
}

}  // namespace dsv3
