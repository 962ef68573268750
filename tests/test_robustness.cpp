// Malformed inputs give one clear InputError (never a crash), and a brief mutation fuzz of the safetensors
// and config parsers: every mutated file either loads or throws InputError.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/rng.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/generate.h"
#include "model/loader.h"
#include "test_helpers.h"

using namespace dsv3;
namespace fs = std::filesystem;

namespace {

std::string tmp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("dsv3_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f << bytes;
}

std::string st_file(const std::string& header_json, size_t data_bytes) {
  std::string h = header_json;
  uint64_t n = h.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + h + std::string(data_bytes, '\0');
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(Safetensors, MalformedFilesGiveClearErrors) {
  const std::string d = tmp_dir("st");
  const std::string p = d + "/x.safetensors";
  write_bytes(p, "abc");
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("truncated"), std::string::npos);
  write_bytes(p, st_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4));
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("out of range"), std::string::npos);
  write_bytes(p, st_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8));
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("needs 12 bytes"), std::string::npos);
  write_bytes(p, st_file("{\"a\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8));
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("unsupported dtype"), std::string::npos);
  write_bytes(p, st_file("{not json", 8));
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("not valid JSON"), std::string::npos);
  std::string big(8, '\xff');
  write_bytes(p, big + "{}");
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("header length"), std::string::npos);
  EXPECT_NE(error_of([&] { SafetensorsFile f(d + "/missing.safetensors"); }).find("cannot open"), std::string::npos);
  fs::remove_all(d);
}

TEST(Safetensors, WriteThenReadRoundTrip) {
  const std::string d = tmp_dir("rt");
  Tensor a = Tensor::f32_from({1, 2, 3, 4, 5, 6}, {2, 3});
  a.name = "a";
  Tensor b = Tensor::empty(DType::BF16, {2}, "b");
  b.ptr<uint16_t>()[0] = f32_to_bf16(1.5f);
  b.ptr<uint16_t>()[1] = f32_to_bf16(-2.f);
  write_safetensors(d + "/m.safetensors", {a, b});
  SafetensorsFile f(d + "/m.safetensors");
  EXPECT_EQ(f.get("a").shape, (Shape{2, 3}));
  EXPECT_EQ(f.get("a").ptr<float>()[5], 6.f);
  EXPECT_EQ(bf16_to_f32(f.get("b").ptr<uint16_t>()[1]), -2.f);
  EXPECT_FALSE(fs::exists(d + "/m.safetensors.tmp." + std::to_string(::getpid())));
  fs::remove_all(d);
}

nlohmann::json fixture_config() {
  return nlohmann::json::parse(read_file(test::data_dir("tiny-fp32/config.json")));
}

TEST(Config, InconsistentConfigsNameTheField) {
  auto j = fixture_config();
  j.erase("hidden_size");
  EXPECT_NE(error_of([&] { ModelConfig::from_json(j); }).find("'hidden_size'"), std::string::npos);
  j = fixture_config();
  j["n_routed_experts"] = 15;
  EXPECT_NE(error_of([&] { ModelConfig::from_json(j); }).find("not divisible by 'n_group'"), std::string::npos);
  j = fixture_config();
  j["num_experts_per_tok"] = 9;  // 2 groups of 4 experts allowed
  EXPECT_NE(error_of([&] { ModelConfig::from_json(j); }).find("'num_experts_per_tok'"), std::string::npos);
  j = fixture_config();
  j["topk_group"] = 5;
  EXPECT_NE(error_of([&] { ModelConfig::from_json(j); }).find("'topk_group'"), std::string::npos);
  j = fixture_config();
  j["kv_lora_rank"] = "big";
  EXPECT_NE(error_of([&] { ModelConfig::from_json(j); }).find("'kv_lora_rank' must be an integer"), std::string::npos);
  j = fixture_config();
  j["scoring_func"] = "relu";
  EXPECT_NE(error_of([&] { ModelConfig::from_json(j); }).find("'scoring_func'"), std::string::npos);
  j = fixture_config();
  j["rope_scaling"] = {{"type", "longrope"}};
  EXPECT_NE(error_of([&] { ModelConfig::from_json(j); }).find("longrope"), std::string::npos);
  j = fixture_config();
  j["qk_rope_head_dim"] = 15;
  EXPECT_NE(error_of([&] { ModelConfig::from_json(j); }).find("'qk_rope_head_dim'"), std::string::npos);
}

TEST(Loader, WrongShapeOrMissingTensorIsRefused) {
  const std::string d = tmp_dir("ld");
  auto j = fixture_config();
  j["hidden_size"] = 64;  // weights on disk have 128
  write_file_atomic(d + "/config.json", j.dump());
  fs::copy_file(test::data_dir("tiny-fp32/model.safetensors"), d + "/model.safetensors");
  std::string e = error_of([&] { open_model(d); });
  EXPECT_NE(e.find("expected shape"), std::string::npos) << e;
  j = fixture_config();
  j["num_hidden_layers"] = 4;
  write_file_atomic(d + "/config.json", j.dump());
  e = error_of([&] { open_model(d); });
  EXPECT_NE(e.find("missing tensor model.layers.3."), std::string::npos) << e;
  fs::remove_all(d);
}

