// Optimizer, learning-rate schedules and token shards.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "io/atomic_file.h"
#include "model/weights.h"
#include "train/data.h"
#include "train/optimizer.h"

using namespace dsv3;

TEST(TrainOptim, Schedules) {
  LrSchedule s;
  s.lr = 1.0, s.min_lr = 0.1, s.warmup = 10, s.total = 110;
  EXPECT_DOUBLE_EQ(s.at(0), 0.1);
  EXPECT_DOUBLE_EQ(s.at(9), 1.0);
  EXPECT_DOUBLE_EQ(s.at(10), 1.0);
  EXPECT_NEAR(s.at(60), 0.55, 1e-12);  // halfway through the cosine
  EXPECT_NEAR(s.at(110), 0.1, 1e-12);
  s.kind = "constant";
  EXPECT_DOUBLE_EQ(s.at(100), 1.0);
  s.kind = "wsd";
  s.decay_frac = 0.1;  // decay over the last 11 steps
  EXPECT_DOUBLE_EQ(s.at(98), 1.0);
  EXPECT_NEAR(s.at(109), 0.1, 1e-12);
  EXPECT_GT(s.at(104), 0.1);
  EXPECT_LT(s.at(104), 1.0);
  s.kind = "linear";
  EXPECT_THROW(s.validate(), InputError);
}

TEST(TrainOptim, AdamWStepDecayAndClip) {
  ModelConfig c;  // a config only large enough to give matrices and norms
  c.vocab_size = 4, c.hidden_size = 2, c.intermediate_size = 2, c.num_hidden_layers = 1, c.num_attention_heads = 1;
  c.kv_lora_rank = 2, c.qk_nope_head_dim = 2, c.qk_rope_head_dim = 2, c.v_head_dim = 2, c.max_position_embeddings = 8;
  ParamLayout L = make_param_layout(c);
  AdamWConfig cfg;
  cfg.clip = 0;
  auto be = make_cpu_train_backend();
  AdamW opt(*be, L, cfg);
  std::vector<float> p(L.num_params, 1.f), g(L.num_params, 0.5f);
  const double lr = 0.01;
  opt.step(p.data(), g.data(), lr);
  // First step: m/bc1 = g, sqrt(v/bc2) = |g|, so the update is lr * sign(g); decay multiplies by 1 - lr wd first.
  const auto& emb = L.at("model.embed_tokens.weight");
  const auto& norm = L.at("model.norm.weight");
  EXPECT_NEAR(p[emb.offset], 1.0 * (1 - lr * 0.1) - lr, 1e-6);
  EXPECT_NEAR(p[norm.offset], 1.0 - lr, 1e-6);
  // Clipping: the reported norm is the pre-clip norm; a huge gradient moves parameters as a clipped one does.
  AdamWConfig cc;
  AdamW a(*be, L, cc), b(*be, L, cc);
  std::vector<float> pa(L.num_params, 0.f), pb(L.num_params, 0.f), big(L.num_params, 100.f);
  const double n = a.step(pa.data(), big.data(), lr);
  EXPECT_NEAR(n, 100.0 * std::sqrt(double(L.num_params)), 1e-3 * n);
  std::vector<float> unit(L.num_params, float(1.0 / std::sqrt(double(L.num_params))));
  b.step(pb.data(), unit.data(), lr);
  for (int64_t i = 0; i < L.num_params; ++i) EXPECT_NEAR(pa[i], pb[i], 1e-6);
}

TEST(TrainData, ShardRoundTripAndCorruption) {
  namespace fs = std::filesystem;
  const fs::path d = fs::temp_directory_path() / ("dsv3_shard_test_" + std::to_string(::getpid()));
  fs::create_directories(d);
  std::vector<uint32_t> toks(1000);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = uint32_t(i % 97);
  write_shard((d / "train_0000.bin").string(), toks, 100);
  write_shard((d / "val.bin").string(), toks, 100);
  write_file_atomic((d / "meta.json").string(), R"({"vocab_size": 100, "eos_id": 1})");
  DataLoader a(d.string(), 7), b(d.string(), 7);
  std::vector<int32_t> x(4 * 16), y(4 * 16);
  a.next_batch(4, 16, x.data());
  b.next_batch(4, 16, y.data());
  EXPECT_EQ(x, y);  // same seed, same windows
  for (int64_t i = 0; i < 4; ++i)
    for (int64_t t = 1; t < 16; ++t) EXPECT_EQ(x[i * 16 + t], (x[i * 16] + t) % 97);  // consecutive shard tokens
  EXPECT_THROW(a.check_vocab(50), InputError);  // tokenizer larger than the model
  EXPECT_NO_THROW(a.check_vocab(100));
  // Truncated and bad-magic shards are rejected with the file's name.
  std::string bytes = read_file((d / "train_0000.bin").string());
  write_file_atomic((d / "train_0000.bin").string(), bytes.substr(0, bytes.size() - 3));
  try {
    DataLoader c(d.string(), 1);
    FAIL() << "truncated shard accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
  bytes[0] = 'X';
  write_file_atomic((d / "train_0000.bin").string(), bytes);
  EXPECT_THROW(DataLoader(d.string(), 1), InputError);
  fs::remove_all(d);
}
