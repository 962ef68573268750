// Each CPU kernel against a naive double-precision version on random data (fresh per case).
// Tolerances: fp32 kernels <= 1e-5 relative to the fp64 reference.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/gemm.h"
#include "test_helpers.h"

using namespace dsv3;

namespace {

std::vector<float> randn(int64_t n, Rng& rng, double s = 1.0) {
  std::vector<float> v(n);
  for (auto& x : v) x = float(rng.normal() * s);
  return v;
}

double rel(const std::vector<float>& a, const std::vector<double>& b) {
  double d = 0, r = 0;
  for (size_t i = 0; i < a.size(); ++i) d += (a[i] - b[i]) * (a[i] - b[i]), r += b[i] * b[i];
  return std::sqrt(d / r);
}

TEST(CpuOps, LinearF32AndBf16AllShapes) {
  Rng rng(1);
  for (int64_t M : {1, 2, 3, 5, 8, 9, 40})
    for (DType wt : {DType::F32, DType::BF16}) {
      const int64_t N = 67, K = 133;  // odd sizes hit every tail loop
      auto x = randn(M * K, rng), wf = randn(N * K, rng);
      std::vector<uint16_t> wb(N * K);
      for (int64_t i = 0; i < N * K; ++i) {
        wb[i] = f32_to_bf16(wf[i]);
        if (wt == DType::BF16) wf[i] = bf16_to_f32(wb[i]);
      }
      std::vector<double> ref(M * N);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k) s += double(x[m * K + k]) * wf[n * K + k];
          ref[m * N + n] = s;
        }
      std::vector<float> y(M * N, NAN);
      const void* w = wt == DType::F32 ? static_cast<const void*>(wf.data()) : wb.data();
      cpu::gemm_xwT(M, N, K, x.data(), K, w, wt, K, y.data(), N);
      EXPECT_LE(rel(y, ref), 1e-5) << "M=" << M << " " << dtype_name(wt);
    }
}

TEST(CpuOps, RmsNormAndRope) {
  Rng rng(2);
  const int64_t T = 5, D = 48;
  auto x = randn(T * D, rng), w = randn(D, rng);
  Tensor wt = Tensor::f32_from(w, {D});
  std::vector<float> y(T * D);
  cpu::rmsnorm(y.data(), x.data(), D, wt, T, D, 1e-6f);
  std::vector<double> ref(T * D);
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += double(x[t * D + i]) * x[t * D + i];
    for (int64_t i = 0; i < D; ++i) ref[t * D + i] = w[i] * x[t * D + i] / std::sqrt(ss / D + 1e-6);
  }
  EXPECT_LE(rel(y, ref), 1e-6);
  // RoPE on interleaved pairs: (a, b) -> (a cos - b sin, b cos + a sin) at angle pos * theta^(-2j/d).
  const int64_t dr = 8, half = 4, n = 3, stride = 11, off = 2;
  auto v = randn(T * n * stride, rng);
  std::vector<float> cs(16 * half), sn(16 * half);
  for (int p = 0; p < 16; ++p)
    for (int j = 0; j < half; ++j) cs[p * half + j] = std::cos(p * std::pow(10000.0, -2.0 * j / dr)), sn[p * half + j] = std::sin(p * std::pow(10000.0, -2.0 * j / dr));
  std::vector<int32_t> pos = {0, 3, 7, 8, 15};
  for (bool inter : {true, false}) {
    auto got = v;
    cpu::rope(got.data(), T, n, stride, off, dr, pos.data(), cs.data(), sn.data(), inter);
    std::vector<double> want(v.begin(), v.end());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < n; ++h)
        for (int64_t j = 0; j < half; ++j) {
          int64_t i0 = inter ? 2 * j : j, i1 = inter ? 2 * j + 1 : j + half;
          double a = v[(t * n + h) * stride + off + i0], b = v[(t * n + h) * stride + off + i1];
          double ang = pos[t] * std::pow(10000.0, -2.0 * j / dr);
          want[(t * n + h) * stride + off + i0] = a * std::cos(ang) - b * std::sin(ang);
          want[(t * n + h) * stride + off + i1] = b * std::cos(ang) + a * std::sin(ang);
        }
    EXPECT_LE(rel(got, want), 1e-6);
  }
}

