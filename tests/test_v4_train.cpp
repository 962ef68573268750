// DeepSeek-V4 training on the CPU: the loss and every parameter gradient of the tiny-v4-fwd model against
// transformers' autograd (tests/data/tiny-v4-grad, tools/make_v4_grad_fixture.py), the Newton-Schulz iteration
// of Muon and Muon's parameter groups.
#include <gtest/gtest.h>

#include <cmath>

#include "core/rng.h"
#include "io/safetensors.h"
#include "model/v4_loader.h"
#include "test_helpers.h"
#include "train/muon.h"
#include "train/v4_train_model.h"

using namespace dsv3;

TEST(V4Train, LossAndEveryGradientMatchTransformers) {
  LoadedV4Model m = open_v4_model(test::data_dir("tiny-v4-fwd"));
  const V4Weights& w = m.model->weights();
  const std::string gdir = test::data_dir("tiny-v4-grad");
  V4Weights want = load_v4_weights(w.cfg, gdir);  // gradients under the parameters' names
  SafetensorsFile ref(gdir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids");
  const double want_loss = ref.get("loss").f32()[0];
  const int64_t n = w.layout.num_params;
  std::vector<float> G(static_cast<size_t>(n), 0.f);
  V4TrainModel<float> tm(w, w.flat.f32(), G.data());
  V4StepStats st = tm.run(ids.ptr<int32_t>(), ids.dim(0), ids.dim(1), 1.0, true);
  const double le = std::fabs(st.loss - want_loss) / std::fabs(want_loss);
  std::printf("[v4 grads] loss %.7f vs transformers %.7f (rel %.2e)\n", st.loss, want_loss, le);
  EXPECT_LE(le, 1e-5);
  double worst = 0;
  std::string worst_name;
  int64_t tensors = 0;
  for (const auto& s : w.layout.specs) {
    if (s.is_bias) continue;
    const int64_t k = shape_numel(s.shape);
    const float* a = G.data() + s.offset;
    const float* b = want.flat.f32() + s.offset;
    double d = 0, r = 0;
    for (int64_t i = 0; i < k; ++i) d = std::max(d, double(std::fabs(a[i] - b[i]))), r = std::max(r, double(std::fabs(b[i])));
    const bool indexer = s.name.find(".attn.indexer.") != std::string::npos;
    if (indexer) {  // no gradient on either side
      EXPECT_EQ(r, 0.0) << s.name;
      EXPECT_EQ(d, 0.0) << s.name;
      continue;
    }
    ASSERT_GT(r, 0.0) << s.name << " has no gradient in the reference";
    const double e = d / r;  // max |error| / max |reference| of the tensor
    if (e > worst) worst = e, worst_name = s.name;
    EXPECT_LE(e, 1e-4) << s.name;
    ++tensors;
  }
  std::printf("[v4 grads] %lld tensors: worst max|error| / max|grad| = %.2e (%s)\n", (long long)tensors, worst,
              worst_name.c_str());
}

namespace {

// The polar factor U V^T of M [r, c] (r <= c) in fp64 without an SVD: Newton's iteration X = 1.5 X - 0.5 X X^T X
// from X = M / ||M||_F, run to convergence.
std::vector<double> polar(const std::vector<double>& M, int64_t r, int64_t c) {
  double nrm = 0;
  for (double v : M) nrm += v * v;
  std::vector<double> X(M), A(static_cast<size_t>(r * r)), Y(X.size());
  for (double& v : X) v /= std::sqrt(nrm);
  for (int it = 0; it < 200; ++it) {
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) {
        double s = 0;
        for (int64_t k = 0; k < c; ++k) s += X[static_cast<size_t>(i * c + k)] * X[static_cast<size_t>(j * c + k)];
        A[static_cast<size_t>(i * r + j)] = s;
      }
    for (int64_t i = 0; i < r; ++i)
      for (int64_t k = 0; k < c; ++k) {
        double s = 0;
        for (int64_t j = 0; j < r; ++j) s += A[static_cast<size_t>(i * r + j)] * X[static_cast<size_t>(j * c + k)];
        Y[static_cast<size_t>(i * c + k)] = 1.5 * X[static_cast<size_t>(i * c + k)] - 0.5 * s;
      }
    X.swap(Y);
  }
  return X;
}

}  // namespace

