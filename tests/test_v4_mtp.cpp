// The DeepSeek-V4 MTP blocks (mtp.k.*): config (the schedule entry past the main layers), layout and loading
// (checkpoints without mtp.* load with MTP off; incomplete or misshapen blocks fail in one line), the inference
// path (V4Model::mtp_forward) against the training model's MTP loss, and fp64 central finite differences of the
// MTP part of the loss (lambda / D * sum_k mean CE_k) w.r.t. a sample of every MTP and main-model tensor.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/v4_model.h"
#include "serve/serving_model.h"
#include "train/v4_train_model.h"
#include "train/v4_trainer.h"

using namespace dsv3;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// 3 main layers (sliding, CSA, HCA; one hash layer), 2 MTP blocks (sliding, then CSA from layer_types[3..4]).
json tiny_config(int64_t depth = 2) {
  json j = {{"model_type", "deepseek_v4"}, {"vocab_size", 64}, {"hidden_size", 16}, {"moe_intermediate_size", 8},
            {"num_hidden_layers", 3}, {"num_attention_heads", 2}, {"num_key_value_heads", 1}, {"head_dim", 8},
            {"q_lora_rank", 8}, {"o_groups", 2}, {"o_lora_rank", 4}, {"qk_rope_head_dim", 4},
            {"n_routed_experts", 4}, {"num_experts_per_tok", 2}, {"num_hash_layers", 1},
            {"layer_types", {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                             "sliding_attention", "compressed_sparse_attention"}},
            {"compress_rates", {{"compressed_sparse_attention", 4}, {"heavily_compressed_attention", 8}}},
            {"sliding_window", 6}, {"index_n_heads", 2}, {"index_head_dim", 8}, {"index_topk", 2}, {"hc_mult", 2},
            {"max_position_embeddings", 64}, {"initializer_range", 0.3}, {"num_nextn_predict_layers", depth}};
  return j;
}

// Random weights with every tensor away from its special init value (norms 1, biases 0), and random selection
// biases, so that no gradient is structurally zero.
V4Weights random_weights(const V4Config& c, uint64_t seed) {
  V4Weights w = init_v4_weights(c, seed);
  Rng rng(seed + 7);
  for (int64_t i = 0; i < w.layout.num_params; ++i) w.flat.f32()[i] += float(0.1 * rng.normal());
  for (int64_t i = 0; i < w.layout.num_bias; ++i) w.bias_flat.f32()[i] = float(0.05 * rng.normal());
  return w;
}

std::string temp_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("dsv3_v4mtp_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(V4Mtp, ConfigTakesTheScheduleEntryPastTheMainLayers) {
  V4Config c = V4Config::from_json(tiny_config());
  ASSERT_EQ(c.mtp_layer_types.size(), 2u);
  EXPECT_EQ(c.mtp_layer_types[0], V4Attn::Sliding);
  EXPECT_EQ(c.mtp_layer_types[1], V4Attn::CSA);
  EXPECT_EQ(c.attn_type(4), V4Attn::CSA);
  EXPECT_EQ(c.mlp_type(3), V4Mlp::Moe);
  EXPECT_EQ(c.block_prefix(4), "mtp.1.");
  EXPECT_EQ(c.compress_rate(4), 4);
  // The hub's compress_ratios: V4-Flash's trailing 0 is the MTP block's sliding attention; a list without the
  // entry gives sliding too; a bad entry names the field.
  json j = tiny_config(1);
  j.erase("layer_types");
  j["compress_ratios"] = {0, 4, 128, 128};
  j["compress_rates"] = nullptr;
  EXPECT_EQ(V4Config::from_json(j).mtp_layer_types[0], V4Attn::HCA);
  j["compress_ratios"] = {0, 4, 128};
  EXPECT_EQ(V4Config::from_json(j).mtp_layer_types[0], V4Attn::Sliding);
  j["compress_ratios"] = {0, 4, 128, 5};
  EXPECT_NE(error_of([&] { V4Config::from_json(j); }).find("compress_ratios"), std::string::npos);
  j = tiny_config(0);
  EXPECT_TRUE(V4Config::from_json(j).mtp_layer_types.empty());
}