// Routing on a hand-made case: group-limited selection, bias for selection only, normalized + scaled weights.
TEST(CpuOps, RouteGroupLimitedWithBias) {
  // 8 experts in 4 groups of 2; logits chosen so sigmoid scores are known.
  std::vector<float> s = {0.9f, 0.1f, 0.6f, 0.55f, 0.2f, 0.3f, 0.8f, 0.05f};
  std::vector<float> logits(8);
  for (int i = 0; i < 8; ++i) logits[i] = std::log(s[i] / (1 - s[i]));
  std::vector<float> bias = {0, 0, 0, 0, 0.5f, 0, 0, 0};  // lifts expert 4 (group 2) for selection only
  RouteParams p;
  p.n_experts = 8, p.top_k = 2, p.n_group = 4, p.topk_group = 2, p.scaling = 2.5;
  int32_t idx[2];
  float w[2];
  cpu::moe_route(idx, w, logits.data(), bias.data(), 1, p);
  // Group scores (sum of top-2 biased): g0 1.0, g1 1.15, g2 1.0, g3 0.85 -> groups 1 and (0 or 2 tie: lower index
  // 0). Allowed: experts 0..3; top-2 by biased score: 0 (0.9), 2 (0.6).
  EXPECT_EQ(idx[0], 0);
  EXPECT_EQ(idx[1], 2);
  EXPECT_NEAR(w[0], 2.5 * 0.9 / 1.5, 1e-5);
  EXPECT_NEAR(w[1], 2.5 * 0.6 / 1.5, 1e-5);
  bias[4] = 0.9f;  // now group 2 scores 1.4: groups 2 and 1; expert 4 wins on its biased score
  cpu::moe_route(idx, w, logits.data(), bias.data(), 1, p);
  EXPECT_EQ(idx[0], 4);
  EXPECT_EQ(idx[1], 2);
  EXPECT_NEAR(w[0], 2.5 * 0.2 / 0.8, 1e-5);  // weight from the UNBIASED score
}

// The decode-sized expert path (one parallel pass) and the per-expert GEMM path agree with a naive loop.
TEST(CpuOps, ExpertsBothPathsMatchNaive) {
  Rng rng(3);
  const int64_t E = 6, H = 24, I = 20, K = 2;
  Tensor g = Tensor::f32_from(randn(E * I * H, rng, 0.2), {E, I, H}), u = Tensor::f32_from(randn(E * I * H, rng, 0.2), {E, I, H}),
         d = Tensor::f32_from(randn(E * H * I, rng, 0.2), {E, H, I});
  for (int64_t T : {3, 40}) {  // 3 tokens: decode path; 40: GEMM path
    auto x = randn(T * H, rng);
    std::vector<int32_t> idx(T * K);
    std::vector<float> w(T * K);
    for (int64_t i = 0; i < T * K; ++i) idx[i] = int32_t((i * 7 + i / K) % E), w[i] = float(rng.uniform());
    for (int64_t t = 0; t < T; ++t)
      if (idx[t * K] == idx[t * K + 1]) idx[t * K + 1] = (idx[t * K] + 1) % E;
    std::vector<float> out(T * H, 0.f);
    cpu::moe_experts_acc(out.data(), x.data(), idx.data(), w.data(), T, K, H, g, u, d);
    std::vector<double> ref(T * H, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = idx[t * K + k];
        std::vector<double> a(I);
        for (int64_t i = 0; i < I; ++i) {
          double gs = 0, us = 0;
          for (int64_t h = 0; h < H; ++h) gs += double(g.f32()[(e * I + i) * H + h]) * x[t * H + h], us += double(u.f32()[(e * I + i) * H + h]) * x[t * H + h];
          a[i] = gs / (1 + std::exp(-gs)) * us;
        }
        for (int64_t h = 0; h < H; ++h) {
          double s = 0;
          for (int64_t i = 0; i < I; ++i) s += double(d.f32()[(e * H + h) * I + i]) * a[i];
          ref[t * H + h] += w[t * K + k] * s;
        }
      }
    EXPECT_LE(rel(out, ref), 1e-5) << "T=" << T;
  }
}

