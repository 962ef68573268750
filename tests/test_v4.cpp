// DeepSeek-V4 config and checkpoint: the tiny-v4 fixture (tools/make_v4_fixture.py) against what transformers'
// DeepseekV4Config makes of the same config.json (legacy keys), its parameter count, and the FP8 / FP4 tensors
// dequantized independently (numpy, from the stored codes) -- exact equality. Malformed configs and checkpoints
// give one line naming the field or tensor.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/v4_config.h"
#include "model/v4_weights.h"
#include "test_helpers.h"

using namespace dsv3;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

json v4_config() { return json::parse(read_file(test::data_dir("tiny-v4/config.json"))); }
json v4_reference() { return json::parse(read_file(test::data_dir("tiny-v4/reference.json"))); }

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

std::string tmp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("dsv3_v4_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

TEST(V4Config, LegacyKeysReadAsTransformersReadsThem) {
  V4Config c = V4Config::load(test::data_dir("tiny-v4"));
  json ref = v4_reference();
  ASSERT_EQ(int64_t(ref["layer_types"].size()), c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    EXPECT_EQ(ref["layer_types"][l].get<std::string>(), v4_attn_name(c.layer_types[l])) << "layer " << l;
    EXPECT_EQ(ref["mlp_layer_types"][l].get<std::string>(), v4_mlp_name(c.mlp_layer_types[l])) << "layer " << l;
  }
  EXPECT_EQ(c.compress_rate_csa, ref["compress_rates"]["compressed_sparse_attention"].get<int64_t>());
  EXPECT_EQ(c.compress_rate_hca, ref["compress_rates"]["heavily_compressed_attention"].get<int64_t>());
  EXPECT_EQ(c.qk_rope_head_dim, ref["qk_rope_head_dim"].get<int64_t>());
  EXPECT_DOUBLE_EQ(c.partial_rotary_factor, ref["partial_rotary_factor"].get<double>());
  const json& rm = ref["rope_parameters"]["main"];
  const json& rc = ref["rope_parameters"]["compress"];
  EXPECT_EQ(c.rope_main.type, rm["rope_type"].get<std::string>());
  EXPECT_DOUBLE_EQ(c.rope_main.theta, rm["rope_theta"].get<double>());
  EXPECT_EQ(c.rope_compress.type, rc["rope_type"].get<std::string>());
  EXPECT_DOUBLE_EQ(c.rope_compress.theta, rc["rope_theta"].get<double>());
  EXPECT_DOUBLE_EQ(c.rope_compress.factor, rc["factor"].get<double>());
  EXPECT_EQ(c.rope_compress.original_max_position, rc["original_max_position_embeddings"].get<int64_t>());
  EXPECT_DOUBLE_EQ(c.rope_compress.attention_factor, rc["attention_factor"].get<double>());
  EXPECT_EQ(c.expert_dtype, ref["expert_dtype"].get<std::string>());
  EXPECT_TRUE(c.fp8);
  EXPECT_EQ(c.scale_fmt, "ue8m0");
  EXPECT_EQ(v4_total_params(c), ref["num_parameters"].get<int64_t>());
}

TEST(V4Config, DefaultsAndModernKeys) {
  // Nothing but the model type: transformers' defaults (V4-Flash sizes, the Pro-style default schedule).
  V4Config d = V4Config::from_json(json{{"model_type", "deepseek_v4"}});
  EXPECT_EQ(d.num_hidden_layers, 43);
  EXPECT_EQ(d.qk_rope_head_dim, 64);
  EXPECT_EQ(d.layer_types[0], V4Attn::HCA);
  EXPECT_EQ(d.layer_types[2], V4Attn::HCA);
  EXPECT_EQ(d.layer_types[3], V4Attn::CSA);
  EXPECT_EQ(d.num_hash_layers(), 3);
  EXPECT_EQ(d.rope_compress.theta, 160000.0);
  // The released V4-Flash schedule: [0, 0] + [4, 128] * 20 + [4, 0] (44 entries, one for the MTP block).
  json f = {{"model_type", "deepseek_v4"}, {"compress_ratios", json::array()}};
  for (int i = 0; i < 2; ++i) f["compress_ratios"].push_back(0);
  for (int i = 0; i < 20; ++i) f["compress_ratios"].push_back(4), f["compress_ratios"].push_back(128);
  f["compress_ratios"].push_back(4);
  f["compress_ratios"].push_back(0);
  V4Config fl = V4Config::from_json(f);
  int n[3] = {0, 0, 0};
  for (V4Attn t : fl.layer_types) n[int(t)]++;
  EXPECT_EQ(n[0], 2);
  EXPECT_EQ(n[1], 21);
  EXPECT_EQ(n[2], 20);
  // Nested rope parameters are kept as given; explicit layer_types win over compress_ratios.
  json m = {{"model_type", "deepseek_v4"}, {"num_hidden_layers", 2},
            {"layer_types", {"sliding_attention", "compressed_sparse_attention"}},
            {"compress_ratios", {128, 128}}, {"mlp_layer_types", {"moe", "moe"}},
            {"rope_parameters", {{"main", {{"rope_type", "default"}, {"rope_theta", 5000.0}}},
                                 {"compress", {{"rope_type", "yarn"}, {"rope_theta", 1e5}, {"factor", 8.0},
                                               {"original_max_position_embeddings", 4096}, {"attention_factor", 1.0}}}}}};
  V4Config mc = V4Config::from_json(m);
  EXPECT_EQ(mc.layer_types[0], V4Attn::Sliding);
  EXPECT_EQ(mc.layer_types[1], V4Attn::CSA);
  EXPECT_EQ(mc.num_hash_layers(), 0);
  EXPECT_DOUBLE_EQ(mc.rope_main.theta, 5000.0);
  EXPECT_DOUBLE_EQ(mc.rope_compress.factor, 8.0);
}

// The released V4-Flash configuration (sizes from its config.json): the layout gives exactly the parameter count of
// transformers' DeepseekV4ForCausalLM for it (284,332,230,231, counted on the meta device), the published 284B,
// and 13B active per token (MTP block excluded).
TEST(V4Config, FlashSizesGiveThePublishedParameterCounts) {
  json f = {{"model_type", "deepseek_v4"}, {"vocab_size", 129280}, {"hidden_size", 4096}, {"num_hidden_layers", 43},
            {"num_attention_heads", 64}, {"head_dim", 512}, {"q_lora_rank", 1024}, {"o_groups", 8},
            {"o_lora_rank", 1024}, {"n_routed_experts", 256}, {"num_experts_per_tok", 6},
            {"moe_intermediate_size", 2048}, {"hc_mult", 4}, {"index_n_heads", 64}, {"index_head_dim", 128},
            {"qk_rope_head_dim", 64}, {"num_hash_layers", 3}, {"compress_ratios", json::array()}};
  for (int i = 0; i < 2; ++i) f["compress_ratios"].push_back(0);
  for (int i = 0; i < 20; ++i) f["compress_ratios"].push_back(4), f["compress_ratios"].push_back(128);
  f["compress_ratios"].push_back(4);
  f["compress_ratios"].push_back(0);
  V4Config c = V4Config::from_json(f);
  const double total = double(v4_total_params(c)), active = double(v4_active_params(c));
  EXPECT_EQ(v4_total_params(c), int64_t(284332230231));
  EXPECT_NEAR(total / 1e9, 284, 1) << total;
  EXPECT_NEAR(active / 1e9, 13, 0.5) << active;
}

TEST(V4Config, MalformedConfigsNameTheField) {
  auto check = [](json j, const std::string& want) {
    std::string e = error_of([&] { V4Config::from_json(j); });
    EXPECT_NE(e.find(want), std::string::npos) << "want '" << want << "', got: " << e;
  };
  json j = v4_config();
  j["compress_ratios"] = {0, 4, 128};  // 3 entries for 4 layers
  check(j, "'compress_ratios' has 3 entries");
  j = v4_config();
  j["compress_ratios"] = {0, 4, 64, 4, 0};
  check(j, "'compress_ratios' has entry 64");
  j = v4_config();
  j["layer_types"] = {"sliding_attention", "full_attention", "sliding_attention", "sliding_attention"};
  check(j, "'layer_types' has entry \"full_attention\"");
  j = v4_config();
  j["mlp_layer_types"] = {"moe", "dense", "moe", "moe"};
  check(j, "'mlp_layer_types' has entry \"dense\"");
  j = v4_config();
  j["num_key_value_heads"] = 4;
  check(j, "'num_key_value_heads' must be 1");
  j = v4_config();
  j["o_groups"] = 3;
  check(j, "not divisible by 'o_groups'");
  j = v4_config();
  j["scoring_func"] = "softmax";
  check(j, "scoring_func 'softmax'");
  j = v4_config();
  j["qk_rope_head_dim"] = 7;
  check(j, "rope dims");
  j = v4_config();
  j["hc_mult"] = 0;
  check(j, "'hc_mult' must be positive");
  j = v4_config();
  j["expert_dtype"] = "int4";
  check(j, "expert_dtype 'int4'");
  j = v4_config();
  j["quantization_config"]["scale_fmt"] = "e5m2";
  check(j, "scale_fmt 'e5m2'");
  j = v4_config();
  j["rope_scaling"]["factor"] = "x";
  check(j, "'factor' must be a number");
  j = v4_config();
  j["sliding_window"] = -1;
  check(j, "'sliding_window' must be positive");
}

// Every quantized tensor dequantizes exactly to the independently computed values (FP8: e4m3 x 2^(b-127) per
// 128x128 block; FP4: e2m1 pair codes x 2^(b-127) per 32 columns), and plain tensors are copied exactly.
TEST(V4Checkpoint, QuantizedTensorsDequantizeExactly) {
  V4Config c = V4Config::load(test::data_dir("tiny-v4"));
  V4Weights w = load_v4_weights(c, test::data_dir("tiny-v4"));
  SafetensorsFile ref(test::data_dir("tiny-v4/reference.safetensors"));
  int checked = 0;
  for (const std::string& n : ref.names()) {
    Tensor want = ref.get(n), got = w.view(n);
    ASSERT_EQ(got.shape, want.shape) << n;
    for (int64_t i = 0; i < want.numel(); ++i)
      ASSERT_EQ(got.ptr<float>()[i], want.ptr<float>()[i]) << n << " element " << i;
    ++checked;
  }
  EXPECT_GE(checked, 8);
  // Hash-routing table of the hash layer, selection biases of the others.
  EXPECT_EQ(int64_t(w.tid2eid[0].size()), c.vocab_size * c.num_experts_per_tok);
  EXPECT_TRUE(w.tid2eid[1].empty());
  EXPECT_NO_THROW(w.view("layers.1.ffn.gate.bias"));
}

TEST(V4Checkpoint, DequantKernelsMatchTheirDefinition) {
  // e2m1 codes: every nibble, both positions, with scales 2^-3 and 2^2 (UE8M0 bytes 124 and 129).
  std::vector<uint8_t> packed(2 * 32);
  for (int i = 0; i < 64; ++i) packed[i] = uint8_t((i % 16) | (((i * 7) % 16) << 4));
  std::vector<float> scale = {f8e8m0_to_f32(124), f8e8m0_to_f32(129), f8e8m0_to_f32(127), f8e8m0_to_f32(0)};
  EXPECT_EQ(scale[0], 0.125f);
  EXPECT_EQ(scale[1], 4.f);
  EXPECT_EQ(scale[3], std::ldexp(1.f, -127));
  EXPECT_TRUE(std::isnan(f8e8m0_to_f32(255)));
  std::vector<float> out(2 * 64);
  dequant_fp4_e2m1(out.data(), packed.data(), scale.data(), 2, 64);
  const float lut[16] = {0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6};
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 64; ++k) {
      const uint8_t b = packed[r * 32 + k / 2];
      const float v = lut[k % 2 ? b >> 4 : b & 15] * scale[r * 2 + k / 32];
      ASSERT_EQ(out[r * 64 + k], v) << r << "," << k;
    }
}