TEST(Model, BadTokensAndLengthsAreRefused) {
  LoadedModel lm = open_model(test::data_dir("tiny-fp32"));
  GenerateOptions go;
  go.max_new_tokens = 2;
  EXPECT_NE(error_of([&] { generate(*lm.model, {1, 2, 5000}, go); }).find("out of range for vocab_size 2048"), std::string::npos);
  EXPECT_NE(error_of([&] { generate(*lm.model, {-1}, go); }).find("out of range"), std::string::npos);
  std::vector<int32_t> long_prompt(513, 5);
  EXPECT_NE(error_of([&] { generate(*lm.model, long_prompt, go); }).find("max_position_embeddings"), std::string::npos);
  EXPECT_NE(error_of([&] { generate(*lm.model, {}, go); }).find("empty"), std::string::npos);
  go.sampling.top_p = 0;
  EXPECT_NE(error_of([&] { generate(*lm.model, {5}, go); }).find("top_p"), std::string::npos);
}

// Mutation fuzz: flip, truncate and splice bytes of real files. Anything but InputError is a bug.
TEST(Fuzz, SafetensorsAndConfigParsers) {
  const std::string d = tmp_dir("fz");
  const std::string valid_st = read_file(test::data_dir("tiny-mtp/reference.safetensors"));
  const std::string valid_cfg = read_file(test::data_dir("tiny-fp8/config.json"));
  Rng rng(2024);
  int loaded = 0, refused = 0;
  for (int it = 0; it < 400; ++it) {
    std::string s = valid_st.substr(0, std::min<size_t>(valid_st.size(), 4096));
    uint64_t hl;
    std::memcpy(&hl, valid_st.data(), 8);
    s = valid_st.substr(0, 8 + hl) + std::string(1024, '\0');
    const int kind = int(rng.below(4));
    if (kind == 0) s[rng.below(s.size())] ^= char(1 << rng.below(8));                 // bit flip
    if (kind == 1) s.resize(rng.below(s.size()));                                       // truncation
    if (kind == 2) s[8 + rng.below(std::max<uint64_t>(hl, 1))] = "{}[]\",:0-9e"[rng.below(11)];  // header junk
    if (kind == 3) { uint64_t n = rng.next() % (hl * 2 + 16); std::memcpy(s.data(), &n, 8); }   // header length
    write_bytes(d + "/f.safetensors", s);
    try {
      SafetensorsFile f(d + "/f.safetensors");
      for (auto& n : f.names()) (void)f.get(n);
      ++loaded;
    } catch (const InputError&) {
      ++refused;
    }
    std::string c = valid_cfg;
    for (int k = 0; k < 3; ++k) c[rng.below(c.size())] = "{}[]\",:0123456789-.enul"[rng.below(23)];
    auto j = nlohmann::json::parse(c, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      ++refused;  // not JSON: ModelConfig::load reports it; the field validation below is what we fuzz
      continue;
    }
    try {
      ModelConfig::from_json(j);
      ++loaded;
    } catch (const InputError&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 100);
  EXPECT_GT(loaded, 10);
  fs::remove_all(d);
}

}  // namespace

namespace {

// A checkpoint split over two shards with model.safetensors.index.json loads and computes the same logits.
TEST(Loader, ShardedCheckpointEqualsSingleFile) {
  const std::string d = tmp_dir("shard");
  SafetensorsFile whole(test::data_dir("tiny-fp32/model.safetensors"));
  std::vector<Tensor> a, b;
  nlohmann::json map = nlohmann::json::object();
  int i = 0;
  for (auto& n : whole.names()) {
    const bool first = i++ % 2 == 0;
    (first ? a : b).push_back(whole.get(n));
    map[n] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_safetensors(d + "/model-00001-of-00002.safetensors", a);
  write_safetensors(d + "/model-00002-of-00002.safetensors", b);
  write_file_atomic(d + "/model.safetensors.index.json", nlohmann::json{{"weight_map", map}}.dump());
  fs::copy_file(test::data_dir("tiny-fp32/config.json"), d + "/config.json");
  LoadedModel one = open_model(test::data_dir("tiny-fp32")), two = open_model(d);
  GenerateOptions go;
  go.max_new_tokens = 8;
  EXPECT_EQ(generate(*one.model, {5, 6, 7}, go), generate(*two.model, {5, 6, 7}, go));
  // A shard named by the index but missing is a clear error.
  fs::remove(d + "/model-00002-of-00002.safetensors");
  EXPECT_NE(error_of([&] { open_model(d); }).find("cannot open"), std::string::npos);
  fs::remove_all(d);
}

}  // namespace