// Absorbed decode over the paged cache equals attention with decompressed keys/values.
TEST(CpuOps, AbsorbedDecodeEqualsDecompressedAttention) {
  Rng rng(4);
  const int64_t nh = 3, dn = 8, dr = 4, dv = 6, r = 10, n = 37, bs = 8;
  auto wkvb = randn(nh * (dn + dv) * r, rng, 0.3);
  auto c = randn(n * r, rng), kpe = randn(n * dr, rng), q = randn(nh * (dn + dr), rng);
  // Decompressed reference: k_nope, v per head from c; scores over all n keys (the query is the last position).
  std::vector<double> ref(nh * dv, 0.0);
  for (int64_t h = 0; h < nh; ++h) {
    std::vector<double> sc(n);
    double mx = -1e300;
    for (int64_t t = 0; t < n; ++t) {
      double s = 0;
      for (int64_t i = 0; i < dn; ++i) {
        double k = 0;
        for (int64_t j = 0; j < r; ++j) k += double(wkvb[(h * (dn + dv) + i) * r + j]) * c[t * r + j];
        s += q[h * (dn + dr) + i] * k;
      }
      for (int64_t i = 0; i < dr; ++i) s += double(q[h * (dn + dr) + dn + i]) * kpe[t * dr + i];
      sc[t] = s * 0.3;
      mx = std::max(mx, sc[t]);
    }
    double z = 0;
    for (auto& s : sc) z += (s = std::exp(s - mx));
    for (int64_t i = 0; i < dv; ++i) {
      double o = 0;
      for (int64_t t = 0; t < n; ++t) {
        double v = 0;
        for (int64_t j = 0; j < r; ++j) v += double(wkvb[(h * (dn + dv) + dn + i) * r + j]) * c[t * r + j];
        o += sc[t] / z * v;
      }
      ref[h * dv + i] = o;
    }
  }
  // Absorbed: paged pool with a scrambled block table.
  KvPoolSpec spec;
  spec.layers = 1, spec.num_blocks = 6, spec.block_size = bs, spec.kv_lora_rank = r, spec.rope_dim = dr;
  Tensor pool = Tensor::zeros(DType::F32, {1, 6, bs, r + dr});
  std::vector<int32_t> blocks = {4, 1, 5, 0, 2};
  for (int64_t t = 0; t < n; ++t) {
    float* row = pool.f32() + (blocks[t / bs] * bs + t % bs) * (r + dr);
    for (int64_t j = 0; j < r; ++j) row[j] = c[t * r + j];
    for (int64_t j = 0; j < dr; ++j) row[r + j] = kpe[t * dr + j];
  }
  auto be = make_cpu_backend();
  Tensor qt = Tensor::f32_from(q, {1, nh, dn + dr}), kvb = Tensor::f32_from(wkvb, {nh * (dn + dv), r});
  Tensor q_lat = Tensor::empty(DType::F32, {1, nh, r}), q_pe = Tensor::empty(DType::F32, {nh, dr});
  be->mla_absorb_q(q_lat, qt, kvb, nh, dn, dr, dv);
  be->copy_cols(q_pe, qt.reshape({nh, dn + dr}), dn);
  Tensor o_lat = Tensor::empty(DType::F32, {1, nh, r}), out = Tensor::empty(DType::F32, {1, nh * dv});
  SeqSlice s;
  s.pos0 = n - 1, s.len = 1, s.blocks = blocks.data(), s.num_blocks = int64_t(blocks.size());
  be->mla_decode(o_lat, q_lat, q_pe.reshape({1, nh, dr}), pool, spec, 0, {s}, 0.3f);
  be->mla_absorb_out(out, o_lat, kvb, nh, dn, dv);
  std::vector<float> got(out.f32(), out.f32() + nh * dv);
  EXPECT_LE(rel(got, ref), 1e-5);
}

}  // namespace
