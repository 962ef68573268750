// Each op of the CUDA backend against the CPU backend on fresh random inputs: ||gpu - cpu|| / ||cpu||.
// Inputs are rounded to bf16 first so both backends compute on identical values; the GPU keeps bf16
// activations (fp32 accumulation), so single ops land near 1e-3 and chains of a few ops under 1e-2.
// Every test skips when no CUDA device is present (CI has none).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>

#include "core/rng.h"
#include "model/config.h"
#include "ops/backend.h"
#include "cuda_test_helpers.h"

using namespace dsv3;
using namespace dsv3::test;

namespace {

Tensor dev_alloc(DType dt, Shape s, const char* name = "y") { return gpu().alloc(dt, std::move(s), name); }

TEST(CudaOps, Linear) {
  REQUIRE_CUDA();
  struct S { int64_t M, N, K; };
  uint64_t seed = 10;
  for (S s : {S{1, 300, 128}, S{3, 2048, 2048}, S{16, 1000, 512}, S{9, 256, 64}, S{17, 130, 256}, S{300, 96, 64},
              S{4, 50, 36}})
    for (DType wt : {DType::BF16, DType::F32})
      for (DType yt : {DType::BF16, DType::F32}) {
        Tensor x = rnd({s.M, s.K}, 1.0, ++seed), w = rnd({s.N, s.K}, 0.05, ++seed, "w");
        Tensor y = Tensor::empty(DType::F32, {s.M, s.N});
        cpu().linear(y, x, w);
        Tensor xd = dev(x), wd = dev(w, wt), yd = dev_alloc(yt, {s.M, s.N});
        gpu().linear(yd, xd, wd);
        EXPECT_LE(err(gpu(), yd, y), yt == DType::BF16 ? 6e-3 : 1e-3)
            << "M " << s.M << " N " << s.N << " K " << s.K << " w " << dtype_name(wt) << " y " << dtype_name(yt);
      }
}

TEST(CudaOps, LinearSkinnyOffUsesCublas) {
  REQUIRE_CUDA();
  setenv("DSV3_CUDA_SKINNY", "0", 1);
  auto be = make_cuda_backend(0);
  unsetenv("DSV3_CUDA_SKINNY");
  Tensor x = rnd({2, 256}, 1.0, 1), w = rnd({200, 256}, 0.05, 2);
  Tensor y = Tensor::empty(DType::F32, {2, 200});
  cpu().linear(y, x, w);
  Tensor yd = be->alloc(DType::F32, {2, 200}, "y");
  Tensor xd = be->upload(as_dtype(x, DType::BF16)), wd = be->upload(as_dtype(w, DType::BF16));
  be->linear(yd, xd, wd);
  EXPECT_LE(err(*be, yd, y), 1e-3);
}

TEST(CudaOps, RmsNormStridedAndInPlace) {
  REQUIRE_CUDA();
  for (int64_t D : {2048, 100, 64})
    for (DType wt : {DType::BF16, DType::F32}) {
      const int64_t T = 7, stride = D + 16;
      Tensor x = rnd({T, stride}, 2.0, 3), w = rnd({D}, 1.0, 4, "w");
      Tensor y = Tensor::empty(DType::F32, {T, D});
      cpu().rmsnorm(y, x, w, 1e-6f, stride);
      Tensor xd = dev(x), wd = dev(w, wt), yd = dev_alloc(DType::BF16, {T, D});
      gpu().rmsnorm(yd, xd, wd, 1e-6f, stride);
      EXPECT_LE(err(gpu(), yd, y), 5e-3) << "D " << D;
      // In place, unstrided.
      Tensor x2 = rnd({T, D}, 2.0, 5), y2 = Tensor::empty(DType::F32, {T, D});
      cpu().rmsnorm(y2, x2, w, 1e-6f);
      Tensor x2d = dev(x2);
      gpu().rmsnorm(x2d, x2d, wd, 1e-6f);
      EXPECT_LE(err(gpu(), x2d, y2), 5e-3) << "in place, D " << D;
    }
}

// The residual add is deferred and fused into the norm that reads its result; both outputs must match.
TEST(CudaOps, AddThenRmsNormFused) {
  REQUIRE_CUDA();
  for (int64_t D : {2048, 128, 100}) {
    const int64_t T = 5;
    Tensor x = rnd({T, D}, 1.0, 13), a = rnd({T, D}, 1.0, 14), w = rnd({D}, 1.0, 15, "w");
    Tensor h = Tensor::empty(DType::F32, {T, D});
    Tensor xd = dev(x), ad = dev(a), wd = dev(w), hd = dev_alloc(DType::BF16, {T, D});
    cpu().add(x, x, a);
    cpu().rmsnorm(h, x, w, 1e-6f);
    gpu().add(xd, xd, ad);
    gpu().rmsnorm(hd, xd, wd, 1e-6f);
    EXPECT_LE(err(gpu(), hd, h), 5e-3) << "D " << D;
    EXPECT_LE(err(gpu(), xd, x), 5e-3) << "D " << D;
  }
}

TEST(CudaOps, AddSiluMulCopies) {
  REQUIRE_CUDA();
  for (int64_t n : {4096, 1001}) {
    Tensor a = rnd({n}, 1.0, 6), b = rnd({n}, 1.0, 7), y = Tensor::empty(DType::F32, {n});
    Tensor ad = dev(a), bd = dev(b), yd = dev_alloc(DType::BF16, {n});
    cpu().add(y, a, b);
    gpu().add(yd, ad, bd);
    EXPECT_LE(err(gpu(), yd, y), 5e-3);
    cpu().silu_mul(y, a, b);
    gpu().silu_mul(yd, ad, bd);
    EXPECT_LE(err(gpu(), yd, y), 5e-3);
  }
  const int64_t T = 5, C = 40;
  Tensor x = rnd({T, C}, 1.0, 8), xd = dev(x);
  Tensor c = Tensor::empty(DType::F32, {T, 16}), cd = dev_alloc(DType::BF16, {T, 16});
  cpu().copy_cols(c, x, 24);
  gpu().copy_cols(cd, xd, 24);
  EXPECT_EQ(err(gpu(), cd, c), 0.0);
  Tensor cat = Tensor::empty(DType::F32, {T, C + 16}), catd = dev_alloc(DType::BF16, {T, C + 16});
  cpu().concat_cols(cat, x, c);
  gpu().concat_cols(catd, xd, cd);
  EXPECT_EQ(err(gpu(), catd, cat), 0.0);
  std::vector<int64_t> rows = {4, 0, 2, 2};
  Tensor g = Tensor::empty(DType::F32, {4, C}), gd = dev_alloc(DType::BF16, {4, C});
  cpu().gather_rows(g, x, rows);
  gpu().gather_rows(gd, xd, rows);
  EXPECT_EQ(err(gpu(), gd, g), 0.0);
  Tensor z = dev(x);
  gpu().zero(z);
  Tensor zh = gpu().to_host(z);
  EXPECT_EQ(*std::max_element(zh.f32(), zh.f32() + zh.numel()), 0.f);
}

TEST(CudaOps, Embedding) {
  REQUIRE_CUDA();
  for (DType tt : {DType::BF16, DType::F32}) {
    Tensor table = rnd({50, 96}, 1.0, 9, "embed");
    std::vector<int32_t> ids = {3, 49, 0, 3, 17};
    Tensor y = Tensor::empty(DType::F32, {5, 96}), yd = dev_alloc(DType::BF16, {5, 96});
    cpu().embedding(y, table, ids);
    Tensor td = dev(table, tt);
    gpu().embedding(yd, td, ids);
    EXPECT_EQ(err(gpu(), yd, y), 0.0);
  }
}

TEST(CudaOps, Rope) {
  REQUIRE_CUDA();
  ModelConfig cfg;
  cfg.qk_rope_head_dim = 64;
  cfg.rope_theta = 10000;
  Tensor cs, sn;
  make_rope_tables(cfg, 512, &cs, &sn);
  Tensor csd = gpu().upload(cs), snd = gpu().upload(sn);
  for (bool inter : {true, false}) {
    const int64_t T = 9, n = 3, stride = 96, off = 32;
    std::vector<int32_t> pos = {0, 1, 2, 100, 511, 7, 8, 300, 3};
    Tensor x = rnd({T, n * stride}, 1.0, 11), xd = dev(x);
    cpu().rope(x, n, stride, off, pos, cs, sn, inter);
    gpu().rope(xd, n, stride, off, pos, csd, snd, inter);
    EXPECT_LE(err(gpu(), xd, x), 5e-3) << "interleave " << inter;
  }
}

// A pool written through kv_write on both backends, with scattered block tables.
struct Pools {
  KvPoolSpec spec;
  Tensor cpu_pool, gpu_pool;
  std::vector<std::vector<int32_t>> tables;
  std::vector<int64_t> lens;
};
Pools make_pools(int64_t r, int64_t dr, const std::vector<int64_t>& lens, int64_t layer, uint64_t seed) {
  Pools p;
  p.spec.layers = 2;
  p.spec.block_size = 16;
  p.spec.kv_lora_rank = r;
  p.spec.rope_dim = dr;
  int64_t blocks = 0;
  for (auto n : lens) blocks += (n + 15) / 16;
  p.spec.num_blocks = blocks + 3;
  p.cpu_pool = cpu().alloc_kv_pool(p.spec);
  p.gpu_pool = gpu().alloc_kv_pool(p.spec);
  std::vector<int32_t> perm(size_t(p.spec.num_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  Rng rng(seed);
  for (size_t i = perm.size() - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(i + 1)]);
  size_t next = 0;
  p.lens = lens;
  std::vector<SeqSlice> seqs;
  int64_t rows = 0;
  for (auto n : lens) {
    std::vector<int32_t> t;
    for (int64_t b = 0; b < (n + 15) / 16; ++b) t.push_back(perm[next++]);
    p.tables.push_back(t);
    rows += n;
  }
  for (size_t i = 0, row0 = 0; i < lens.size(); ++i) {
    SeqSlice s;
    s.row0 = int64_t(row0);
    s.len = lens[i];
    s.pos0 = 0;
    s.blocks = p.tables[i].data();
    s.num_blocks = int64_t(p.tables[i].size());
    seqs.push_back(s);
    row0 += size_t(lens[i]);
  }
  Tensor c = rnd({rows, r}, 1.0, seed + 1), kpe = rnd({rows, dr}, 1.0, seed + 2);
  cpu().kv_write(p.cpu_pool, p.spec, layer, seqs, c, kpe);
  Tensor cd = dev(c), kd = dev(kpe);
  gpu().kv_write(p.gpu_pool, p.spec, layer, seqs, cd, kd);
  return p;
}

TEST(CudaOps, KvWriteGather) {
  REQUIRE_CUDA();
  Pools p = make_pools(64, 16, {5, 40}, 1, 12);
  SeqSlice s;
  s.blocks = p.tables[1].data();
  s.num_blocks = int64_t(p.tables[1].size());
  const int64_t n = 37;
  Tensor c = Tensor::empty(DType::F32, {n, 64}), k = Tensor::empty(DType::F32, {n, 16});
  Tensor cd = dev_alloc(DType::BF16, {n, 64}), kd = dev_alloc(DType::BF16, {n, 16});
  cpu().kv_gather(c, k, p.cpu_pool, p.spec, 1, s, n);
  gpu().kv_gather(cd, kd, p.gpu_pool, p.spec, 1, s, n);
  EXPECT_EQ(err(gpu(), cd, c), 0.0);
  EXPECT_EQ(err(gpu(), kd, k), 0.0);
}

TEST(CudaOps, MlaPrefillAttention) {
  REQUIRE_CUDA();
  struct S { int64_t nh, dn, dr, dv, len, pos0; };
  uint64_t seed = 20;
  for (S s : {S{16, 128, 64, 128, 150, 70}, S{4, 32, 16, 32, 65, 0}, S{4, 32, 16, 32, 6, 3}, S{4, 32, 16, 32, 70, 100},
              S{2, 64, 32, 64, 1, 33}, S{3, 24, 8, 16, 20, 5}}) {
    const int64_t n = s.pos0 + s.len;
    const float scale = 1.f / std::sqrt(float(s.dn + s.dr));
    Tensor q = rnd({s.len, s.nh * (s.dn + s.dr)}, 1.0, ++seed), kv = rnd({n, s.nh * (s.dn + s.dv)}, 1.0, ++seed),
           kpe = rnd({n, s.dr}, 1.0, ++seed);
    Tensor o = Tensor::empty(DType::F32, {s.len, s.nh * s.dv});
    cpu().mla_attention(o, q, kv, kpe, s.pos0, s.nh, s.dn, s.dr, s.dv, scale);
    Tensor od = dev_alloc(DType::BF16, {s.len, s.nh * s.dv});
    Tensor qd = dev(q), kvd = dev(kv), kd = dev(kpe);
    gpu().mla_attention(od, qd, kvd, kd, s.pos0, s.nh, s.dn, s.dr, s.dv, scale);
    EXPECT_LE(err(gpu(), od, o), 1e-2) << "nh " << s.nh << " dn " << s.dn << " len " << s.len << " pos0 " << s.pos0;
  }
}

TEST(CudaOps, MlaDecode) {
  REQUIRE_CUDA();
  struct S { int64_t nh, r, dr; std::vector<int64_t> lens; };
  uint64_t seed = 30;
  // 4100 keys: many 32-key tiles per split and a partial last tile; 128 heads: eight head groups (DeepSeek-V3);
  // one sequence of 5000 keys: more than 128 splits for the merge kernel; 128 heads and eight long sequences: the
  // deep (five-stage) pipeline of long splits.
  const std::vector<int64_t> mixed = {1, 37, 300, 4100}, eight = {4100, 3000, 4096, 1, 2500, 4100, 77, 4000};
  for (const S& s : {S{16, 512, 64, mixed}, S{4, 64, 16, mixed}, S{20, 128, 16, mixed}, S{2, 48, 16, mixed},
                     S{128, 512, 64, mixed}, S{16, 256, 32, mixed}, S{16, 512, 64, {5000}}, S{16, 512, 64, eight},
                     S{16, 256, 32, eight}}) {
    const std::vector<int64_t>& lens = s.lens;
    Pools p = make_pools(s.r, s.dr, lens, 1, ++seed);
    const int64_t B = int64_t(lens.size());
    std::vector<SeqSlice> seqs;
    for (int64_t b = 0; b < B; ++b) {
      SeqSlice q;
      q.row0 = b;
      q.len = 1;
      q.pos0 = lens[size_t(b)] - 1;
      q.blocks = p.tables[size_t(b)].data();
      q.num_blocks = int64_t(p.tables[size_t(b)].size());
      seqs.push_back(q);
    }
    Tensor ql = rnd({B, s.nh, s.r}, 0.3, ++seed), qp = rnd({B, s.nh, s.dr}, 0.3, ++seed);
    Tensor o = Tensor::empty(DType::F32, {B, s.nh, s.r}), od = dev_alloc(DType::BF16, {B, s.nh, s.r});
    const float scale = 0.1f;
    cpu().mla_decode(o, ql, qp, p.cpu_pool, p.spec, 1, seqs, scale);
    Tensor qld = dev(ql), qpd = dev(qp);
    gpu().mla_decode(od, qld, qpd, p.gpu_pool, p.spec, 1, seqs, scale);
    EXPECT_LE(err(gpu(), od, o), 1e-2) << "nh " << s.nh << " r " << s.r;
  }
}

TEST(CudaOps, MlaAbsorb) {
  REQUIRE_CUDA();
  const int64_t nh = 16, dn = 128, dr = 64, dv = 128, r = 512;
  uint64_t seed = 40;
  for (int64_t B : {1, 5, 12, 40})
    for (DType wt : {DType::BF16, DType::F32}) {
      Tensor kvb = rnd({nh * (dn + dv), r}, 0.05, ++seed, "kv_b");
      Tensor q = rnd({B, nh, dn + dr}, 1.0, ++seed), ql = Tensor::empty(DType::F32, {B, nh, r});
      cpu().mla_absorb_q(ql, q, kvb, nh, dn, dr, dv);
      Tensor kvbd = dev(kvb, wt), qd = dev(q), qld = dev_alloc(DType::BF16, {B, nh, r});
      gpu().mla_absorb_q(qld, qd, kvbd, nh, dn, dr, dv);
      EXPECT_LE(err(gpu(), qld, ql), 6e-3) << "absorb_q B " << B;
      Tensor ol = rnd({B, nh, r}, 1.0, ++seed), out = Tensor::empty(DType::F32, {B, nh * dv});
      cpu().mla_absorb_out(out, ol, kvb, nh, dn, dv);
      Tensor old = dev(ol), outd = dev_alloc(DType::BF16, {B, nh * dv});
      gpu().mla_absorb_out(outd, old, kvbd, nh, dn, dv);
      EXPECT_LE(err(gpu(), outd, out), 6e-3) << "absorb_out B " << B;
    }
}

TEST(CudaOps, MoeRoute) {
  REQUIRE_CUDA();
  struct S { int64_t E, K, G, TG; bool sigmoid, group, noaux, norm; };
  uint64_t seed = 50;
  for (S s : {S{64, 6, 8, 3, true, true, true, true}, S{16, 4, 1, 1, true, false, true, false},
              S{32, 4, 1, 1, false, false, false, true}, S{32, 3, 4, 2, false, true, false, false}}) {
    const int64_t T = 50;
    RouteParams p;
    p.n_experts = s.E;
    p.top_k = s.K;
    p.n_group = s.G;
    p.topk_group = s.TG;
    p.sigmoid = s.sigmoid;
    p.group_limited = s.group;
    p.noaux_bias = s.noaux;
    p.norm_topk_prob = s.norm;
    p.scaling = 2.5;
    Tensor lg = rnd({T, s.E}, 2.0, ++seed), bias = rnd({s.E}, 0.1, ++seed, "bias");
    Tensor idx = Tensor::empty(DType::I32, {T, s.K}), w = Tensor::empty(DType::F32, {T, s.K});
    cpu().moe_route(idx, w, lg, s.noaux ? bias : Tensor(), p);
    Tensor lgd = gpu().upload(lg), bd = gpu().upload(bias);
    Tensor idxd = dev_alloc(DType::I32, {T, s.K}), wd = dev_alloc(DType::F32, {T, s.K});
    gpu().moe_route(idxd, wd, lgd, s.noaux ? bd : Tensor(), p);
    Tensor ih = gpu().to_host(idxd);
    int mismatches = 0;
    for (int64_t i = 0; i < T * s.K; ++i) mismatches += ih.ptr<int32_t>()[i] != idx.ptr<int32_t>()[i];
    EXPECT_EQ(mismatches, 0) << "E " << s.E << " sigmoid " << s.sigmoid;
    EXPECT_LE(err(gpu(), wd, w), 1e-5);
  }
}

TEST(CudaOps, MoeExpertsBothPaths) {
  REQUIRE_CUDA();
  const int64_t E = 16, K = 4;
  uint64_t seed = 60;
  for (auto [H, I] : {std::pair<int64_t, int64_t>{256, 128}, {128, 64}})
  for (int64_t T : {1, 5, 40, 100})
    for (DType wt : {DType::BF16, DType::F32}) {
      RouteParams p;
      p.n_experts = E;
      p.top_k = K;
      p.group_limited = false;
      p.scaling = 1.5;
      Tensor lg = rnd({T, E}, 2.0, ++seed);
      Tensor idx = Tensor::empty(DType::I32, {T, K}), w = Tensor::empty(DType::F32, {T, K});
      cpu().moe_route(idx, w, lg, Tensor(), p);
      Tensor x = rnd({T, H}, 1.0, ++seed), gate = rnd({E, I, H}, 0.06, ++seed, "gate"),
             up = rnd({E, I, H}, 0.06, ++seed, "up"), down = rnd({E, H, I}, 0.09, ++seed, "down");
      Tensor out = rnd({T, H}, 1.0, ++seed);
      Tensor outd = dev(out);
      cpu().moe_experts_acc(out, x, idx, w, gate, up, down);
      Tensor xd = dev(x), gd = dev(gate, wt), ud = dev(up, wt), dd = dev(down, wt);
      Tensor idxd = gpu().upload(idx), wdd = gpu().upload(w);
      gpu().moe_experts_acc(outd, xd, idxd, wdd, gd, ud, dd);
      EXPECT_LE(err(gpu(), outd, out), 1e-2) << "T " << T << " H " << H << " " << dtype_name(wt);
    }
}

TEST(CudaOps, FillNormalMatchesCpu) {
  REQUIRE_CUDA();
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor h = Tensor::empty(dt, {1 << 20}, "h");
    cpu().fill_normal(h, 0.5f, 2.f, 77);
    Tensor d = dev_alloc(dt, {1 << 20}, "d");
    gpu().fill_normal(d, 0.5f, 2.f, 77);
    Tensor hf = gpu().to_host(gpu().upload(h));  // both through the same conversion to fp32
    EXPECT_LE(err(gpu(), d, hf), 1e-3);
    double sum = 0, sq = 0;
    for (int64_t i = 0; i < hf.numel(); ++i) sum += hf.f32()[i], sq += double(hf.f32()[i]) * hf.f32()[i];
    const double mean = sum / hf.numel(), sd = std::sqrt(sq / hf.numel() - mean * mean);
    EXPECT_NEAR(mean, 0.5, 0.01);
    EXPECT_NEAR(sd, 2.0, 0.02);
  }
}

}  // namespace
