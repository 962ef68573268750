#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"
#include "model/config_json.h"

namespace dsv3 {

using json = nlohmann::json;

namespace {

// DeepSeek-V3.2 (transformers DeepseekV32Config): the indexer, mlp_layer_types, and the V3 fields that
// transformers fixes for this architecture (sigmoid noaux_tc routing, interleaved RoPE, q LoRA, every layer
// indexed attention). A config that says otherwise is refused rather than silently read differently.
void parse_v32_fields(const json& j, ModelConfig& c) {
  c.index_n_heads = get_num<int64_t>(j, "index_n_heads", int64_t(64));
  c.index_head_dim = get_num<int64_t>(j, "index_head_dim", int64_t(128));
  c.index_topk = get_num<int64_t>(j, "index_topk", int64_t(2048));
  if (j.contains("num_experts") && !j["num_experts"].is_null())  // transformers' alias
    c.n_routed_experts = get_num<int64_t>(j, "num_experts", std::nullopt);
  if (j.contains("mlp_layer_types") && !j["mlp_layer_types"].is_null()) {
    const json& m = j["mlp_layer_types"];
    if (!m.is_array()) fail("config: field 'mlp_layer_types' must be a list of \"dense\" / \"sparse\"");
    for (const json& e : m) {
      if (e != "dense" && e != "sparse")
        fail("config: field 'mlp_layer_types' has entry {} (expected \"dense\" or \"sparse\")", e.dump());
      c.mlp_layer_types.push_back(e == "sparse");
    }
    if (int64_t(c.mlp_layer_types.size()) != c.num_hidden_layers)
      fail("config: field 'mlp_layer_types' has {} entries for num_hidden_layers = {}", c.mlp_layer_types.size(),
           c.num_hidden_layers);
  } else {
    const int64_t dense = std::min(c.first_k_dense_replace, c.num_hidden_layers);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) c.mlp_layer_types.push_back(l >= dense);
  }
  if (j.contains("layer_types") && !j["layer_types"].is_null()) {
    const json& lt = j["layer_types"];
    if (!lt.is_array() || int64_t(lt.size()) != c.num_hidden_layers)
      fail("config: field 'layer_types' must list num_hidden_layers = {} entries", c.num_hidden_layers);
    for (const json& e : lt)
      if (e != "indexed_attention")
        fail("config: field 'layer_types' has entry {}; deepseek_v32 layers are all \"indexed_attention\"", e.dump());
  }
  if (c.scoring_func != "sigmoid") fail("config: deepseek_v32 routes with sigmoid scores, got scoring_func '{}'", c.scoring_func);
  if (c.topk_method != "noaux_tc") fail("config: deepseek_v32 routes with noaux_tc, got topk_method '{}'", c.topk_method);
  if (j.contains("rope_interleave") && j["rope_interleave"] == false)
    fail("config: deepseek_v32 uses interleaved RoPE in MLA, got rope_interleave false");
  c.rope_interleave = true;
  c.moe_layer_freq = 1;
  if (c.q_lora_rank <= 0) fail("config: deepseek_v32 needs q_lora_rank (its indexer reads the q LoRA latent), got null");
}

double yarn_mscale(double s, double m) { return s <= 1 ? 1.0 : 0.1 * m * std::log(s) + 1.0; }

}  // namespace

