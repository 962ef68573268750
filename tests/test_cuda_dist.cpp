// The distributed building blocks on one GPU rank, with their bulk data on the NCCL transport (a one-rank NCCL
// communicator bootstrapped over the local one) and the CUDA training backend in fp32-product mode: the
// expert-parallel exchange against the backend's own experts kernel, ZeRO-1 AdamW against AdamW. They check that
// backend memory, the backend's stream and NCCL's stream are used in the right order; the multi-rank behaviour
// of the same code is tested on CPU ranks under mpirun (tests/python/test_dist.py). Skips without a GPU or NCCL.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>

#include "core/rng.h"
#include "dist/expert_parallel.h"
#include "dist/nccl.h"
#include "dist/parallel.h"
#include "dist/zero.h"
#include "model/weights.h"
#include "ops/backend.h"
#include "train/optimizer.h"
#include "train_buf_helpers.h"

using namespace dsv3;
using test::down;
using test::up;

namespace {

std::vector<float> randn(int64_t n, uint64_t seed, double scale = 1.0) {
  Rng r(seed);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = float(r.normal() * scale);
  return v;
}

std::unique_ptr<TrainBackend> fp32_gpu() {
  setenv("DSV3_CUDA_TRAIN_F32", "1", 1);
  auto be = make_cuda_train_backend(0);
  unsetenv("DSV3_CUDA_TRAIN_F32");
  return be;
}

void expect_close(const std::vector<float>& a, const std::vector<float>& b, double tol, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], tol * (1 + std::abs(b[i]))) << what << " at " << i;
}

#define REQUIRE_GPU_NCCL()                                        \
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";        \
  if (!have_nccl()) GTEST_SKIP() << "this build has no NCCL"

}  // namespace

TEST(CudaDist, ExpertParallelOnOneGpuRankEqualsExpertsKernel) {
  REQUIRE_GPU_NCCL();
  const int64_t N = 37, K = 2, H = 64, I = 32, E = 4;
  auto be = fp32_gpu();
  auto local = make_local_communicator();
  auto nccl = make_nccl_communicator(*local, 0);
  ExpertParallel ep(*local, *nccl, E);
  std::vector<int32_t> idx(size_t(N * K));
  for (int64_t t = 0; t < N; ++t) idx[size_t(t * K)] = int32_t(t % E), idx[size_t(t * K + 1)] = int32_t((t * 3 + 1) % E);
  auto x = up(*be, randn(N * H, 1)), Wg = up(*be, randn(E * I * H, 2, 0.2)), Wu = up(*be, randn(E * I * H, 3, 0.2)),
       Wd = up(*be, randn(E * H * I, 4, 0.2)), w = up(*be, randn(N * K, 5)), dout = up(*be, randn(N * H, 6));
  auto gi = up(*be, idx);
  auto o1 = up(*be, std::vector<float>(size_t(N * H), 0.5f)), o2 = up(*be, std::vector<float>(size_t(N * H), 0.5f));
  auto s1 = be->new_moe_state();
  auto s2 = ep.new_state(*be);
  be->experts_forward(o1.data(), *s1, x.data(), gi.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
  ep.forward(*be, o2.data(), *s2, x.data(), gi.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I);
  expect_close(down(*be, o2), down(*be, o1), 1e-5, "out");
  const std::vector<float> z(size_t(N * H), 0.f), zw(size_t(E * I * H), 0.f);
  auto dx1 = up(*be, z), dx2 = up(*be, z), dw1 = up(*be, std::vector<float>(size_t(N * K))),
       dw2 = up(*be, std::vector<float>(size_t(N * K)));
  auto dg1 = up(*be, zw), du1 = up(*be, zw), dd1 = up(*be, zw), dg2 = up(*be, zw), du2 = up(*be, zw), dd2 = up(*be, zw);
  be->experts_backward(dx1.data(), dw1.data(), dg1.data(), du1.data(), dd1.data(), dout.data(), *s1, x.data(),
                       gi.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
  ep.backward(*be, dx2.data(), dw2.data(), dg2.data(), du2.data(), dd2.data(), dout.data(), *s2, Wg.data(), Wu.data(),
              Wd.data(), N, K, H, I);
  expect_close(down(*be, dx2), down(*be, dx1), 1e-5, "dx");
  expect_close(down(*be, dw2), down(*be, dw1), 1e-5, "dw");
  expect_close(down(*be, dg2), down(*be, dg1), 1e-5, "dWg");
  expect_close(down(*be, du2), down(*be, du1), 1e-5, "dWu");
  expect_close(down(*be, dd2), down(*be, dd1), 1e-5, "dWd");
}

TEST(CudaDist, ZeroAdamWOnOneGpuRankIsAdamW) {
  REQUIRE_GPU_NCCL();
  ModelConfig c = ModelConfig::load(std::string(DSV3_TEST_DATA) + "/train-tiny.json");
  auto world = make_local_communicator();
  Parallel par = make_parallel(*world, 0, 0, c);
  attach_device_comms(par, 0);
  ASSERT_EQ(par.bulk_world().transport(), "nccl");
  const ParamLayout L = make_param_layout(c);
  auto be = fp32_gpu();
  AdamWConfig cfg;
  cfg.clip = 0.5;  // clipping active
  AdamW ref(*be, L, cfg);
  ShardedAdamW z(*be, L, par, cfg);
  const std::vector<float> p0 = randn(L.num_params, 1);
  auto p1 = up(*be, p0), p2 = up(*be, p0);
  for (int step = 0; step < 3; ++step) {
    const std::vector<float> g = randn(L.num_params, 10 + step);
    auto g1 = up(*be, g), g2 = up(*be, g);
    const double n1 = ref.step(p1.data(), g1.data(), 1e-2);
    const double n2 = z.step(p2.data(), g2.data(), 1e-2);
    EXPECT_NEAR(n1, n2, 1e-12 * n1);
  }
  expect_close(down(*be, p2), down(*be, p1), 1e-6, "params");
  std::vector<float> m1, v1, m2, v2;
  ref.get_moments(m1, v1);
  z.get_moments(m2, v2);
  expect_close(m2, m1, 1e-6, "m");
  expect_close(v2, v1, 1e-6, "v");
}