TEST(V4Checkpoint, MalformedCheckpointsNameTheTensor) {
  const std::string d = tmp_dir("ck");
  SafetensorsFile src(test::data_dir("tiny-v4/model.safetensors"));
  // Rewrites the fixture without tensor `drop`, with `replace` (if given) instead of the tensor of its name.
  auto write_without = [&](const std::string& drop, const Tensor* replace = nullptr) {
    std::vector<Tensor> ts;
    for (const auto& n : src.names()) {
      if (n == drop) continue;
      Tensor t = replace && replace->name == n ? *replace : src.get(n);
      t.name = n;
      ts.push_back(t);
    }
    write_safetensors(d + "/model.safetensors", ts);
  };
  write_file_atomic(d + "/config.json", v4_config().dump());
  auto err = [&] { return error_of([&] { load_v4_weights(V4Config::load(d), d); }); };
  write_without("layers.2.attn.compressor.ape");
  std::string e = err();
  EXPECT_NE(e.find("missing tensor layers.2.attn.compressor.ape"), std::string::npos) << e;
  write_without("layers.1.ffn.experts.3.w2.scale");
  e = err();
  EXPECT_NE(e.find("layers.1.ffn.experts.3.w2.weight has no scale"), std::string::npos) << e;
  Tensor bad = Tensor::zeros(DType::F8E8M0, {2, 1}, "layers.3.attn.wq_a.scale");  // a 2x1 grid for a 48x64 weight
  write_without("", &bad);
  e = err();
  EXPECT_NE(e.find("layers.3.attn.wq_a.scale"), std::string::npos) << e;
  write_without("layers.0.ffn.gate.tid2eid");
  e = err();
  EXPECT_NE(e.find("missing tensor layers.0.ffn.gate.tid2eid"), std::string::npos) << e;
  // A config whose hidden size disagrees with the file.
  json j = v4_config();
  j["q_lora_rank"] = 40;
  write_without("");
  write_file_atomic(d + "/config.json", j.dump());
  e = err();
  EXPECT_NE(e.find("expected shape"), std::string::npos) << e;
  fs::remove_all(d);
}

}  // namespace