ModelConfig ModelConfig::from_json(const json& j) {
  if (!j.is_object()) fail("config: not a JSON object");
  ModelConfig c;
  c.model_type = get_str(j, "model_type", "deepseek_v3");
  if (c.model_type == "deepseek_v4")
    fail("config: running model_type 'deepseek_v4' is not supported yet (dsv3 info reads it; forward: deepseek_v3, deepseek_v32)");
  if (c.model_type != "deepseek_v3" && c.model_type != "deepseek_v32")
    fail("config: model_type '{}' is not supported (deepseek_v3 or deepseek_v32)", c.model_type);
  const bool v32 = c.model_type == "deepseek_v32";
  auto req = std::optional<int64_t>();
  c.vocab_size = get_num<int64_t>(j, "vocab_size", req);
  c.hidden_size = get_num<int64_t>(j, "hidden_size", req);
  c.intermediate_size = get_num<int64_t>(j, "intermediate_size", req);
  c.num_hidden_layers = get_num<int64_t>(j, "num_hidden_layers", req);
  c.num_attention_heads = get_num<int64_t>(j, "num_attention_heads", req);
  if (!j.contains("q_lora_rank")) fail("config: missing field 'q_lora_rank' (use null for q_proj)");
  c.q_lora_rank = get_num<int64_t>(j, "q_lora_rank", int64_t(0));
  c.kv_lora_rank = get_num<int64_t>(j, "kv_lora_rank", req);
  c.qk_nope_head_dim = get_num<int64_t>(j, "qk_nope_head_dim", req);
  c.qk_rope_head_dim = get_num<int64_t>(j, "qk_rope_head_dim", req);
  c.v_head_dim = get_num<int64_t>(j, "v_head_dim", req);
  c.n_routed_experts = get_num<int64_t>(j, "n_routed_experts", int64_t(0));
  if (c.n_routed_experts > 0) {
    c.moe_intermediate_size = get_num<int64_t>(j, "moe_intermediate_size", req);
    c.num_experts_per_tok = get_num<int64_t>(j, "num_experts_per_tok", req);
  }
  // Defaults below are transformers' DeepseekV3Config defaults, so both read a config the same way.
  c.n_shared_experts = get_num<int64_t>(j, "n_shared_experts", int64_t(1));
  c.n_group = get_num<int64_t>(j, "n_group", int64_t(8));
  c.topk_group = get_num<int64_t>(j, "topk_group", int64_t(4));
  c.first_k_dense_replace = get_num<int64_t>(j, "first_k_dense_replace", int64_t(3));
  c.moe_layer_freq = get_num<int64_t>(j, "moe_layer_freq", int64_t(1));
  c.routed_scaling_factor = get_num<double>(j, "routed_scaling_factor", 2.5);
  c.norm_topk_prob = get_num<bool>(j, "norm_topk_prob", true);
  c.scoring_func = get_str(j, "scoring_func", "sigmoid");
  c.topk_method = get_str(j, "topk_method", "noaux_tc");
  c.rms_norm_eps = get_num<double>(j, "rms_norm_eps", 1e-6);
  c.rope_theta = get_num<double>(j, "rope_theta", 10000.0);
  c.rope_interleave = get_num<bool>(j, "rope_interleave", true);
  c.max_position_embeddings = get_num<int64_t>(j, "max_position_embeddings", int64_t(4096));
  c.num_nextn_predict_layers = get_num<int64_t>(j, "num_nextn_predict_layers", int64_t(0));
  c.initializer_range = get_num<double>(j, "initializer_range", 0.02);
  c.bos_token_id = get_num<int64_t>(j, "bos_token_id", int64_t(0));
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array()) {  // some configs list several
    if (j["eos_token_id"].empty() || !j["eos_token_id"][0].is_number_integer())
      fail("config: field 'eos_token_id' must be an integer or a list of integers");
    c.eos_token_id = j["eos_token_id"][0].get<int64_t>();
  } else {
    c.eos_token_id = get_num<int64_t>(j, "eos_token_id", int64_t(1));
  }
  c.tie_word_embeddings = get_num<bool>(j, "tie_word_embeddings", false);
  if (v32) parse_v32_fields(j, c);
  c.torch_dtype = get_str(j, "torch_dtype", get_str(j, "dtype", "bfloat16"));
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    fail("config: hidden_act {} is not supported (only silu)", j["hidden_act"].dump());
  if (j.contains("attention_bias") && j["attention_bias"].is_boolean() && j["attention_bias"].get<bool>())
    fail("config: attention_bias true is not supported by this architecture");

  // rope_scaling (hub) or rope_parameters (transformers 5).
  const json* rs = nullptr;
  if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) rs = &j["rope_scaling"];
  else if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) rs = &j["rope_parameters"];
  if (rs) {
    std::string type = get_str(*rs, "type", get_str(*rs, "rope_type", ""));
    if (rs->contains("rope_theta")) c.rope_theta = get_num<double>(*rs, "rope_theta", 10000.0);
    if (type == "yarn") {
      auto& y = c.yarn;
      y.enabled = true;
      y.factor = get_num<double>(*rs, "factor", std::nullopt);
      y.beta_fast = get_num<double>(*rs, "beta_fast", 32.0);
      y.beta_slow = get_num<double>(*rs, "beta_slow", 1.0);
      y.mscale = get_num<double>(*rs, "mscale", 0.0);  // 0 = absent (transformers then uses mscale(s, 1))
      y.mscale_all_dim = get_num<double>(*rs, "mscale_all_dim", 0.0);
      y.original_max_position = get_num<int64_t>(*rs, "original_max_position_embeddings", c.max_position_embeddings);
      y.rope_factor = y.factor;
      if (rs->contains("original_max_position_embeddings"))
        y.rope_factor = double(c.max_position_embeddings) / double(y.original_max_position);
      if (y.factor <= 0) fail("config: rope_scaling.factor must be positive, got {}", y.factor);
      if (y.original_max_position <= 0) fail("config: rope_scaling.original_max_position_embeddings must be positive");
    } else if (!type.empty() && type != "default") {
      fail("config: rope_scaling type '{}' is not supported (yarn or none)", type);
    }
  }
  if (j.contains("quantization_config") && j["quantization_config"].is_object()) {
    auto& q = j["quantization_config"];
    std::string m = get_str(q, "quant_method", "");
    if (m != "fp8") fail("config: quantization_config.quant_method '{}' is not supported (fp8 only)", m);
    std::string fmt = get_str(q, "fmt", "e4m3");
    if (fmt != "e4m3") fail("config: quantization_config.fmt '{}' is not supported (e4m3 only)", fmt);
    c.fp8 = true;
    if (q.contains("weight_block_size")) {
      auto& b = q["weight_block_size"];
      if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer())
        fail("config: quantization_config.weight_block_size must be two integers");
      c.fp8_block_n = b[0].get<int64_t>();
      c.fp8_block_k = b[1].get<int64_t>();
    }
  }
  c.validate();
  return c;
}

