// The distributed building blocks on a one-rank communicator, where each must reduce exactly to the
// single-process code: ZeRO-1 AdamW against AdamW (bit for bit), an expert slice and its gather against the
// full layout, the expert-parallel dispatch/combine against the backend's own experts kernel. The multi-rank
// behaviour is tested under mpirun (tests/dist/test_comm.cpp, tests/python/test_dist.py).
#include <gtest/gtest.h>

#include "core/rng.h"
#include "dist/expert_parallel.h"
#include "dist/expert_shard.h"
#include "dist/parallel.h"
#include "dist/zero.h"
#include "model/weights.h"
#include "train/optimizer.h"

using namespace dsv3;

namespace {

ModelConfig tiny_moe() {
  ModelConfig c = ModelConfig::load(std::string(DSV3_TEST_DATA) + "/train-tiny.json");
  return c;
}

std::vector<float> randn(int64_t n, uint64_t seed, double scale = 1.0) {
  Rng r(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = float(r.normal() * scale);
  return v;
}

}  // namespace

TEST(DistLocal, ZeroAdamWOnOneRankIsAdamW) {
  ModelConfig c = tiny_moe();
  auto world = make_local_communicator();
  Parallel par = make_parallel(*world, 0, 0, c);
  ASSERT_FALSE(par.distributed());
  ParamLayout L = make_param_layout(c);
  auto be = make_cpu_train_backend();
  AdamWConfig cfg;
  cfg.clip = 0.5;  // clipping active: the norm path is exercised
  AdamW ref(*be, L, cfg);
  ShardedAdamW z(*be, L, par, cfg);
  std::vector<float> p1 = randn(L.num_params, 1), p2 = p1;
  for (int step = 0; step < 3; ++step) {
    std::vector<float> g = randn(L.num_params, 10 + step), g2 = g;
    const double n1 = ref.step(p1.data(), g.data(), 1e-2);
    const double n2 = z.step(p2.data(), g2.data(), 1e-2);
    EXPECT_DOUBLE_EQ(n1, n2);
  }
  EXPECT_EQ(p1, p2);
  std::vector<float> m1, v1, m2, v2;
  ref.get_moments(m1, v1);
  z.get_moments(m2, v2);
  EXPECT_EQ(m1, m2);
  EXPECT_EQ(v1, v2);
  EXPECT_EQ(z.state_elements(), 2 * L.num_params);
}

TEST(DistLocal, ExpertSliceAndGather) {
  ModelConfig c = tiny_moe();
  ModelWeights full = init_weights(c, 3, DType::F32);
  const int64_t E = c.n_routed_experts;
  ModelWeights part = slice_experts(full, 2, 3);  // experts 2, 3, 4 of every MoE layer
  EXPECT_EQ(part.layout.expert_lo, 2);
  EXPECT_EQ(part.layout.expert_n, 3);
  const int64_t per_expert = 3 * c.moe_intermediate_size * c.hidden_size;
  int64_t moe_layers = 0;
  for (auto& l : full.layers) moe_layers += l.is_moe;
  for (auto& m : full.mtp) moe_layers += m.layer.is_moe;
  EXPECT_EQ(full.layout.num_params - part.layout.num_params, moe_layers * (E - 3) * per_expert);
  // The grouped views of the slice are the full model's experts 2..4.
  for (size_t l = 0; l < full.layers.size(); ++l) {
    if (!full.layers[l].is_moe) continue;
    const Tensor& fg = full.layers[l].moe.gate;
    const Tensor& pg = part.layers[l].moe.gate;
    ASSERT_EQ(pg.dim(0), 3);
    const int64_t n = pg.numel();
    EXPECT_TRUE(std::equal(pg.f32(), pg.f32() + n, fg.f32() + 2 * (fg.numel() / E)));
  }
  // slice_flat is slice_experts for any flat array; gather_flat over one rank holding all experts is the identity.
  std::vector<float> ff(full.flat.f32(), full.flat.f32() + full.flat.numel());
  std::vector<float> pf = slice_flat(full.layout, ff, part.layout);
  EXPECT_TRUE(std::equal(pf.begin(), pf.end(), part.flat.f32()));
  auto one = make_local_communicator();
  std::vector<float> back(full.layout.num_params, -1.f);
  gather_flat(*one, full.layout, ff.data(), full.layout, back.data());
  EXPECT_EQ(back, ff);
}

TEST(DistLocal, ExpertParallelOnOneRankEqualsExpertsKernel) {
  const int64_t N = 7, K = 2, H = 16, I = 8, E = 4;
  auto be = make_cpu_train_backend();
  std::vector<float> x = randn(N * H, 1), Wg = randn(E * I * H, 2, 0.2), Wu = randn(E * I * H, 3, 0.2),
                     Wd = randn(H * E * I, 4, 0.2), w = randn(N * K, 5), dout = randn(N * H, 6);
  std::vector<int32_t> idx(N * K);
  for (int64_t t = 0; t < N; ++t) idx[t * K] = int32_t(t % E), idx[t * K + 1] = int32_t((t * 3 + 1) % E);
  auto one = make_local_communicator();
  ExpertParallel ep(*one, *one, E);
  std::vector<float> o1(N * H, 0.5f), o2 = o1;
  auto s1 = be->new_moe_state();
  auto s2 = ep.new_state(*be);
  be->experts_forward(o1.data(), *s1, x.data(), idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
  ep.forward(*be, o2.data(), *s2, x.data(), idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I);
  for (int64_t i = 0; i < N * H; ++i) EXPECT_NEAR(o1[i], o2[i], 1e-6 * (1 + std::abs(o1[i])));
  std::vector<float> dx1(N * H, 0.f), dx2 = dx1, dw1(N * K), dw2(N * K);
  std::vector<float> g1(3 * E * I * H, 0.f), g2 = g1;
  float *dg1 = g1.data(), *du1 = dg1 + E * I * H, *dd1 = du1 + E * I * H;
  float *dg2 = g2.data(), *du2 = dg2 + E * I * H, *dd2 = du2 + E * I * H;
  be->experts_backward(dx1.data(), dw1.data(), dg1, du1, dd1, dout.data(), *s1, x.data(), idx.data(), w.data(),
                       Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
  ep.backward(*be, dx2.data(), dw2.data(), dg2, du2, dd2, dout.data(), *s2, Wg.data(), Wu.data(), Wd.data(), N, K, H,
              I);
  for (int64_t i = 0; i < N * H; ++i) EXPECT_NEAR(dx1[i], dx2[i], 1e-5 * (1 + std::abs(dx1[i])));
  for (int64_t i = 0; i < N * K; ++i) EXPECT_NEAR(dw1[i], dw2[i], 1e-5 * (1 + std::abs(dw1[i])));
  for (size_t i = 0; i < g1.size(); ++i) EXPECT_NEAR(g1[i], g2[i], 1e-5 * (1 + std::abs(g1[i])));
}

TEST(DistLocal, LayoutValidation) {
  ModelConfig c = tiny_moe();
  auto world = make_local_communicator();
  EXPECT_THROW(make_parallel(*world, 2, 0, c), InputError);  // ep 2 on one rank
  EXPECT_THROW(make_parallel(*world, 1, 2, c), InputError);
  EXPECT_NO_THROW(make_parallel(*world, 1, 1, c));
  EXPECT_NO_THROW(check_same_on_all_ranks(*world, "anything", "options"));
}