TEST(V4Mtp, LayoutLoadSaveAndMalformedBlocks) {
  const V4Config c = V4Config::from_json(tiny_config(1));
  V4Weights w = random_weights(c, 1);
  // MTP tensors follow the main model: the main offsets do not move.
  V4Config c0 = c;
  c0.num_nextn_predict_layers = 0;
  c0.mtp_layer_types.clear();
  const ParamLayout L0 = make_v4_param_layout(c0);
  EXPECT_EQ(w.layout.at("mtp.0.e_proj.weight").offset, L0.num_params);
  EXPECT_EQ(v4_total_params(c), L0.num_params);
  EXPECT_EQ(v4_mtp_params(c), w.layout.num_params - L0.num_params);
  for (const char* n : {"mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.hnorm.weight",
                        "mtp.0.norm.weight", "mtp.0.hc_head_fn", "mtp.0.hc_head_base", "mtp.0.hc_head_scale",
                        "mtp.0.attn.wq_a.weight", "mtp.0.ffn.gate.bias", "mtp.0.hc_attn_fn", "mtp.0.ffn_norm.weight"})
    EXPECT_TRUE(w.layout.index.count(n)) << n;
  EXPECT_FALSE(w.layout.index.count("mtp.0.attn.compressor.wkv.weight"));  // sliding-only
  EXPECT_EQ(w.layout.at("mtp.0.hc_head_scale").shape, (Shape{1}));
  const std::string cfg_text = tiny_config(1).dump();
  const std::string d = temp_dir("save");
  save_v4_model(d, w, cfg_text);
  V4Weights r = load_v4_weights(V4Config::load(d), d);
  EXPECT_FALSE(r.mtp_absent);
  ASSERT_EQ(r.layout.num_params, w.layout.num_params);
  for (int64_t i = 0; i < w.layout.num_params; ++i) ASSERT_EQ(r.flat.f32()[i], w.flat.f32()[i]);
  for (int64_t i = 0; i < w.layout.num_bias; ++i) ASSERT_EQ(r.bias_flat.f32()[i], w.bias_flat.f32()[i]);

  // Without any mtp.* tensor (what transformers saves): MTP off.
  auto rewrite = [&](const std::string& dir, const std::function<bool(Tensor&)>& keep) {
    fs::create_directories(dir);
    SafetensorsFile f(d + "/model.safetensors");
    std::vector<Tensor> ts;
    for (const auto& n : f.names()) {
      Tensor t = f.get(n);
      t.name = n;
      if (keep(t)) ts.push_back(t);
    }
    write_safetensors(dir + "/model.safetensors", ts);
    write_file_atomic(dir + "/config.json", cfg_text);
  };
  const std::string none = temp_dir("none");
  rewrite(none, [](Tensor& t) { return t.name.rfind("mtp.", 0) != 0; });
  V4Weights n0 = load_v4_weights(V4Config::load(none), none);
  EXPECT_TRUE(n0.mtp_absent);
  EXPECT_EQ(n0.cfg.num_nextn_predict_layers, 0);
  EXPECT_EQ(n0.layout.num_params, L0.num_params);
  // One tensor of the block missing, one with the wrong shape: one line naming it.
  const std::string part = temp_dir("part");
  rewrite(part, [](Tensor& t) { return t.name != "mtp.0.hnorm.weight"; });
  std::string e = error_of([&] { load_v4_weights(V4Config::load(part), part); });
  EXPECT_NE(e.find("mtp.0.hnorm.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("incomplete MTP block"), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos) << e;
  const std::string bad = temp_dir("bad");
  rewrite(bad, [&](Tensor& t) {
    if (t.name == "mtp.0.e_proj.weight") {
      t.shape = {8, 16};  // same size, wrong shape
    }
    return true;
  });
  e = error_of([&] { load_v4_weights(V4Config::load(bad), bad); });
  EXPECT_NE(e.find("mtp.0.e_proj.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("[16, 16]"), std::string::npos) << e;
  for (const auto& x : {d, none, part, bad}) fs::remove_all(x);
}

// The inference path (V4Model::forward's final streams, then mtp_forward for each block) gives the MTP loss the
// training model computes, for a chain of two blocks.
TEST(V4Mtp, InferenceLogitsGiveTheTrainingLoss) {
  const V4Config c = V4Config::from_json(tiny_config(2));
  V4Weights w = random_weights(c, 2);
  const int64_t n = w.layout.num_params, Tn = 20, V = c.vocab_size;
  std::vector<float> G(static_cast<size_t>(n), 0.f);
  std::vector<int32_t> ids(static_cast<size_t>(Tn));
  Rng rng(9);
  for (auto& t : ids) t = int32_t(rng.next() % uint64_t(V));
  V4TrainModel<float> tm(w, w.flat.f32(), G.data());
  const V4StepStats st = tm.run(ids.data(), 1, Tn, 1.0, false, 0.3);
  ASSERT_EQ(st.mtp_loss.size(), 2u);
  std::unique_ptr<Backend> be = make_cpu_backend();
  V4Model m(w, *be);
  ASSERT_EQ(m.mtp_depth(), 2);
  V4Cache cache(c);
  Tensor X;
  m.forward(ids, cache, true, &X);
  double worst = 0;
  for (int64_t k = 0; k < 2; ++k) {
    const int64_t tk = Tn - k - 1;  // rows; the last has no target
    Tensor Xn, Xk = X.rows(0, tk);
    Tensor lg = m.mtp_forward(k, Xk, std::vector<int32_t>(ids.begin() + k + 1, ids.end()), cache, &Xn);
    double ce = 0;
    for (int64_t i = 0; i + 1 < tk; ++i) {
      const float* l = lg.f32() + i * V;
      double mx = l[0], s = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(l[v]));
      for (int64_t v = 0; v < V; ++v) s += std::exp(double(l[v]) - mx);
      ce += std::log(s) + mx - l[ids[size_t(i + k + 2)]];
    }
    ce /= double(tk - 1);
    const double e = std::fabs(ce - st.mtp_loss[size_t(k)]) / ce;
    worst = std::max(worst, e);
    EXPECT_LT(e, 1e-5) << "block " << k;
    X = Xn;
  }
  std::printf("[v4 mtp] inference vs training MTP loss: worst rel err %.2e (losses %.5f, %.5f)\n", worst,
              st.mtp_loss[0], st.mtp_loss[1]);
  // An MTP request past the depth is a one-line error.
  EXPECT_NE(error_of([&] { m.mtp_forward(2, X, {1}, cache); }).find("no MTP block 2"), std::string::npos);
}

// d(lambda / D * sum_k mean CE_k)/dtheta = G(lambda) - G(0) against central differences of st.total - st.loss, in
// fp64, for the largest-gradient entry and two random entries of every tensor (MTP blocks and the main model).
TEST(V4Mtp, FiniteDifferencesOfTheMtpLoss) {
  const V4Config c = V4Config::from_json(tiny_config(2));
  V4Weights w = random_weights(c, 3);
  const int64_t n = w.layout.num_params, B = 2, Tn = 14;
  const double lambda = 0.7;
  std::vector<int32_t> ids(static_cast<size_t>(B * Tn));
  Rng rng(11);
  for (auto& t : ids) t = int32_t(rng.next() % uint64_t(c.vocab_size));
  std::vector<double> P(w.flat.f32(), w.flat.f32() + n), G(static_cast<size_t>(n), 0.0), G0(static_cast<size_t>(n), 0.0);
  {
    V4TrainModel<double> t1(w, P.data(), G.data()), t0(w, P.data(), G0.data());
    t1.run(ids.data(), B, Tn, 1.0, true, lambda);
    t0.run(ids.data(), B, Tn, 1.0, true, 0.0);
  }
  for (int64_t i = 0; i < n; ++i) G[size_t(i)] -= G0[size_t(i)];
  auto mtp_loss = [&] {
    std::vector<double> G2(static_cast<size_t>(n));
    V4TrainModel<double> t(w, P.data(), G2.data());
    const V4StepStats s = t.run(ids.data(), B, Tn, 1.0, false, lambda);
    return s.total - s.loss;
  };
  double worst = 0, worst_main = 0, worst_mtp = 0;
  std::string worst_name;
  int64_t checked = 0, tensors = 0;
  for (const auto& s : w.layout.specs) {
    if (s.is_bias) continue;
    const int64_t numel = shape_numel(s.shape);
    if (s.name.find(".attn.indexer.") != std::string::npos) {  // no gradient through the top-k selection
      for (int64_t i = 0; i < numel; ++i) ASSERT_EQ(G[static_cast<size_t>(s.offset + i)], 0.0) << s.name;
      continue;
    }
    int64_t big = 0;
    for (int64_t i = 0; i < numel; ++i)
      if (std::fabs(G[static_cast<size_t>(s.offset + i)]) > std::fabs(G[static_cast<size_t>(s.offset + big)])) big = i;
    const bool mtp = s.name.rfind("mtp.", 0) == 0;
    if (s.name == "norm.weight" || s.name.rfind("hc_head_", 0) == 0) {  // the main head: MTP reads the streams before it
      for (int64_t i = 0; i < numel; ++i) ASSERT_EQ(G[static_cast<size_t>(s.offset + i)], 0.0) << s.name;
      continue;
    }
    ASSERT_GT(std::fabs(G[static_cast<size_t>(s.offset + big)]), 0.0) << s.name << " gets no MTP gradient";
    double d2 = 0, n2 = 0;
    for (int64_t i : {big, int64_t(rng.next() % uint64_t(numel)), int64_t(rng.next() % uint64_t(numel))}) {
      double& p = P[static_cast<size_t>(s.offset + i)];
      const double keep = p, h = 1e-5;
      p = keep + h;
      const double lp = mtp_loss();
      p = keep - h;
      const double lm = mtp_loss();
      p = keep;
      const double num = (lp - lm) / (2 * h), ana = G[static_cast<size_t>(s.offset + i)];
      d2 += (num - ana) * (num - ana), n2 += num * num;
      ++checked;
    }
    const double e = n2 > 0 ? std::sqrt(d2 / n2) : std::sqrt(d2);
    if (e > worst) worst = e, worst_name = s.name;
    (mtp ? worst_mtp : worst_main) = std::max(mtp ? worst_mtp : worst_main, e);
    EXPECT_LT(e, 1e-5) << s.name;
    ++tensors;
  }
  std::printf("[v4 mtp fd] %lld entries of %lld tensors: worst rel err %.2e (%s); MTP tensors %.2e, main-model %.2e\n",
              (long long)checked, (long long)tensors, worst, worst_name.c_str(), worst_mtp, worst_main);
}

// The serving hooks that let the engine's speculative path run V4 (serve/serving_model.h): hidden rows are the
// final streams MTP block 0 reads, mtp_logits equals mtp_forward on the sequence's own MTP cache, and a rejected
// draft leaves the cache as if only the current token had been fed (the next token's logits equal a plain
// token-by-token forward); an accepted one keeps the two-token pass.
TEST(V4Mtp, ServingDraftHooksRestoreTheCache) {
  const V4Config c = V4Config::from_json(tiny_config(1));
  V4Weights w = random_weights(c, 5);
  std::unique_ptr<Backend> be = make_cpu_backend();
  V4Model m(w, *be);
  V4ServingModel sm(m, 256, 16);
  const ServingLimits lim = sm.limits();
  ASSERT_TRUE(lim.has_mtp);
  ASSERT_EQ(lim.hidden_row, c.hc_mult * c.hidden_size);
  const int64_t V = c.vocab_size;
  const std::vector<int32_t> prompt = {5, 9, 17, 33, 2, 40, 11, 8, 21};  // past one CSA / HCA window
  SeqCache s, mtp;
  ASSERT_TRUE(sm.reserve(s, 40) && sm.reserve(mtp, 40));
  auto run = [&](std::vector<int32_t> toks, bool all, bool draft) {
    std::vector<BatchSeq> b(1);
    b[0].cache = &s, b[0].tokens = std::move(toks), b[0].all_logits = all;
    if (draft) sm.mark_draft(s);
    ForwardOptions fo;
    fo.keep_hidden = true;
    return sm.forward(b, fo);
  };
  // Reference: the plain model, token by token after the prompt.
  V4Cache ref(c);
  Tensor Xref;
  m.forward(prompt, ref, false, &Xref);
  ForwardResult r = run(prompt, false, false);
  ASSERT_EQ(r.hidden.numel(), int64_t(prompt.size()) * lim.hidden_row);
  double worst = 0;
  for (int64_t i = 0; i < Xref.numel(); ++i) worst = std::max(worst, double(std::fabs(r.hidden.f32()[i] - Xref.f32()[i])));
  EXPECT_EQ(worst, 0.0);
  // mtp_logits over the prompt rows (row j consumes token j + 1) equals mtp_forward.
  {
    std::vector<BatchSeq> b(1);
    b[0].cache = &mtp, b[0].tokens.assign(prompt.begin() + 1, prompt.end());
    const int64_t T = int64_t(b[0].tokens.size());
    std::vector<float> h(r.hidden.f32(), r.hidden.f32() + T * lim.hidden_row);
    Tensor got = sm.mtp_logits(b, h);
    V4Cache ref_mtp(c);
    Tensor want = m.mtp_forward(0, Xref.rows(0, T), b[0].tokens, ref_mtp);
    ASSERT_EQ(got.shape, want.shape);
    for (int64_t i = 0; i < got.numel(); ++i) ASSERT_EQ(got.f32()[i], want.f32()[i]);
    EXPECT_EQ(mtp.len, T);
  }
  auto max_diff = [&](const float* a, const float* b) {
    double d = 0, mx = 0;
    for (int64_t v = 0; v < V; ++v) d = std::max(d, double(std::fabs(a[v] - b[v]))), mx = std::max(mx, double(std::fabs(b[v])));
    return d / mx;
  };
  // Steps: rejected, accepted, rejected drafts; the reference feeds the kept tokens one at a time.
  int32_t t = 3;
  for (int step = 0; step < 3; ++step) {
    const bool reject = step != 1;
    const int32_t d = int32_t((7 * step + 12) % V);
    ForwardResult v = run({t, d}, true, true);
    ASSERT_EQ(v.logits.dim(0), 2);
    Tensor l1 = m.forward({t}, ref);
    EXPECT_LT(max_diff(v.logits.f32(), l1.f32()), 1e-5) << step;
    if (reject) {
      sm.reject_draft(s);
      EXPECT_EQ(s.len, ref.len);
    } else {
      Tensor l2 = m.forward({d}, ref);
      EXPECT_LT(max_diff(v.logits.f32() + V, l2.f32()), 1e-5) << step;
    }
    t = int32_t((t * 5 + 1) % V);
    ForwardResult n = run({t}, false, false);  // the next token sees exactly the kept tokens
    Tensor ln = m.forward({t}, ref);
    EXPECT_LT(max_diff(n.logits.f32(), ln.f32()), 1e-5) << step;
    EXPECT_EQ(s.len, ref.len);
    t = int32_t((t * 3 + 2) % V);
  }
  // reject_draft without a draft step is an internal error, not a silent corruption.
  EXPECT_THROW(sm.reject_draft(s), std::exception);
  sm.release(s);
  sm.release(mtp);
  EXPECT_EQ(sm.free_blocks(), sm.total_blocks());
}
