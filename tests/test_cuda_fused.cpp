// The fused decode ops of the CUDA backend against the CPU backend, which runs the compositions backend.h defines
// them by: linear_swiglu (dual skinny kernel), kv_norm_rope_write (norm + rope + cache write), mla_decode_q
// (absorption + rotated q_pe), moe_route with the dispatch plan in the same kernel, and the MoE combine deferred
// into the residual add + norm that follow it. Inputs are bf16-representable; tolerances as in test_cuda_ops.cpp.
// Every test skips when no CUDA device is present.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "core/rng.h"
#include "model/config.h"
#include "ops/backend.h"
#include "cuda_test_helpers.h"

using namespace dsv3;
using namespace dsv3::test;

namespace {


TEST(CudaFused, LinearSwiglu) {
  REQUIRE_CUDA();
  uint64_t seed = 100;
  // M <= 16: the dual skinny kernel; 17 and 40: cuBLAS twice + silu_mul. (I, H) as the shared experts of infer-m
  // (2 x 1408 = 2816, 2048) and an odd-sized one.
  for (auto [I, H] : {std::pair<int64_t, int64_t>{2816, 2048}, {200, 96}})
    for (int64_t M : {1, 5, 16, 17, 40})
      for (DType wt : {DType::BF16, DType::F32}) {
        Tensor x = rnd({M, H}, 1.0, ++seed), g = rnd({I, H}, 0.03, ++seed, "gate"), u = rnd({I, H}, 0.03, ++seed, "up");
        Tensor y = Tensor::empty(DType::F32, {M, I});
        cpu().linear_swiglu(y, x, g, u);
        Tensor yd = gpu().alloc(DType::BF16, {M, I}, "y");
        Tensor xd = dev(x), gd = dev(g, wt), ud = dev(u, wt);
        gpu().linear_swiglu(yd, xd, gd, ud);
        EXPECT_LE(err(gpu(), yd, y), 1e-2) << "M " << M << " I " << I << " w " << dtype_name(wt);
      }
}

TEST(CudaFused, KvNormRopeWrite) {
  REQUIRE_CUDA();
  ModelConfig cfg;
  cfg.qk_rope_head_dim = 64;
  cfg.rope_theta = 10000;
  Tensor cs, sn;
  make_rope_tables(cfg, 512, &cs, &sn);
  Tensor csd = gpu().upload(cs), snd = gpu().upload(sn);
  KvPoolSpec spec;
  spec.layers = 2;
  spec.num_blocks = 9;
  spec.block_size = 16;
  spec.kv_lora_rank = 512;
  spec.rope_dim = 64;
  uint64_t seed = 200;
  for (bool inter : {true, false})
    for (DType wt : {DType::BF16, DType::F32}) {
      // Two sequences over scattered blocks: a 3-token append at 30..32 (rows 0-2) and a decode token at 100 (row
      // 4); row 3 belongs to no sequence and must not be written.
      const std::vector<int32_t> t0 = {6, 2, 0}, t1 = {1, 8, 3, 5, 7, 4, 6};
      std::vector<SeqSlice> seqs(2);
      seqs[0].row0 = 0, seqs[0].len = 3, seqs[0].pos0 = 30, seqs[0].blocks = t0.data(), seqs[0].num_blocks = 3;
      seqs[1].row0 = 4, seqs[1].len = 1, seqs[1].pos0 = 100, seqs[1].blocks = t1.data(), seqs[1].num_blocks = 7;
      const std::vector<int32_t> pos = {30, 31, 32, 77, 100};
      const int64_t T = 5;
      Tensor kva = rnd({T, spec.row()}, 1.0, ++seed), w = rnd({spec.kv_lora_rank}, 0.5, ++seed, "norm");
      Tensor pc = cpu().alloc_kv_pool(spec), pg = gpu().alloc_kv_pool(spec);
      cpu().kv_norm_rope_write(pc, spec, 1, seqs, kva, w, 1e-6f, pos, cs, sn, inter);
      Tensor kd = dev(kva), wd = dev(w, wt);
      gpu().kv_norm_rope_write(pg, spec, 1, seqs, kd, wd, 1e-6f, pos, csd, snd, inter);
      EXPECT_LE(err(gpu(), pg, pc), 5e-3) << "interleave " << inter << " w " << dtype_name(wt);
    }
}

TEST(CudaFused, MlaDecodeQ) {
  REQUIRE_CUDA();
  ModelConfig cfg;
  cfg.qk_rope_head_dim = 64;
  cfg.rope_theta = 10000;
  Tensor cs, sn;
  make_rope_tables(cfg, 512, &cs, &sn);
  Tensor csd = gpu().upload(cs), snd = gpu().upload(sn);
  const int64_t nh = 16, dn = 128, dr = 64, dv = 128, r = 512;
  uint64_t seed = 300;
  // B <= 8: the absorption kernel writes q_pe too; larger B: cuBLAS + the rope-copy kernel.
  for (int64_t B : {1, 5, 8, 12, 32})
    for (bool inter : {true, false}) {
      Tensor kvb = rnd({nh * (dn + dv), r}, 0.05, ++seed, "kv_b");
      Tensor q = rnd({B, nh, dn + dr}, 1.0, ++seed);
      std::vector<int32_t> pos;
      for (int64_t b = 0; b < B; ++b) pos.push_back(int32_t((b * 37 + 3) % 512));
      Tensor ql = Tensor::empty(DType::F32, {B, nh, r}), qp = Tensor::empty(DType::F32, {B, nh, dr});
      cpu().mla_decode_q(ql, qp, q, kvb, nh, dn, dr, dv, pos, cs, sn, inter);
      Tensor qd = dev(q), kvbd = dev(kvb);
      Tensor qld = gpu().alloc(DType::BF16, {B, nh, r}, "q_lat"), qpd = gpu().alloc(DType::BF16, {B, nh, dr}, "q_pe");
      gpu().mla_decode_q(qld, qpd, qd, kvbd, nh, dn, dr, dv, pos, csd, snd, inter);
      EXPECT_LE(err(gpu(), qld, ql), 6e-3) << "q_lat B " << B;
      EXPECT_LE(err(gpu(), qpd, qp), 5e-3) << "q_pe B " << B << " interleave " << inter;
      EXPECT_EQ(err(gpu(), qd, q), 0.0) << "q modified, B " << B;
    }
}

// Router on the GPU (fused with the plan at T <= 64, separate above), experts, then the residual add and norm that
// take the deferred combine: x, the MoE output and the normed rows all against the CPU.
TEST(CudaFused, MoeRoutePlanCombineAddNorm) {
  REQUIRE_CUDA();
  const int64_t E = 16, K = 4, H = 256, I = 128;
  uint64_t seed = 400;
  for (int64_t T : {1, 5, 40, 64, 65})
    for (bool fuse_norm : {true, false}) {
      RouteParams p;
      p.n_experts = E;
      p.top_k = K;
      p.n_group = 4;
      p.topk_group = 2;
      p.scaling = 1.5;
      Tensor lg = rnd({T, E}, 2.0, ++seed), bias = rnd({E}, 0.1, ++seed, "bias");
      Tensor x = rnd({T, H}, 1.0, ++seed), h = rnd({T, H}, 1.0, ++seed), f = rnd({T, H}, 1.0, ++seed);
      Tensor gate = rnd({E, I, H}, 0.06, ++seed, "gate"), up = rnd({E, I, H}, 0.06, ++seed, "up"),
             down = rnd({E, H, I}, 0.09, ++seed, "down"), nw = rnd({H}, 0.5, ++seed, "norm");
      Tensor idx = Tensor::empty(DType::I32, {T, K}), w = Tensor::empty(DType::F32, {T, K});
      Tensor xc = x.clone(), fc = f.clone(), hn = Tensor::empty(DType::F32, {T, H});
      cpu().moe_route(idx, w, lg, bias, p);
      cpu().moe_experts_acc(fc, h, idx, w, gate, up, down);
      cpu().add(xc, xc, fc);
      if (fuse_norm) cpu().rmsnorm(hn, xc, nw, 1e-6f, 0);

      Tensor lgd = gpu().upload(lg), bd = gpu().upload(bias), xd = dev(x), hd = dev(h), fd = dev(f);
      Tensor gd = dev(gate), ud = dev(up), dd = dev(down), nwd = dev(nw);
      Tensor idxd = gpu().alloc(DType::I32, {T, K}, "idx"), wdd = gpu().alloc(DType::F32, {T, K}, "w");
      Tensor hnd = gpu().alloc(DType::BF16, {T, H}, "hn");
      gpu().moe_route(idxd, wdd, lgd, bd, p);
      gpu().moe_experts_acc(fd, hd, idxd, wdd, gd, ud, dd);
      gpu().add(xd, xd, fd);
      if (fuse_norm) gpu().rmsnorm(hnd, xd, nwd, 1e-6f, 0);  // else to_host flushes combine, then add

      Tensor ih = gpu().to_host(idxd);
      int mismatches = 0;
      for (int64_t i = 0; i < T * K; ++i) mismatches += ih.ptr<int32_t>()[i] != idx.ptr<int32_t>()[i];
      EXPECT_EQ(mismatches, 0) << "T " << T;
      EXPECT_LE(err(gpu(), wdd, w), 1e-5) << "T " << T;
      EXPECT_LE(err(gpu(), fd, fc), 1e-2) << "moe out, T " << T << " fused norm " << fuse_norm;
      EXPECT_LE(err(gpu(), xd, xc), 1e-2) << "x, T " << T << " fused norm " << fuse_norm;
      if (fuse_norm) EXPECT_LE(err(gpu(), hnd, hn), 1e-2) << "normed, T " << T;
    }
}

}  // namespace
