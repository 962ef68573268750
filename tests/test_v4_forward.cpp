// DeepSeek-V4 forward on the CPU against the tiny-v4-fwd fixture (tools/make_v4_logits_fixture.py:
// transformers' DeepseekV4ForCausalLM in fp32 with every layer type, hash layers, 3 mHC streams and more
// compression windows than the indexer keeps): logits, greedy generation, decode through the cache in any
// chunking equal to the one-shot forward, and one-line errors for bad inputs, configs and checkpoints.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/v4_generate.h"
#include "model/v4_loader.h"
#include "test_helpers.h"

using namespace dsv3;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kDir = test::data_dir("tiny-v4-fwd");

LoadedV4Model& model() {
  static LoadedV4Model m = open_v4_model(kDir);
  return m;
}

std::vector<int32_t> ids_row(const Tensor& ids, int64_t b) {
  const int64_t T = ids.dim(1);
  std::vector<int32_t> v(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) v[size_t(t)] = ids.ptr<int32_t>()[b * T + t];
  return v;
}

// max |a - b| / max |b| over n values.
double max_rel(const float* a, const float* b, int64_t n) {
  double d = 0, r = 0;
  for (int64_t i = 0; i < n; ++i) {
    d = std::max(d, double(std::fabs(a[i] - b[i])));
    r = std::max(r, double(std::fabs(b[i])));
  }
  return d / r;
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

std::string tmp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("dsv3_v4f_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

}  // namespace

TEST(V4Forward, LogitsMatchTransformers) {
  SafetensorsFile ref(kDir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids"), want = ref.get("logits");  // [B, T], [B, T, V]
  const int64_t B = ids.dim(0), T = ids.dim(1), V = want.dim(2);
  for (int64_t b = 0; b < B; ++b) {
    V4Cache cache(model().model->config());
    Tensor got = model().model->forward(ids_row(ids, b), cache, /*all_logits=*/true);
    ASSERT_EQ(got.shape, (Shape{T, V}));
    const double e = max_rel(got.f32(), want.f32() + b * T * V, T * V);
    EXPECT_LE(e, 1e-4) << "row " << b;
    std::printf("[v4] row %lld: max |logit error| / max |logit| = %.3g\n", (long long)b, e);
    EXPECT_EQ(cache.len, T);
  }
}

// The cache holds everything later tokens need (window ring, open compression windows, CSA overlap halves,
// indexer entries): prompt in one call, token by token, and in uneven chunks give the same logits.
TEST(V4Forward, DecodeThroughCacheEqualsFullForward) {
  SafetensorsFile ref(kDir + "/reference.safetensors");
  const std::vector<int32_t> ids = ids_row(ref.get("input_ids"), 1);
  V4Model& m = *model().model;
  const int64_t T = int64_t(ids.size()), V = m.config().vocab_size;
  V4Cache full_cache(m.config());
  Tensor full = m.forward(ids, full_cache, true);
  for (const std::vector<int64_t>& chunks : {std::vector<int64_t>(size_t(T), 1), std::vector<int64_t>{5, 3, 9, 1, 2, 7, 11}}) {
    V4Cache cache(m.config());
    int64_t t0 = 0;
    double worst = 0;
    for (int64_t n : chunks) {
      std::vector<int32_t> part(ids.begin() + t0, ids.begin() + t0 + n);
      Tensor l = m.forward(part, cache, true);
      const double e = max_rel(l.f32(), full.f32() + t0 * V, n * V);
      EXPECT_LE(e, 1e-5) << "chunk at " << t0 << " of " << n;
      worst = std::max(worst, e);
      t0 += n;
    }
    ASSERT_EQ(t0, T);
    std::printf("[v4] %zu chunks: max |logit difference| / max |logit| vs one call = %.3g\n", chunks.size(), worst);
    EXPECT_EQ(cache.values(), full_cache.values());
  }
}

TEST(V4Forward, GreedyGenerationMatchesTransformers) {
  SafetensorsFile ref(kDir + "/reference.safetensors");
  Tensor p = ref.get("gen_prompt"), g = ref.get("gen_output");
  std::vector<int32_t> prompt(p.ptr<int32_t>(), p.ptr<int32_t>() + p.numel());
  std::vector<int32_t> want(g.ptr<int32_t>() + p.numel(), g.ptr<int32_t>() + g.numel());
  GenerateOptions go;
  go.max_new_tokens = int64_t(want.size());
  GenerateStats st;
  EXPECT_EQ(v4_generate(*model().model, prompt, go, &st), want);
  EXPECT_EQ(st.new_tokens, int64_t(want.size()));
  EXPECT_EQ(st.finish_reason, "length");
  // Sampling: seeded, repeatable, in range; a stop id ends the generation.
  go.sampling.temperature = 0.9;
  go.sampling.top_p = 0.9;
  go.sampling.seed = 5;
  auto a = v4_generate(*model().model, prompt, go), b = v4_generate(*model().model, prompt, go);
  EXPECT_EQ(a, b);
  for (int32_t t : a) EXPECT_TRUE(t >= 0 && t < model().model->config().vocab_size);
  go.sampling = {};
  go.stop_ids = {want[2]};
  auto s = v4_generate(*model().model, prompt, go, &st);
  EXPECT_EQ(s, std::vector<int32_t>(want.begin(), want.begin() + 3));
  EXPECT_EQ(st.finish_reason, "stop");
}

TEST(V4Forward, BadInputsGiveOneLineErrors) {
  V4Model& m = *model().model;
  const V4Config& c = m.config();
  V4Cache cache(c);
  EXPECT_NE(error_of([&] { m.forward({3, int32_t(c.vocab_size)}, cache); }).find("out of range for vocab_size"),
            std::string::npos);
  EXPECT_NE(error_of([&] { m.forward({}, cache); }).find("no tokens"), std::string::npos);
  std::vector<int32_t> longp(static_cast<size_t>(c.max_position_embeddings + 1), 5);
  EXPECT_NE(error_of([&] { m.forward(longp, cache); }).find("exceeds max_position_embeddings"), std::string::npos);
  EXPECT_EQ(cache.len, 0);  // nothing was appended by the failed calls
  V4Config other = c;
  other.num_hidden_layers = 2;
  V4Cache wrong(other);
  EXPECT_NE(error_of([&] { m.forward({3}, wrong); }).find("cache was made for a model with 2 layers"), std::string::npos);
  GenerateOptions go;
  EXPECT_NE(error_of([&] { v4_generate(m, longp, go); }).find("exceeds max_position_embeddings"), std::string::npos);
  EXPECT_NE(error_of([&] { v4_generate(m, {}, go); }).find("prompt is empty"), std::string::npos);
  go.speculative_mtp = true;
  EXPECT_NE(error_of([&] { v4_generate(m, {3}, go); }).find("speculative"), std::string::npos);
  EXPECT_NE(error_of([&] { open_v4_model(kDir, "cuda"); }).find("CPU only"), std::string::npos);
  EXPECT_NE(error_of([&] { open_v4_model(kDir, "cpu", "fp8"); }).find("auto, f32 or bf16"), std::string::npos);
  EXPECT_NE(error_of([&] { open_v4_model(kDir + "/nope"); }).find("does not exist"), std::string::npos);
}

TEST(V4Forward, MalformedConfigsAndCheckpointsNameTheProblem) {
  const std::string d = tmp_dir("bad");
  SafetensorsFile src(kDir + "/model.safetensors");
  const json cfg = json::parse(read_file(kDir + "/config.json"));
  auto write = [&](const std::string& drop, const Tensor* replace = nullptr) {
    std::vector<Tensor> ts;
    for (const auto& n : src.names()) {
      if (n == drop) continue;
      Tensor t = replace && replace->name == n ? *replace : src.get(n);
      t.name = n;
      ts.push_back(t);
    }
    write_safetensors(d + "/model.safetensors", ts);
  };
  auto err = [&] { return error_of([&] { open_v4_model(d); }); };
  write_file_atomic(d + "/config.json", cfg.dump());
  write("model.layers.1.attn.indexer.weights_proj.weight");  // a CSA layer's indexer
  std::string e = err();
  EXPECT_NE(e.find("missing tensor layers.1.attn.indexer.weights_proj.weight"), std::string::npos) << e;
  Tensor bad = Tensor::zeros(DType::F32, {5, 32}, "model.layers.2.attn.compressor.ape");  // HCA rate is 8
  write("", &bad);
  e = err();
  EXPECT_NE(e.find("layers.2.attn.compressor.ape"), std::string::npos) << e;
  EXPECT_NE(e.find("expected shape [8, 32]"), std::string::npos) << e;
  write("");
  json j = cfg;
  j["layer_types"][1] = "full_attention";
  write_file_atomic(d + "/config.json", j.dump());
  e = err();
  EXPECT_NE(e.find("'layer_types' has entry \"full_attention\""), std::string::npos) << e;
  j = cfg;
  j["compress_rates"]["heavily_compressed_attention"] = 0;
  write_file_atomic(d + "/config.json", j.dump());
  e = err();
  EXPECT_NE(e.find("'compress_rate_hca' must be positive"), std::string::npos) << e;
  j = cfg;
  j["mlp_layer_types"] = {"hash_moe", "moe"};
  write_file_atomic(d + "/config.json", j.dump());
  e = err();
  EXPECT_NE(e.find("'mlp_layer_types' has 2 entries"), std::string::npos) << e;
  fs::remove_all(d);
}
