// DeepSeek-V3.2 (DSA): the tiny-v32 fixture (transformers DeepseekV32ForCausalLM, fp32, index_topk 6 of 24
// tokens) through every cache path, that the selection really changes the result, and malformed V3.2 configs
// and checkpoints. Logits and greedy generation against the reference are in test_fixtures.cpp.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/loader.h"
#include "model/sequence_logits.h"
#include "test_helpers.h"
#include "train/train_model.h"

using namespace dsv3;
namespace fs = std::filesystem;

namespace {

std::vector<int32_t> ids_of(const Tensor& t) { return std::vector<int32_t>(t.ptr<int32_t>(), t.ptr<int32_t>() + t.numel()); }

nlohmann::json v32_config() { return nlohmann::json::parse(read_file(test::data_dir("tiny-v32/config.json"))); }

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
  fs::path p = fs::temp_directory_path() / ("dsv3_v32_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

// Feeding a sequence in pieces (prefill chunks, absorbed or decompressed single-token decode steps) gives, at
// every position, the reference's full-sequence logits: the cached latents and indexer keys are what a
// one-shot forward computes.
TEST(V32, CachedDecodeEqualsFullSequence) {
  SafetensorsFile ref(test::data_dir("tiny-v32/reference.safetensors"));
  auto ids = ids_of(ref.get("input_ids"));
  Tensor want = ref.get("logits");
  LoadedModel lm = open_model(test::data_dir("tiny-v32"));
  Model& m = *lm.model;
  const int64_t V = m.config().vocab_size, T = ref.get("input_ids").dim(1);
  for (bool absorb : {true, false})
    for (int64_t first : {int64_t(1), int64_t(5), int64_t(13)}) {
      KvCache cache(*lm.backend, m.config(), 64, 8);
      SeqCache sc;
      std::vector<BatchSeq> b(1);
      b[0].cache = &sc;
      ForwardOptions fo;
      fo.absorb_decode = absorb;
      fo.all_logits = true;
      for (int64_t p = 0; p < T;) {
        const int64_t n = p == 0 ? first : (p < 16 ? 1 : std::min<int64_t>(T - p, 5));  // then a chunk of 5
        b[0].tokens.assign(ids.begin() + p, ids.begin() + p + n);
        auto r = m.forward(b, cache, fo);
        for (int64_t i = 0; i < n; ++i)
          EXPECT_LE(test::rel_err(r.logits.f32() + i * V, want.ptr<float>() + (p + i) * V, V), 1e-4)
              << "position " << p + i << " first chunk " << first << (absorb ? " absorbed" : " decompressed");
        p += n;
      }
    }
}

// A batch mixing one sequence's prefill with other sequences' decode steps gives each sequence's own logits.
TEST(V32, MixedBatchEqualsSeparateRuns) {
  SafetensorsFile ref(test::data_dir("tiny-v32/reference.safetensors"));
  auto ids = ids_of(ref.get("input_ids"));
  Tensor want = ref.get("logits");
  LoadedModel lm = open_model(test::data_dir("tiny-v32"));
  Model& m = *lm.model;
  const int64_t V = m.config().vocab_size, T = 24;
  KvCache cache(*lm.backend, m.config(), 256, 8);
  std::vector<SeqCache> sc(2);
  // Sequence 0: prefill 10, then decode. Sequence 1 (row 1 of the reference) joins at step 3 with a 12-token prefill.
  int64_t p0 = 0, p1 = 0;
  for (int step = 0; step < 10; ++step) {
    std::vector<BatchSeq> b;
    std::vector<std::pair<int, int64_t>> who;  // (sequence, its first position this step)
    const int64_t n0 = p0 == 0 ? 10 : 1;
    b.push_back({&sc[0], std::vector<int32_t>(ids.begin() + p0, ids.begin() + p0 + n0)});
    who.push_back({0, p0});
    if (step >= 3) {
      const int64_t n1 = p1 == 0 ? 12 : 1;
      b.push_back({&sc[1], std::vector<int32_t>(ids.begin() + T + p1, ids.begin() + T + p1 + n1)});
      who.push_back({1, p1});
    }
    auto r = m.forward(b, cache);  // last-token logits of each sequence, in batch order
    for (size_t i = 0; i < b.size(); ++i) {
      const auto [s, p] = who[i];
      const int64_t last = p + int64_t(b[i].tokens.size()) - 1;
      EXPECT_LE(test::rel_err(r.logits.f32() + i * V, want.ptr<float>() + (s * T + last) * V, V), 1e-4)
          << "seq " << s << " position " << last;
      (s == 0 ? p0 : p1) = last + 1;
    }
  }
}

// The selection is not a no-op in the fixture: attending to every token (index_topk >= T) gives other logits,
// so the reference comparison would catch a missing or wrong indexer.
TEST(V32, SelectionChangesTheLogits) {
  SafetensorsFile ref(test::data_dir("tiny-v32/reference.safetensors"));
  auto ids = ids_of(ref.get("input_ids"));
  Tensor want = ref.get("logits");
  const std::string d = tmp_dir("dense");
  auto j = v32_config();
  j["index_topk"] = 1000;
  write_file_atomic(d + "/config.json", j.dump());
  fs::copy_file(test::data_dir("tiny-v32/model.safetensors"), d + "/model.safetensors");
  LoadedModel lm = open_model(d);
  SequenceLogits r = sequence_logits(*lm.model, *lm.backend, ids, 2, 24);
  EXPECT_GT(test::rel_err(r.logits.f32(), want.ptr<float>(), want.numel()), 1e-2);
  // The first index_topk (6) positions of each row see all their keys either way.
  const int64_t V = lm.model->config().vocab_size;
  EXPECT_LE(test::rel_err(r.logits.f32(), want.ptr<float>(), 6 * V), 1e-4);
  fs::remove_all(d);
}

// Training: the loss and every parameter gradient against torch autograd through transformers (fp32). The
// indexer's gradients are zero there (no_grad) and here; the attention gradients flow only through the selected
// keys.
TEST(V32, TrainingLossAndGradientsMatchTransformers) {
  const std::string dir = test::data_dir("tiny-v32");
  ModelConfig cfg = ModelConfig::load(dir);
  LoadOptions lo;
  lo.dtype = "f32";
  ModelWeights w = load_weights(cfg, dir, lo);
  ModelWeights g = alloc_weights(cfg, DType::F32);
  SafetensorsFile ref(dir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids");
  auto be = make_cpu_train_backend();
  TrainModel tm(*be, cfg, w, g);
  LossOptions opt;
  opt.mtp = false;
  StepStats st = tm.run(ids.ptr<int32_t>(), ids.dim(0), ids.dim(1), opt, 1.0, true);
  const double ref_loss = ref.get("loss").ptr<float>()[0];
  EXPECT_LT(std::abs(st.total - ref_loss) / std::abs(ref_loss), 1e-5) << st.total << " vs " << ref_loss;
  int checked = 0, indexer = 0;
  for (auto& s : g.layout.specs) {
    if (s.is_bias) continue;
    ASSERT_TRUE(ref.has("grad." + s.name)) << s.name;
    Tensor want = ref.get("grad." + s.name), got = g.view(s.name);
    ASSERT_EQ(want.numel(), got.numel()) << s.name;
    double d = 0, n = 0;
    for (int64_t i = 0; i < want.numel(); ++i) {
      d += double(got.ptr<float>()[i] - want.ptr<float>()[i]) * (got.ptr<float>()[i] - want.ptr<float>()[i]);
      n += double(want.ptr<float>()[i]) * want.ptr<float>()[i];
    }
    if (s.name.find(".indexer.") != std::string::npos) {
      EXPECT_EQ(n, 0.0) << s.name;
      EXPECT_EQ(d, 0.0) << s.name;
      ++indexer;
    } else {
      EXPECT_LT(std::sqrt(d / std::max(n, 1e-60)), 1e-4) << s.name;
    }
    ++checked;
  }
  EXPECT_EQ(indexer, 3 * 5);
  EXPECT_GT(checked, 60);
}

TEST(V32, MalformedConfigsNameTheField) {
  auto check = [](nlohmann::json j, const std::string& want) {
    std::string e = error_of([&] { ModelConfig::from_json(j); });
    EXPECT_NE(e.find(want), std::string::npos) << "got: " << e;
  };
  auto j = v32_config();
  j["q_lora_rank"] = nullptr;
  check(j, "q_lora_rank");
  j = v32_config();
  j["mlp_layer_types"] = {"dense", "sparse"};
  check(j, "'mlp_layer_types' has 2 entries");
  j = v32_config();
  j["mlp_layer_types"] = {"dense", "moe", "sparse"};
  check(j, "'mlp_layer_types' has entry \"moe\"");
  j = v32_config();
  j["index_head_dim"] = 4;  // below qk_rope_head_dim 8
  check(j, "'index_head_dim'");
  j = v32_config();
  j["index_topk"] = 0;
  check(j, "'index_topk'");
  j = v32_config();
  j["index_n_heads"] = "many";
  check(j, "'index_n_heads' must be an integer");
  j = v32_config();
  j["layer_types"] = {"indexed_attention", "full_attention", "indexed_attention"};
  check(j, "'layer_types'");
  j = v32_config();
  j["scoring_func"] = "softmax";
  check(j, "scoring_func");
  j = v32_config();
  j["model_type"] = "llama";
  check(j, "model_type 'llama' is not supported");
  // Defaults: the released model's indexer when the fields are absent; mlp_layer_types from first_k_dense_replace.
  j = v32_config();
  j.erase("index_topk");
  j.erase("mlp_layer_types");
  ModelConfig c = ModelConfig::from_json(j);
  EXPECT_EQ(c.index_topk, 2048);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  // The released V3.2 sizes cache 512 + 64 + 128 = 704 values per token per layer.
  auto rel = v32_config();
  rel.update({{"kv_lora_rank", 512}, {"qk_rope_head_dim", 64}, {"index_head_dim", 128}, {"q_lora_rank", 1536}});
  EXPECT_EQ(ModelConfig::from_json(rel).cache_values_per_token_per_layer(), 704);
  // Round trip through to_json keeps the architecture.
  ModelConfig c2 = ModelConfig::from_json(c.to_json());
  EXPECT_EQ(c2.model_type, "deepseek_v32");
  EXPECT_EQ(c2.index_head_dim, c.index_head_dim);
  EXPECT_EQ(c2.mlp_layer_types, c.mlp_layer_types);
}

TEST(V32, MissingOrMisshapenIndexerTensorIsRefused) {
  const std::string d = tmp_dir("ld");
  fs::copy_file(test::data_dir("tiny-v32/model.safetensors"), d + "/model.safetensors");
  auto j = v32_config();
  j["index_head_dim"] = 32;  // the checkpoint's indexer keys are 16 wide
  write_file_atomic(d + "/config.json", j.dump());
  std::string e = error_of([&] { open_model(d); });
  EXPECT_NE(e.find("self_attn.indexer."), std::string::npos) << e;
  EXPECT_NE(e.find("expected shape"), std::string::npos) << e;
  // A V3 config over V3.2 weights is fine (the indexer tensors are extra); a V3.2 config over V3 weights is not.
  fs::remove(d + "/model.safetensors");
  fs::copy_file(test::data_dir("tiny-fp32/model.safetensors"), d + "/model.safetensors");
  auto j3 = nlohmann::json::parse(read_file(test::data_dir("tiny-fp32/config.json")));
  j3["model_type"] = "deepseek_v32";
  write_file_atomic(d + "/config.json", j3.dump());
  e = error_of([&] { open_model(d); });
  EXPECT_NE(e.find("missing tensor model.layers.0.self_attn.indexer."), std::string::npos) << e;
  fs::remove_all(d);
}

}  // namespace