TEST(V4Train, NewtonSchulzOrthogonalizes) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{24, 40}, {40, 24}, {16, 16}}) {
    Rng rng(uint64_t(rows * 100 + cols));
    std::vector<float> X(static_cast<size_t>(rows * cols));
    for (auto& v : X) v = float(rng.normal());
    // the wide orientation, in fp64, for the reference
    const bool tall = rows > cols;
    const int64_t r = tall ? cols : rows, c = tall ? rows : cols;
    std::vector<double> M(X.size());
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) M[static_cast<size_t>(tall ? j * c + i : i * c + j)] = X[static_cast<size_t>(i * cols + j)];
    std::vector<double> U = polar(M, r, c);
    newton_schulz(X.data(), rows, cols);
    // Orthogonality: the r x r Gram matrix of the wide orientation is ~I (singular values ~1).
    double off = 0, diag = 0, dpol = 0;
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) {
        double s = 0;
        for (int64_t k = 0; k < c; ++k) {
          const double a = tall ? X[static_cast<size_t>(k * cols + i)] : X[static_cast<size_t>(i * cols + k)];
          const double b = tall ? X[static_cast<size_t>(k * cols + j)] : X[static_cast<size_t>(j * cols + k)];
          s += a * b;
        }
        if (i == j) diag = std::max(diag, std::fabs(s - 1));
        else off = std::max(off, std::fabs(s));
      }
    for (int64_t i = 0; i < r; ++i)
      for (int64_t k = 0; k < c; ++k) {
        const double a = tall ? X[static_cast<size_t>(k * cols + i)] : X[static_cast<size_t>(i * cols + k)];
        dpol = std::max(dpol, std::fabs(a - U[static_cast<size_t>(i * c + k)]));
      }
    std::printf("[muon] NS %lldx%lld: max |diag(X X^T) - 1| %.2e, max |offdiag| %.2e, max |X - polar| %.2e\n",
                (long long)rows, (long long)cols, diag, off, dpol);
    EXPECT_LT(diag, 2e-2);
    EXPECT_LT(off, 2e-2);
    EXPECT_LT(dpol, 2e-2);
  }
}

TEST(V4Train, MuonParamGroups) {
  V4Config c = V4Config::load(test::data_dir("tiny-v4-fwd"));
  ParamLayout L = make_v4_param_layout(c);
  MuonPartition p = v4_muon_partition(c, L);
  auto in_muon = [&](const std::string& n) {
    int k = 0;
    for (const auto& m : p.muon) k += m.name.rfind(n, 0) == 0;
    return k;
  };
  auto in_adam = [&](const std::string& n) {
    for (const auto& a : p.adam)
      if (a.name == n) return true;
    return false;
  };
  for (const char* n : {"embed.weight", "head.weight", "norm.weight", "hc_head_base", "hc_head_scale",
                        "layers.0.attn_norm.weight", "layers.0.hc_attn_base", "layers.0.hc_ffn_scale",
                        "layers.0.attn.attn_sink", "layers.1.attn.compressor.ape", "layers.1.attn.q_norm.weight"}) {
    EXPECT_TRUE(in_adam(n)) << n;
    EXPECT_EQ(in_muon(n), 0) << n;
  }
  for (const char* n : {"layers.0.attn.wq_a.weight", "layers.0.hc_attn_fn", "hc_head_fn", "layers.1.attn.compressor.wkv.weight",
                        "layers.0.ffn.gate.weight", "layers.0.ffn.shared_experts.w2.weight",
                        "layers.2.ffn.experts.3.w1.weight", "layers.2.ffn.experts.3.w2.weight"})
    EXPECT_EQ(in_muon(n), 1) << n;  // one matrix each; every expert on its own
  EXPECT_EQ(in_muon("layers.0.attn.wo_a.weight"), c.o_groups);  // one per output group
  for (const auto& m : p.muon) {
    if (m.name.rfind("layers.0.attn.wo_a.weight", 0) == 0) {
      EXPECT_EQ(m.rows, c.o_lora_rank);
    }
  }
  // Every non-bias value is in exactly one group, or frozen (the indexer, no gradient).
  std::vector<int> cover(static_cast<size_t>(L.num_params), 0);
  for (const auto& m : p.muon)
    for (int64_t i = 0; i < m.rows * m.cols; ++i) ++cover[static_cast<size_t>(m.offset + i)];
  for (const auto& a : p.adam)
    for (int64_t i = 0; i < a.n; ++i) ++cover[static_cast<size_t>(a.offset + i)];
  for (const auto& f : p.frozen) {
    EXPECT_NE(f.find("attn.indexer."), std::string::npos) << f;
    for (int64_t i = 0; i < shape_numel(L.at(f).shape); ++i) ++cover[static_cast<size_t>(L.at(f).offset + i)];
  }
  for (int64_t i = 0; i < L.num_params; ++i) ASSERT_EQ(cover[static_cast<size_t>(i)], 1) << "value " << i;
  EXPECT_EQ(p.frozen.size(), 12u);  // 6 indexer tensors in each of the 2 CSA layers
}

