// The training backend: the CPU backend's ops are the reference kernels (exact), device names are checked,
// and the chunked lm_head + cross-entropy of the training model equals the unchunked one.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "core/rng.h"
#include "model/weights.h"
#include "ops/cpu/blas.h"
#include "ops/cpu/train_ops.h"
#include "ops/train_backend.h"
#include "test_helpers.h"
#include "train/train_model.h"

using namespace dsv3;

namespace {

std::vector<float> randn(int64_t n, uint64_t seed) {
  Rng r(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = float(r.normal());
  return v;
}

}  // namespace

TEST(TrainBackend, CpuOpsEqualReferenceKernels) {
  auto be = make_cpu_train_backend();
  EXPECT_EQ(be->name(), "cpu");
  EXPECT_TRUE(be->is_host());
  const int64_t N = 5, D = 12, V = 7;
  auto x = randn(N * D, 1), w = randn(D, 2), W = randn(V * D, 3);
  // rmsnorm forward and backward
  std::vector<float> o1(N * D), o2(N * D), r1(N), r2(N);
  be->rmsnorm_forward(o1.data(), r1.data(), x.data(), D, w.data(), N, D, 1e-6);
  cpu::rmsnorm_forward(o2.data(), r2.data(), x.data(), D, w.data(), N, D, 1e-6);
  EXPECT_EQ(o1, o2);
  EXPECT_EQ(r1, r2);
  std::vector<float> dx1(N * D, 0.f), dx2(N * D, 0.f), dw1(D, 0.f), dw2(D, 0.f);
  be->rmsnorm_backward(dx1.data(), D, dw1.data(), o1.data(), x.data(), D, r1.data(), w.data(), N, D);
  cpu::rmsnorm_backward(dx2.data(), D, dw2.data(), o2.data(), x.data(), D, r2.data(), w.data(), N, D);
  EXPECT_EQ(dx1, dx2);
  EXPECT_EQ(dw1, dw2);
  // linear + cross-entropy; the backend adds to *correct (the kernel stores it)
  std::vector<float> l1(N * V), l2(N * V);
  be->linear_forward(l1.data(), x.data(), W.data(), N, V, D);
  cpu::linear_forward(l2.data(), x.data(), W.data(), N, V, D);
  EXPECT_EQ(l1, l2);
  std::vector<int32_t> tg = {0, 3, -1, 6, 2};
  int64_t c1 = 10, c2 = 0;
  const double s1 = be->cross_entropy_forward_backward(l1.data(), l1.data(), tg.data(), N, V, 0.25, &c1);
  const double s2 = cpu::cross_entropy_forward_backward(l2.data(), l2.data(), tg.data(), N, V, 0.25, &c2);
  EXPECT_EQ(s1, s2);
  EXPECT_EQ(l1, l2);
  EXPECT_EQ(c1, 10 + c2);
  // swiglu
  std::vector<float> a1(N * D), a2(N * D);
  be->swiglu_forward(a1.data(), x.data(), o1.data(), N * D);
  cpu::swiglu_forward(a2.data(), x.data(), o1.data(), N * D);
  EXPECT_EQ(a1, a2);
  // copy_2d (plain and accumulating), add, fill, count_experts
  std::vector<float> dst(4 * 6, 1.f), src = randn(4 * 5, 4);
  be->copy_2d(dst.data() + 1, 6, src.data(), 5, 4, 3, false);
  be->copy_2d(dst.data() + 1, 6, src.data(), 5, 4, 3, true);
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t c = 0; c < 6; ++c)
      EXPECT_EQ(dst[r * 6 + c], c >= 1 && c < 4 ? src[r * 5 + c - 1] + src[r * 5 + c - 1] : 1.f);
  be->fill(dst.data(), 2.f, 24);
  be->add(dst.data(), src.data(), 20);
  EXPECT_EQ(dst[7], 2.f + src[7]);
  EXPECT_EQ(dst[23], 2.f);
  std::vector<int64_t> load(4, 1);
  std::vector<int32_t> idx = {0, 3, 3, 2, 3};
  be->count_experts(load, idx.data(), 5);
  EXPECT_EQ(load, (std::vector<int64_t>{2, 1, 2, 4}));
  // memory round trip
  float* p = static_cast<float*>(be->raw_alloc(sizeof(float) * 3));
  std::vector<float> h = {1.f, 2.f, 3.f}, back(3);
  be->upload(p, h.data(), sizeof(float) * 3);
  be->download(back.data(), p, sizeof(float) * 3);
  be->raw_free(p);
  EXPECT_EQ(back, h);
}

TEST(TrainBackend, UnknownDevicesAreRefused) {
  for (const char* d : {"tpu", "cuda:x", "cuda:", "cpu0", "cuda:-1", ""}) {
    try {
      make_train_backend(d);
      FAIL() << "accepted device '" << d << "'";
    } catch (const InputError& e) {
      const std::string m = e.what();
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
      if (std::string(d) != "") {
        EXPECT_NE(m.find("cpu, cuda or cuda:N"), std::string::npos) << m;
      }
    }
  }
  EXPECT_EQ(make_train_backend("cpu")->name(), "cpu");
}

TEST(TrainBackend, ChunkedHeadLossEqualsUnchunked) {
  ModelConfig cfg = ModelConfig::load(test::data_dir("train-tiny.json"));  // MoE layer and one MTP module
  ModelWeights w = init_weights(cfg, 3, DType::F32);
  ModelWeights g1 = alloc_weights(cfg, DType::F32), g2 = alloc_weights(cfg, DType::F32);
  auto be = make_cpu_train_backend();
  const int64_t B = 2, T = 9;
  std::vector<int32_t> ids(B * T);
  Rng r(5);
  for (auto& x : ids) x = int32_t(r.below(uint64_t(cfg.vocab_size)));
  LossOptions opt;
  opt.mtp = true, opt.balance_alpha = 1e-3;
  TrainModel whole(*be, cfg, w, g1), chunked(*be, cfg, w, g2);
  chunked.set_head_chunk_rows(4);  // 18 main rows, 14 MTP rows: uneven last chunks
  StepStats a = whole.run(ids.data(), B, T, opt, 1.0, true);
  StepStats b = chunked.run(ids.data(), B, T, opt, 1.0, true);
  EXPECT_NEAR(a.total, b.total, 1e-6 * std::abs(a.total));
  EXPECT_EQ(a.main_correct, b.main_correct);
  EXPECT_EQ(a.mtp_correct, b.mtp_correct);
  EXPECT_LT(test::rel_err(g2.flat.ptr<float>(), g1.flat.ptr<float>(), g1.flat.numel()), 1e-6);
}