void ModelConfig::validate() const {
  auto pos = [](int64_t v, const char* n) {
    if (v <= 0) fail("config: field '{}' must be positive, got {}", n, v);
  };
  pos(vocab_size, "vocab_size");
  pos(hidden_size, "hidden_size");
  pos(num_hidden_layers, "num_hidden_layers");
  pos(num_attention_heads, "num_attention_heads");
  pos(kv_lora_rank, "kv_lora_rank");
  pos(qk_nope_head_dim, "qk_nope_head_dim");
  pos(v_head_dim, "v_head_dim");
  pos(max_position_embeddings, "max_position_embeddings");
  if (q_lora_rank < 0) fail("config: field 'q_lora_rank' must be positive or null, got {}", q_lora_rank);
  if (qk_rope_head_dim <= 0 || qk_rope_head_dim % 2) fail("config: field 'qk_rope_head_dim' must be positive and even, got {}", qk_rope_head_dim);
  if (n_routed_experts < 0) fail("config: field 'n_routed_experts' must be >= 0");
  if (first_k_dense_replace < 0) fail("config: field 'first_k_dense_replace' must be >= 0");
  if (moe_layer_freq <= 0) fail("config: field 'moe_layer_freq' must be positive, got {}", moe_layer_freq);
  bool any_dense = false;
  for (int64_t l = 0; l < num_hidden_layers; ++l) any_dense |= !is_moe_layer(l);
  if (any_dense) pos(intermediate_size, "intermediate_size");
  if (n_routed_experts > 0) {
    pos(moe_intermediate_size, "moe_intermediate_size");
    pos(num_experts_per_tok, "num_experts_per_tok");
    if (n_shared_experts < 0) fail("config: field 'n_shared_experts' must be >= 0");
    if (scoring_func != "sigmoid" && scoring_func != "softmax")
      fail("config: field 'scoring_func' must be sigmoid or softmax, got '{}'", scoring_func);
    if (topk_method != "noaux_tc" && topk_method != "greedy" && topk_method != "group_limited_greedy")
      fail("config: field 'topk_method' must be noaux_tc, greedy or group_limited_greedy, got '{}'", topk_method);
    bool grouped = topk_method != "greedy";
    if (grouped) {
      pos(n_group, "n_group");
      if (n_routed_experts % n_group)
        fail("config: field 'n_routed_experts' ({}) is not divisible by 'n_group' ({})", n_routed_experts, n_group);
      if (topk_group <= 0 || topk_group > n_group)
        fail("config: field 'topk_group' ({}) must be in [1, n_group = {}]", topk_group, n_group);
      int64_t per_group = n_routed_experts / n_group;
      if (topk_method == "noaux_tc" && per_group < 2 && n_group > 1)
        fail("config: noaux_tc needs at least 2 experts per group (n_routed_experts / n_group = {})", per_group);
      if (num_experts_per_tok > topk_group * per_group)
        fail("config: field 'num_experts_per_tok' ({}) exceeds the experts allowed by topk_group ({} groups x {} experts)",
             num_experts_per_tok, topk_group, per_group);
    } else if (num_experts_per_tok > n_routed_experts) {
      fail("config: field 'num_experts_per_tok' ({}) exceeds 'n_routed_experts' ({})", num_experts_per_tok, n_routed_experts);
    }
  }
  if (has_indexer()) {
    pos(index_n_heads, "index_n_heads");
    pos(index_topk, "index_topk");
    if (index_head_dim < qk_rope_head_dim || index_head_dim % 2)
      fail("config: field 'index_head_dim' ({}) must be even and at least qk_rope_head_dim ({})", index_head_dim,
           qk_rope_head_dim);
    if (index_n_heads > 4096 || index_head_dim > 65536) fail("config: indexer sizes are absurd");
  }
  if (num_nextn_predict_layers < 0 || num_nextn_predict_layers > 16)
    fail("config: field 'num_nextn_predict_layers' must be in [0, 16], got {}", num_nextn_predict_layers);
  if (!(rms_norm_eps > 0)) fail("config: field 'rms_norm_eps' must be positive");
  if (!(rope_theta > 0)) fail("config: field 'rope_theta' must be positive");
  if (tie_word_embeddings) fail("config: tie_word_embeddings true is not supported (DeepSeek-V3 has a separate lm_head)");
  if (fp8 && (fp8_block_n <= 0 || fp8_block_k <= 0)) fail("config: quantization_config.weight_block_size must be positive");
  if (vocab_size > (int64_t(1) << 31) || hidden_size > (1 << 20) || num_hidden_layers > 4096)
    fail("config: sizes are absurd (vocab {}, hidden {}, layers {})", vocab_size, hidden_size, num_hidden_layers);
}