// One Muon step on one matrix: W -= lr * 0.18 sqrt(max(n, m)) NS(mu M + G) with M = G (first step), so the update
// has RMS ~ 0.18 lr whatever the gradient's scale, and an AdamW segment beside it moves by ~lr.
TEST(V4Train, MuonStepIsRmsMatched) {
  const int64_t r = 8, c = 12;
  MuonPartition part;
  part.muon.push_back({"w", 0, r, c});
  part.adam.push_back({"b", r * c, 4, false});
  AdamWConfig ac;
  ac.clip = 0;
  MuonConfig mc;
  mc.weight_decay = 0;
  Muon opt(part, r * c + 4, mc, ac);
  std::vector<float> p(static_cast<size_t>(r * c + 4), 0.f), g(p.size());
  Rng rng(3);
  for (auto& v : g) v = float(1e-3 * rng.normal());
  opt.step(p.data(), g.data(), 0.01);
  double ss = 0;
  for (int64_t i = 0; i < r * c; ++i) ss += double(p[static_cast<size_t>(i)]) * p[static_cast<size_t>(i)];
  const double rms = std::sqrt(ss / double(r * c));
  std::printf("[muon] update RMS %.5f (target 0.18 * lr = 0.0018)\n", rms);
  EXPECT_NEAR(rms, 0.0018, 1e-4);  // an orthogonal r x c matrix (r < c) has RMS 1 / sqrt(c)
  for (int64_t i = 0; i < 4; ++i) EXPECT_NEAR(std::fabs(p[static_cast<size_t>(r * c + i)]), 0.01, 1e-4);  // Adam: lr sign(g)
}

// The sequence-wise balance loss of the moe layers (V4TrainModel::set_balance_alpha): its gradient (the gradient
// with alpha minus the one without) against central finite differences of the balance loss itself in fp64, on
// the router weights of the moe layers and on tensors upstream of them (embedding, attention, mHC, a hash layer's
// router); hash layers add no term of their own, so only the 3 moe layers of the fixture contribute.
TEST(V4Train, BalanceLossGradientMatchesFiniteDifferences) {
  LoadedV4Model m = open_v4_model(test::data_dir("tiny-v4-fwd"));
  const V4Weights& w = m.model->weights();
  const int64_t n = w.layout.num_params, Tn = 24;
  std::vector<double> P(w.flat.f32(), w.flat.f32() + n), G0(static_cast<size_t>(n), 0.0), G1(static_cast<size_t>(n), 0.0);
  Rng rng(11);
  std::vector<int32_t> ids(static_cast<size_t>(2 * Tn));
  for (auto& t : ids) t = int32_t(rng.below(uint64_t(w.cfg.vocab_size)));
  const double alpha = 0.5;
  V4TrainModel<double> plain(w, P.data(), G0.data()), bal(w, P.data(), G1.data());
  bal.set_balance_alpha(alpha);
  const V4StepStats s0 = plain.run(ids.data(), 2, Tn, 1.0, true);
  const V4StepStats s1 = bal.run(ids.data(), 2, Tn, 1.0, true);
  EXPECT_EQ(s0.balance_loss, 0.0);
  EXPECT_EQ(s0.loss, s1.loss);  // the CE is untouched
  // sum_i f_i P_i is ~1 for balanced routing; three moe layers.
  std::printf("[v4 balance] alpha %.2f: balance loss %.6f (%zu moe layers)\n", alpha, s1.balance_loss, bal.moe_layers().size());
  EXPECT_EQ(bal.moe_layers().size(), 3u);
  EXPECT_GT(s1.balance_loss, 0.5 * alpha * 3);
  EXPECT_LT(s1.balance_loss, 4.0 * alpha * 3);
  std::vector<double> scratch(static_cast<size_t>(n));
  V4TrainModel<double> probe(w, P.data(), scratch.data());
  probe.set_balance_alpha(alpha);
  auto value = [&] { return probe.run(ids.data(), 2, Tn, 1.0, false).balance_loss; };
  double worst = 0, gmax = 0;
  int checked = 0;
  for (const char* name : {"layers.2.ffn.gate.weight", "layers.3.ffn.gate.weight", "layers.4.ffn.gate.weight",
                           "layers.1.ffn.gate.weight", "embed.weight", "layers.0.attn.wq_a.weight",
                           "layers.2.hc_ffn_fn", "layers.2.ffn_norm.weight", "layers.1.ffn.experts.0.w2.weight"}) {
    const auto& s = w.layout.at(name);
    const int64_t k = shape_numel(s.shape);
    for (int j = 0; j < 4; ++j) {
      const int64_t i = s.offset + int64_t(rng.below(uint64_t(k)));
      const double h = 1e-5, keep = P[static_cast<size_t>(i)];
      P[static_cast<size_t>(i)] = keep + h;
      const double lp = value();
      P[static_cast<size_t>(i)] = keep - h;
      const double lm = value();
      P[static_cast<size_t>(i)] = keep;
      const double fd = (lp - lm) / (2 * h), an = G1[static_cast<size_t>(i)] - G0[static_cast<size_t>(i)];
      worst = std::max(worst, std::fabs(fd - an));
      gmax = std::max(gmax, std::fabs(fd));
      ++checked;
    }
  }
  std::printf("[v4 balance] %d entries: max |analytic - fd| = %.2e (max |grad| %.2e)\n", checked, worst, gmax);
  EXPECT_GT(gmax, 1e-4);
  EXPECT_LE(worst, 1e-7 + 1e-5 * gmax);
}