double ModelConfig::softmax_scale() const {
  double s = 1.0 / std::sqrt(double(qk_head_dim()));
  if (yarn.enabled && yarn.mscale_all_dim > 0) {
    double m = yarn_mscale(yarn.factor, yarn.mscale_all_dim);
    s *= m * m;
  }
  return s;
}

ModelConfig ModelConfig::load(const std::string& path_or_dir) {
  std::string p = path_or_dir;
  if (std::filesystem::is_directory(p)) p = (std::filesystem::path(p) / "config.json").string();
  std::string text = read_file(p);
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    fail("{}: not valid JSON: {}", p, e.what());
  }
  try {
    return from_json(j);
  } catch (const InputError& e) {
    throw InputError(p + ": " + e.what());
  }
}

json ModelConfig::to_json() const {
  const bool v32 = has_indexer();
  json j = {
      {"architectures", {v32 ? "DeepseekV32ForCausalLM" : "DeepseekV3ForCausalLM"}},
      {"model_type", model_type},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"moe_intermediate_size", moe_intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_attention_heads},
      {"q_lora_rank", q_lora_rank > 0 ? json(q_lora_rank) : json(nullptr)},
      {"kv_lora_rank", kv_lora_rank},
      {"qk_nope_head_dim", qk_nope_head_dim},
      {"qk_rope_head_dim", qk_rope_head_dim},
      {"v_head_dim", v_head_dim},
      {"n_routed_experts", n_routed_experts},
      {"n_shared_experts", n_shared_experts},
      {"num_experts_per_tok", num_experts_per_tok},
      {"n_group", n_group},
      {"topk_group", topk_group},
      {"first_k_dense_replace", first_k_dense_replace},
      {"moe_layer_freq", moe_layer_freq},
      {"routed_scaling_factor", routed_scaling_factor},
      {"norm_topk_prob", norm_topk_prob},
      {"scoring_func", scoring_func},
      {"topk_method", topk_method},
      {"rms_norm_eps", rms_norm_eps},
      {"rope_theta", rope_theta},
      {"rope_interleave", rope_interleave},
      {"max_position_embeddings", max_position_embeddings},
      {"num_nextn_predict_layers", num_nextn_predict_layers},
      {"initializer_range", initializer_range},
      {"bos_token_id", bos_token_id},
      {"eos_token_id", eos_token_id},
      {"tie_word_embeddings", false},
      {"attention_bias", false},
      {"hidden_act", "silu"},
      {"torch_dtype", torch_dtype},
      {"use_cache", true},
  };
  if (yarn.enabled) {
    j["rope_scaling"] = {{"type", "yarn"}, {"factor", yarn.factor}, {"original_max_position_embeddings", yarn.original_max_position},
                         {"beta_fast", yarn.beta_fast}, {"beta_slow", yarn.beta_slow}, {"mscale", yarn.mscale},
                         {"mscale_all_dim", yarn.mscale_all_dim}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  if (v32) {
    j["index_n_heads"] = index_n_heads;
    j["index_head_dim"] = index_head_dim;
    j["index_topk"] = index_topk;
    json m = json::array(), lt = json::array();
    for (int64_t l = 0; l < num_hidden_layers; ++l) {
      m.push_back(is_moe_layer(l) ? "sparse" : "dense");
      lt.push_back("indexed_attention");
    }
    j["mlp_layer_types"] = m;
    j["layer_types"] = lt;
  }
  if (fp8)
    j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                {"weight_block_size", {fp8_block_n, fp8_block_k}}};
  return j;
}

}  // namespace dsv3
