// Every op of the CUDA training backend against the CPU reference kernels (ops/cpu/train_ops.h, float) on random
// inputs of awkward sizes: ||gpu - cpu|| / ||cpu|| per output. Two backends are made: one with fp32 products
// (DSV3_CUDA_TRAIN_F32=1, tolerance ~1e-5) and the default one with bf16 tensor-core products (forward 2e-2,
// gradients 5e-2). Ops without products run the same kernels in both modes and are checked tightly.
// Every test skips when no CUDA device is present.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/weights.h"
#include "ops/backend.h"
#include "ops/cpu/blas.h"
#include "ops/cpu/train_ops.h"
#include "ops/train_backend.h"
#include "train_buf_helpers.h"
#include "cuda_test_helpers.h"
#include "test_helpers.h"
#include "train/optimizer.h"

using namespace dsv3;
using V = std::vector<float>;
using I32 = std::vector<int32_t>;

namespace {

// f32 = true: DSV3_CUDA_TRAIN_F32=1 while the backend is made (the switch is read then).
TrainBackend& gpu(bool f32) {
  static std::unique_ptr<TrainBackend> be[2];
  if (!be[f32]) {
    const char* old = std::getenv("DSV3_CUDA_TRAIN_F32");
    const std::string keep = old ? old : "";
    setenv("DSV3_CUDA_TRAIN_F32", f32 ? "1" : "0", 1);
    be[f32] = make_cuda_train_backend(0);
    if (old)
      setenv("DSV3_CUDA_TRAIN_F32", keep.c_str(), 1);
    else
      unsetenv("DSV3_CUDA_TRAIN_F32");
  }
  return *be[f32];
}

V randn(size_t n, uint64_t seed, double scale = 1.0) {
  Rng r(seed);
  V v(n);
  for (auto& x : v) x = float(r.normal() * scale);
  return v;
}

using test::down;
using test::up;

double check(const char* what, const V& got, const V& ref, double tol) {
  EXPECT_EQ(got.size(), ref.size()) << what;
  for (float g : got)
    if (!std::isfinite(g)) {
      ADD_FAILURE() << what << ": non-finite value";
      return INFINITY;
    }
  const double e = test::rel_err(got.data(), ref.data(), int64_t(ref.size()));
  std::printf("[ cuda-train ] %-40s rel err %.3g (tol %.1g)\n", what, e, tol);
  EXPECT_LE(e, tol) << what;
  return e;
}

constexpr double kTight = 1e-5;

TEST(CudaTrain, MemoryCopiesAndFills) {
  REQUIRE_CUDA();
  TrainBackend& be = gpu(true);
  EXPECT_FALSE(be.is_host());
  EXPECT_EQ(be.name().rfind("cuda:0", 0), 0u);
  const int64_t rows = 7, cols = 13, ss = 17, ds = 19;
  V src = randn(rows * ss, 1), dst = randn(rows * ds, 2);
  auto s = up(be, src), d = up(be, dst);
  EXPECT_EQ(down(be, s), src);  // upload/download round trip is exact
  for (bool acc : {false, true}) {
    V ref = dst;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) ref[r * ds + c] = acc ? ref[r * ds + c] + src[r * ss + c] : src[r * ss + c];
    auto d2 = up(be, dst);
    be.copy_2d(d2.data(), ds, s.data(), ss, rows, cols, acc);
    check(acc ? "copy_2d +=" : "copy_2d =", down(be, d2), ref, 0);
  }
  // add / copy / fill over the first src.size() elements of d (d is larger).
  const size_t n = src.size();
  V ref = dst;
  for (size_t i = 0; i < n; ++i) ref[i] += src[i];
  be.add(d.data(), s.data(), int64_t(n));
  check("add", down(be, d), ref, 0);
  be.copy(d.data(), s.data(), int64_t(n));
  V got = down(be, d);
  EXPECT_EQ(V(got.begin(), got.begin() + n), src);
  be.fill(d.data(), 2.5f, 101);
  got = down(be, d);
  for (int64_t i = 0; i < 101; ++i) ASSERT_EQ(got[i], 2.5f);
  EXPECT_EQ(got[101], src[101]);
}

TEST(CudaTrain, GemmAllTransposes) {
  REQUIRE_CUDA();
  for (bool f32 : {true, false}) {
    TrainBackend& be = gpu(f32);
    const int64_t M = 37, N = 29, K = 531;
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 5;
      V A = randn((ta ? K : M) * lda, 10 + t), B = randn((tb ? N : K) * ldb, 20 + t), C = randn(M * ldc, 30 + t);
      V ref = C;
      cpu::gemm(ta, tb, M, N, K, 0.7f, A.data(), lda, B.data(), ldb, 0.3f, ref.data(), ldc);
      auto a = up(be, A), b = up(be, B), c = up(be, C);
      be.gemm(ta, tb, M, N, K, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, c.data(), ldc);
      const std::string what = std::string("gemm ") + (ta ? "T" : "N") + (tb ? "T" : "N") + (f32 ? " f32" : " bf16");
      check(what.c_str(), down(be, c), ref, f32 ? kTight : 2e-2);
    }
    // linear_forward / linear_backward (dx accumulated, dW accumulated)
    const int64_t M2 = 45, N2 = 33, K2 = 70;
    V x = randn(M2 * K2, 40), W = randn(N2 * K2, 41), dy = randn(M2 * N2, 42), dx0 = randn(M2 * K2, 43),
      dW0 = randn(N2 * K2, 44);
    V y(M2 * N2), dx = dx0, dW = dW0;
    cpu::linear_forward(y.data(), x.data(), W.data(), M2, N2, K2);
    cpu::linear_backward(dx.data(), true, dW.data(), dy.data(), x.data(), W.data(), M2, N2, K2);
    auto gx = up(be, x), gW = up(be, W), gdy = up(be, dy), gdx = up(be, dx0), gdW = up(be, dW0), gy = up(be, V(M2 * N2));
    be.linear_forward(gy.data(), gx.data(), gW.data(), M2, N2, K2);
    be.linear_backward(gdx.data(), true, gdW.data(), gdy.data(), gx.data(), gW.data(), M2, N2, K2);
    check(f32 ? "linear y f32" : "linear y bf16", down(be, gy), y, f32 ? kTight : 2e-2);
    check(f32 ? "linear dx+= f32" : "linear dx+= bf16", down(be, gdx), dx, f32 ? kTight : 2e-2);
    check(f32 ? "linear dW+= f32" : "linear dW+= bf16", down(be, gdW), dW, f32 ? kTight : 2e-2);
  }
}

TEST(CudaTrain, RmsNormStridedAccumulating) {
  REQUIRE_CUDA();
  TrainBackend& be = gpu(false);
  for (int64_t N : {1, 131}) {
    const int64_t D = 97, xs = D + 5, dxs = D + 3;
    V x = randn(N * xs, 50), w = randn(D, 51), dout = randn(N * D, 52), dx0 = randn(N * dxs, 53), dw0 = randn(D, 54);
    V out(N * D), rstd(N), dx = dx0, dw = dw0;
    cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), xs, w.data(), N, D, 1e-6);
    cpu::rmsnorm_backward(dx.data(), dxs, dw.data(), dout.data(), x.data(), xs, rstd.data(), w.data(), N, D);
    auto gx = up(be, x), gw = up(be, w), gd = up(be, dout), gdx = up(be, dx0), gdw = up(be, dw0);
    auto go = up(be, V(N * D)), gr = up(be, V(N));
    be.rmsnorm_forward(go.data(), gr.data(), gx.data(), xs, gw.data(), N, D, 1e-6);
    be.rmsnorm_backward(gdx.data(), dxs, gdw.data(), gd.data(), gx.data(), xs, gr.data(), gw.data(), N, D);
    check("rmsnorm out", down(be, go), out, kTight);
    check("rmsnorm rstd", down(be, gr), rstd, kTight);
    check("rmsnorm dx +=", down(be, gdx), dx, kTight);
    check("rmsnorm dw +=", down(be, gdw), dw, kTight);
  }
}

TEST(CudaTrain, RopeBothLayouts) {
  REQUIRE_CUDA();
  TrainBackend& be = gpu(false);
  const int64_t N = 13, n = 3, stride = 40, off = 8, dr = 16, maxp = 20;
  V cs(maxp * dr / 2), sn(maxp * dr / 2);
  for (int64_t p = 0; p < maxp; ++p)
    for (int64_t j = 0; j < dr / 2; ++j) {
      const double a = p * std::pow(10000.0, -2.0 * j / dr);
      cs[p * dr / 2 + j] = float(std::cos(a)), sn[p * dr / 2 + j] = float(std::sin(a));
    }
  I32 pos(N);
  for (int64_t t = 0; t < N; ++t) pos[t] = int32_t((t * 7 + 3) % maxp);
  auto gc = up(be, cs), gs = up(be, sn);
  auto gp = up(be, pos);
  for (bool inter : {false, true}) {
    V x = randn(N * n * stride, 60 + inter), fwd = x, bwd = x;
    cpu::rope_forward(fwd.data(), N, n, stride, off, dr, pos.data(), cs.data(), sn.data(), inter);
    cpu::rope_backward(bwd.data(), N, n, stride, off, dr, pos.data(), cs.data(), sn.data(), inter);
    auto g1 = up(be, x), g2 = up(be, x);
    be.rope_forward(g1.data(), N, n, stride, off, dr, gp.data(), gc.data(), gs.data(), inter);
    be.rope_backward(g2.data(), N, n, stride, off, dr, gp.data(), gc.data(), gs.data(), inter);
    check(inter ? "rope fwd interleaved" : "rope fwd halves", down(be, g1), fwd, kTight);
    check(inter ? "rope bwd interleaved" : "rope bwd halves", down(be, g2), bwd, kTight);
  }
}

TEST(CudaTrain, SwigluAndEmbedding) {
  REQUIRE_CUDA();
  TrainBackend& be = gpu(false);
  const int64_t n = 1001;
  V g = randn(n, 70, 2.0), u = randn(n, 71), d = randn(n, 72), out(n), dg(n), du(n);
  cpu::swiglu_forward(out.data(), g.data(), u.data(), n);
  cpu::swiglu_backward(dg.data(), du.data(), d.data(), g.data(), u.data(), n);
  auto gg = up(be, g), gu = up(be, u), gd = up(be, d), go = up(be, V(n)), gdg = up(be, V(n)), gdu = up(be, V(n));
  be.swiglu_forward(go.data(), gg.data(), gu.data(), n);
  be.swiglu_backward(gdg.data(), gdu.data(), gd.data(), gg.data(), gu.data(), n);
  check("swiglu out", down(be, go), out, kTight);
  check("swiglu dg", down(be, gdg), dg, kTight);
  check("swiglu du", down(be, gdu), du, kTight);

  const int64_t Vv = 50, H = 37, N = 200;
  V table = randn(Vv * H, 73), dout = randn(N * H, 74), dt0 = randn(Vv * H, 75);
  I32 ids(N);
  Rng r(76);
  for (auto& i : ids) i = int32_t(r.below(Vv / 2) * 2);  // repeated ids, odd rows never hit
  V e(N * H), dt = dt0;
  cpu::embedding_forward(e.data(), table.data(), ids.data(), N, H);
  cpu::embedding_backward(dt.data(), dout.data(), ids.data(), N, H);
  auto gt = up(be, table), gdo = up(be, dout), gdt = up(be, dt0), ge = up(be, V(N * H));
  auto gi = up(be, ids);
  be.embedding_forward(ge.data(), gt.data(), gi.data(), N, H);
  be.embedding_backward(gdt.data(), gdo.data(), gi.data(), N, H);
  check("embedding fwd", down(be, ge), e, 0);
  check("embedding bwd +=", down(be, gdt), dt, 1e-6);
}

TEST(CudaTrain, CrossEntropyAliasedAndMasked) {
  REQUIRE_CUDA();
  TrainBackend& be = gpu(false);
  struct S { int64_t N, V; };
  for (S s : {S{37, 1031}, S{5, 32768}}) {
    V z = randn(s.N * s.V, 80 + s.V, 3.0);
    I32 y(s.N);
    Rng r(81);
    for (int64_t t = 0; t < s.N; ++t) {
      y[t] = t % 7 == 3 ? -1 : int32_t(r.below(s.V));
      if (t % 3 == 0 && y[t] >= 0) z[t * s.V + y[t]] = 20.f;  // some rows predict their target
    }
    const double scale = 1.0 / 30;
    V dz(z.size());
    int64_t c_ref = -1, c1 = -1, c2 = -1;
    const double l_ref = cpu::cross_entropy_forward_backward(dz.data(), z.data(), y.data(), s.N, s.V, scale, &c_ref);
    auto gz = up(be, z), gdz = up(be, V(z.size()));
    auto gy = up(be, y);
    const double l1 = be.cross_entropy_forward_backward(gdz.data(), gz.data(), gy.data(), s.N, s.V, scale, &c1);
    const double l2 = be.cross_entropy_forward_backward(gz.data(), gz.data(), gy.data(), s.N, s.V, scale, &c2);
    std::printf("[ cuda-train ] cross-entropy N %ld V %ld loss %.9g cpu %.9g correct %ld\n", long(s.N), long(s.V), l1,
                l_ref, long(c1));
    EXPECT_NEAR(l1, l_ref, 1e-6 * std::abs(l_ref));
    EXPECT_NEAR(l2, l_ref, 1e-6 * std::abs(l_ref));
    EXPECT_EQ(c1, c_ref);
    EXPECT_EQ(c2, c_ref);
    EXPECT_GT(c_ref, 0);
    check("cross-entropy dlogits", down(be, gdz), dz, kTight);
    check("cross-entropy dlogits (aliased)", down(be, gz), dz, kTight);
  }
}

// Sets DSV3_CUDA_TRAIN_ATTN (read by the CUDA backend on every attention call) for one scope; null unsets it.
struct AttnMode {
  std::string keep;
  bool had;
  explicit AttnMode(const char* v) {
    const char* old = std::getenv("DSV3_CUDA_TRAIN_ATTN");
    had = old != nullptr;
    if (had) keep = old;
    if (v)
      setenv("DSV3_CUDA_TRAIN_ATTN", v, 1);
    else
      unsetenv("DSV3_CUDA_TRAIN_ATTN");
  }
  ~AttnMode() {
    if (had)
      setenv("DSV3_CUDA_TRAIN_ATTN", keep.c_str(), 1);
    else
      unsetenv("DSV3_CUDA_TRAIN_ATTN");
  }
};

// naive = true: the materialized path (DSV3_CUDA_TRAIN_ATTN=naive); else the default, which is the fused flash
// kernels for their head dims (64/32/64, 32/16/32) in bf16 mode, and the materialized path otherwise.
void attention_case(bool f32, int64_t B, int64_t T, int64_t nh, int64_t dn, int64_t dr, int64_t dv, uint64_t seed,
                    bool naive = false) {
  TrainBackend& be = gpu(f32);
  AttnMode mode(naive ? "naive" : nullptr);
  const double scale = 1.0 / std::sqrt(double(dn + dr));
  V q = randn(B * T * nh * (dn + dr), seed), kv = randn(B * T * nh * (dn + dv), seed + 1),
    kpe = randn(B * T * dr, seed + 2), dout = randn(B * T * nh * dv, seed + 3);
  V out(B * T * nh * dv), lse(B * nh * T), dq(q.size()), dkv(kv.size()), dkpe(kpe.size());
  cpu::attention_forward(out.data(), lse.data(), q.data(), kv.data(), kpe.data(), B, T, nh, dn, dr, dv, scale);
  cpu::attention_backward(dq.data(), dkv.data(), dkpe.data(), dout.data(), out.data(), lse.data(), q.data(),
                          kv.data(), kpe.data(), B, T, nh, dn, dr, dv, scale);
  auto gq = up(be, q), gkv = up(be, kv), gkpe = up(be, kpe), gdo = up(be, dout);
  auto go = up(be, V(out.size())), gl = up(be, V(lse.size()));
  // Gradient outputs start as garbage: the backward must overwrite them.
  auto gdq = up(be, randn(q.size(), 9)), gdkv = up(be, randn(kv.size(), 9)), gdkpe = up(be, randn(kpe.size(), 9));
  be.attention_forward(go.data(), gl.data(), gq.data(), gkv.data(), gkpe.data(), B, T, nh, dn, dr, dv, scale);
  be.attention_backward(gdq.data(), gdkv.data(), gdkpe.data(), gdo.data(), go.data(), gl.data(), gq.data(),
                        gkv.data(), gkpe.data(), B, T, nh, dn, dr, dv, scale);
  const std::string tag = " B" + std::to_string(B) + " T" + std::to_string(T) + " h" + std::to_string(nh) + " " +
                          std::to_string(dn) + "/" + std::to_string(dr) + "/" + std::to_string(dv) +
                          (f32 ? " f32" : " bf16") + (naive ? " naive" : "");
  const double tf = f32 ? 1e-4 : 2e-2, tb = f32 ? 1e-4 : 5e-2;
  check(("attn out" + tag).c_str(), down(be, go), out, tf);
  check(("attn lse" + tag).c_str(), down(be, gl), lse, tf);
  const V gdq1 = down(be, gdq), gdkv1 = down(be, gdkv), gdkpe1 = down(be, gdkpe);
  check(("attn dq" + tag).c_str(), gdq1, dq, tb);
  check(("attn dkv" + tag).c_str(), gdkv1, dkv, tb);
  check(("attn dkpe" + tag).c_str(), gdkpe1, dkpe, tb);
  // Deterministic: a second backward gives the same bits.
  be.attention_backward(gdq.data(), gdkv.data(), gdkpe.data(), gdo.data(), go.data(), gl.data(), gq.data(),
                        gkv.data(), gkpe.data(), B, T, nh, dn, dr, dv, scale);
  EXPECT_TRUE(down(be, gdq) == gdq1 && down(be, gdkv) == gdkv1 && down(be, gdkpe) == gdkpe1)
      << "attention backward is not deterministic" << tag;
}

TEST(CudaTrain, AttentionForwardBackward) {
  REQUIRE_CUDA();
  for (bool f32 : {true, false}) {
    attention_case(f32, 2, 37, 3, 16, 8, 12, 90);     // odd head dims: always the materialized path
    attention_case(f32, 1, 130, 4, 32, 16, 32, 95);   // the tiny fixtures' head dims (fused in bf16 mode)
    attention_case(f32, 2, 200, 3, 64, 32, 64, 100);  // train-s head dims, T > 3 tiles, not a tile multiple
  }
  // The fused kernels at train-s head dims: one exact tile, a partial single tile, three tokens, 4+ tiles with
  // a 1-row tail; and the materialized path at the same dims through the switch. (Not T = 1: there dS = 0, so
  // the reference dq/dkpe are rounding noise and a relative error means nothing.)
  attention_case(false, 1, 64, 2, 64, 32, 64, 110);
  attention_case(false, 3, 17, 2, 64, 32, 64, 115);
  attention_case(false, 2, 3, 2, 64, 32, 64, 120);
  attention_case(false, 1, 257, 2, 64, 32, 64, 125);
  attention_case(false, 1, 40, 5, 32, 16, 32, 130);
  attention_case(false, 2, 200, 3, 64, 32, 64, 100, /*naive=*/true);
}

// Routing rules of the fixtures (tests/data/tiny-*/config.json) and the V2 softmax variants.
std::vector<std::pair<std::string, RouteParams>> route_configs() {
  auto mk = [](int64_t E, int64_t K, int64_t G, int64_t TG, bool sig, bool norm, bool grp, bool noaux, double sc) {
    RouteParams p;
    p.n_experts = E, p.top_k = K, p.n_group = G, p.topk_group = TG, p.sigmoid = sig, p.norm_topk_prob = norm;
    p.group_limited = grp, p.noaux_bias = noaux, p.scaling = sc;
    return p;
  };
  return {{"tiny-fp32 E16 K4 G4/2", mk(16, 4, 4, 2, true, true, true, true, 2.5)},
          {"tiny-bf16-yarn E16 K4 G1 no-norm", mk(16, 4, 1, 1, true, false, true, true, 2.5)},
          {"tiny-fp8 E8 K2 G2/1", mk(8, 2, 2, 1, true, true, true, true, 2.5)},
          {"tiny-mtp E8 K2 G4/2", mk(8, 2, 4, 2, true, true, true, true, 2.5)},
          {"train-s E32 K4 G4/2", mk(32, 4, 4, 2, true, true, true, true, 2.5)},
          {"E72 K6 G8/3 (lanes > 32)", mk(72, 6, 8, 3, true, true, true, true, 1.5)},
          {"V2 softmax greedy-group E16 K3", mk(16, 3, 4, 2, false, true, true, false, 1.0)},
          {"softmax greedy E10 K1 scaled", mk(10, 1, 1, 1, false, false, false, false, 16.0)}};
}

TEST(CudaTrain, RouterForwardBackward) {
  REQUIRE_CUDA();
  TrainBackend& be = gpu(false);
  const int64_t N = 77;
  uint64_t seed = 100;
  for (auto& [name, p] : route_configs()) {
    const int64_t E = p.n_experts, K = p.top_k;
    V logits = randn(N * E, ++seed), bias = randn(E, ++seed, 0.1), dw = randn(N * K, ++seed),
      extra = randn(N * E, ++seed, 0.1);
    for (bool with_bias : {true, false}) {
      I32 idx(N * K);
      V w(N * K), s(N * E);
      cpu::route_forward(idx.data(), w.data(), s.data(), logits.data(), with_bias ? bias.data() : nullptr, N, p);
      auto gl = up(be, logits), gb = up(be, bias), gw = up(be, V(N * K)), gs = up(be, V(N * E));
      auto gi = up(be, I32(N * K));
      be.route_forward(gi.data(), gw.data(), gs.data(), gl.data(), with_bias ? gb.data() : nullptr, N, p);
      const I32 hi = down(be, gi);
      int64_t diff = 0;
      for (int64_t i = 0; i < N * K; ++i) diff += hi[i] != idx[i];
      std::printf("[ cuda-train ] route %s%s: %ld of %ld picks differ\n", name.c_str(), with_bias ? "" : " (no bias)",
                  long(diff), long(N * K));
      EXPECT_EQ(diff, 0) << name;
      check(("route w " + name).c_str(), down(be, gw), w, kTight);
      check(("route scores " + name).c_str(), down(be, gs), s, kTight);
      for (bool with_extra : {true, false}) {
        V dz(N * E);
        cpu::route_backward(dz.data(), dw.data(), with_extra ? extra.data() : nullptr, s.data(), idx.data(), N, p);
        auto gdw = up(be, dw), gex = up(be, extra), gdz = up(be, V(N * E));
        be.route_backward(gdz.data(), gdw.data(), with_extra ? gex.data() : nullptr, gs.data(), gi.data(), N, p);
        check(("route dlogits " + name + (with_extra ? " +extra" : "")).c_str(), down(be, gdz), dz, kTight);
      }
    }
  }
}

TEST(CudaTrain, BalanceLossAndExpertCounts) {
  REQUIRE_CUDA();
  TrainBackend& be = gpu(false);
  const int64_t B = 3, Tq = 29, N = B * Tq;
  for (auto& [name, p] : route_configs()) {
    const int64_t E = p.n_experts, K = p.top_k;
    V logits = randn(N * E, 200 + E), s(N * E), w(N * K), ds(N * E);
    I32 idx(N * K);
    cpu::route_forward(idx.data(), w.data(), s.data(), logits.data(), nullptr, N, p);
    const double l_ref = cpu::balance_loss(ds.data(), s.data(), idx.data(), B, Tq, E, K, 1e-3, 0.5);
    auto gs = up(be, s), gds = up(be, V(N * E));
    auto gi = up(be, idx);
    const double l = be.balance_loss(gds.data(), gs.data(), gi.data(), B, Tq, E, K, 1e-3, 0.5);
    EXPECT_NEAR(l, l_ref, 1e-9 * std::abs(l_ref)) << name;
    check(("balance dscores " + name).c_str(), down(be, gds), ds, kTight);
    std::vector<int64_t> load(E, 1), ref(E, 1);
    for (int32_t e : idx) ++ref[e];
    be.count_experts(load, gi.data(), N * K);
    EXPECT_EQ(load, ref) << name;
  }
}

void experts_case(bool f32, int64_t N, int64_t E, int64_t K, int64_t H, int64_t I, uint64_t seed) {
  TrainBackend& be = gpu(f32);
  RouteParams p;
  p.n_experts = E, p.top_k = K, p.n_group = 1, p.topk_group = 1, p.group_limited = false;
  V logits = randn(N * E, seed), s(N * E), w(N * K);
  for (int64_t t = 0; t < N; ++t) logits[t * E + 1] = -30.f;  // expert 1 gets no token
  I32 idx(N * K);
  cpu::route_forward(idx.data(), w.data(), s.data(), logits.data(), nullptr, N, p);
  V x = randn(N * H, seed + 1), Wg = randn(E * I * H, seed + 2, 0.2), Wu = randn(E * I * H, seed + 3, 0.2),
    Wd = randn(E * H * I, seed + 4, 0.2), dout = randn(N * H, seed + 5), out0 = randn(N * H, seed + 6),
    dx0 = randn(N * H, seed + 7), dWg0 = randn(Wg.size(), seed + 8), dWu0 = randn(Wu.size(), seed + 9),
    dWd0 = randn(Wd.size(), seed + 10);
  V out = out0, dx = dx0, dWg = dWg0, dWu = dWu0, dWd = dWd0, dw(N * K);
  cpu::MoeSaved<float> cs;
  cpu::experts_forward(out.data(), cs, x.data(), idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
  cpu::experts_backward(dx.data(), dw.data(), dWg.data(), dWu.data(), dWd.data(), dout.data(), cs, x.data(),
                        idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
  auto gx = up(be, x), gWg = up(be, Wg), gWu = up(be, Wu), gWd = up(be, Wd), gdo = up(be, dout), go = up(be, out0),
       gdx = up(be, dx0), gdWg = up(be, dWg0), gdWu = up(be, dWu0), gdWd = up(be, dWd0), gw = up(be, w),
       gdw = up(be, randn(N * K, 3));
  auto gi = up(be, idx);
  auto st = be.new_moe_state();
  be.experts_forward(go.data(), *st, gx.data(), gi.data(), gw.data(), gWg.data(), gWu.data(), gWd.data(), N, K, H, I,
                     E);
  be.experts_backward(gdx.data(), gdw.data(), gdWg.data(), gdWu.data(), gdWd.data(), gdo.data(), *st, gx.data(),
                      gi.data(), gw.data(), gWg.data(), gWu.data(), gWd.data(), N, K, H, I, E);
  const std::string tag = " E" + std::to_string(E) + " K" + std::to_string(K) + (f32 ? " f32" : " bf16");
  const double tf = f32 ? kTight : 2e-2, tb = f32 ? kTight : 5e-2;
  check(("experts out +=" + tag).c_str(), down(be, go), out, tf);
  check(("experts dx +=" + tag).c_str(), down(be, gdx), dx, tb);
  check(("experts dw" + tag).c_str(), down(be, gdw), dw, tb);
  check(("experts dWg +=" + tag).c_str(), down(be, gdWg), dWg, tb);
  check(("experts dWu +=" + tag).c_str(), down(be, gdWu), dWu, tb);
  check(("experts dWd +=" + tag).c_str(), down(be, gdWd), dWd, tb);
}

TEST(CudaTrain, ExpertsForwardBackward) {
  REQUIRE_CUDA();
  for (bool f32 : {true, false}) {
    experts_case(f32, 53, 16, 4, 40, 24, 300);   // tiny-fp32's E/K, odd H and I
    experts_case(f32, 61, 8, 2, 256, 192, 320);  // tiny-fp8's shapes
  }
}

TEST(CudaTrain, SumSquaresDeterministic) {
  REQUIRE_CUDA();
  TrainBackend& be = gpu(false);
  for (int64_t n : {int64_t(1), int64_t(1000003)}) {
    V x = randn(n, 400);
    auto g = up(be, x);
    const double a = be.sum_squares(g.data(), n), b = be.sum_squares(g.data(), n), ref = make_cpu_train_backend()->sum_squares(x.data(), n);
    EXPECT_EQ(a, b);
    EXPECT_NEAR(a, ref, 1e-12 * ref);
  }
}

// Two AdamW steps (the first clipped, the second not, decoupled decay on matrices): the optimizer class over the
// GPU backend against the same class over the CPU backend.
TEST(CudaTrain, AdamWMatchesCpuOptimizer) {
  REQUIRE_CUDA();
  TrainBackend& be = gpu(false);
  auto cpu_be = make_cpu_train_backend();
  ModelConfig c;
  c.vocab_size = 40, c.hidden_size = 16, c.intermediate_size = 24, c.num_hidden_layers = 1, c.num_attention_heads = 2;
  c.kv_lora_rank = 8, c.qk_nope_head_dim = 4, c.qk_rope_head_dim = 4, c.v_head_dim = 4, c.max_position_embeddings = 8;
  ParamLayout L = make_param_layout(c);
  AdamWConfig cfg;
  cfg.clip = 1.0;
  AdamW ref(*cpu_be, L, cfg), opt(be, L, cfg);
  const int64_t n = L.num_params;
  V p = randn(n, 500, 0.1);
  auto gp = up(be, p);
  for (int step = 1; step <= 2; ++step) {
    V g = randn(n, 510 + step, step == 1 ? 1.0 : 1e-4);  // first step clipped, second not
    const double lr = 1e-2 / step;
    const double norm_ref = ref.step(p.data(), g.data(), lr);
    auto gg = up(be, g);
    const double norm = opt.step(gp.data(), gg.data(), lr);
    EXPECT_NEAR(norm, norm_ref, 1e-9 * norm_ref);
  }
  std::vector<float> m, v, m_ref, v_ref;
  opt.get_moments(m, v);
  ref.get_moments(m_ref, v_ref);
  check("adamw params", down(be, gp), p, 1e-6);
  check("adamw m", m, m_ref, 1e-6);
  check("adamw v", v, v_ref, 1e-6);
}

}  // namespace

// Per-op wall time at the train-s shapes (bench/configs/train-s.json: B 8 x T 1024, H 1024, 16 heads of
// 64 + 32 / 64, 32 experts top-4 of I 512, vocab 32768), bf16 products. Runs only with DSV3_CUDA_TRAIN_BENCH=1.
TEST(CudaTrainBench, TrainSShapes) {
  REQUIRE_CUDA();
  if (!std::getenv("DSV3_CUDA_TRAIN_BENCH")) GTEST_SKIP() << "set DSV3_CUDA_TRAIN_BENCH=1";
  TrainBackend& be = gpu(false);
  const int64_t B = 8, T = 1024, N = B * T, H = 1024, nh = 16, dn = 64, dr = 32, dv = 64, E = 32, K = 4, I = 512,
                Vv = 32768, F = 2816;
  auto time_ms = [&](const char* what, double flop, const std::function<void()>& f) {
    f();
    be.synchronize();
    const int reps = 5;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) f();
    be.synchronize();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
    std::printf("[ cuda-train ] bench %-34s %9.3f ms%s", what, ms, flop > 0 ? "" : "\n");
    if (flop > 0) std::printf("  %7.1f TFLOP/s\n", flop / ms * 1e-9);
  };
  auto buf = [&](int64_t n, uint64_t seed, double scale = 1.0) { return up(be, randn(size_t(n), seed, scale)); };
  {  // dense linear (the dense FFN's gate projection)
    auto x = buf(N * H, 1), W = buf(F * H, 2, 0.02), y = buf(N * F, 3), dx = buf(N * H, 4), dW = buf(F * H, 5);
    time_ms("linear fwd 8192x2816x1024", 2.0 * N * F * H, [&] { be.linear_forward(y.data(), x.data(), W.data(), N, F, H); });
    time_ms("linear bwd (dx, dW)", 4.0 * N * F * H,
            [&] { be.linear_backward(dx.data(), false, dW.data(), y.data(), x.data(), W.data(), N, F, H); });
  }
  {  // attention core
    auto q = buf(N * nh * (dn + dr), 10), kv = buf(N * nh * (dn + dv), 11), kpe = buf(N * dr, 12),
         o = buf(N * nh * dv, 13), l = buf(B * nh * T, 14), dout = buf(N * nh * dv, 15), dq = buf(N * nh * (dn + dr), 16),
         dkv = buf(N * nh * (dn + dv), 17), dkpe = buf(N * dr, 18);
    // FLOP of the useful (causal) half of each product: forward S and PV; backward S, dP, dV, dK and dQ (the
    // fused backward recomputes S and dP once more for dQ, the materialized one computes full squares).
    const double causal = double(B) * nh * T * T / 2;
    for (const char* mode : {"fused", "naive"}) {
      AttnMode m(std::string(mode) == "naive" ? "naive" : nullptr);
      time_ms((std::string("attention fwd ") + mode).c_str(), 2.0 * causal * (dn + dr + dv), [&] {
        be.attention_forward(o.data(), l.data(), q.data(), kv.data(), kpe.data(), B, T, nh, dn, dr, dv, 0.1);
      });
      time_ms((std::string("attention bwd ") + mode).c_str(), 2.0 * causal * (2 * (dn + dr) + 2 * dv + dn + dr),
              [&] {
                be.attention_backward(dq.data(), dkv.data(), dkpe.data(), dout.data(), o.data(), l.data(), q.data(),
                                      kv.data(), kpe.data(), B, T, nh, dn, dr, dv, 0.1);
              });
    }
  }
  {  // router + experts
    RouteParams p;
    p.n_experts = E, p.top_k = K, p.n_group = 4, p.topk_group = 2, p.scaling = 2.5;
    auto logits = buf(N * E, 20), bias = buf(E, 21, 0.01), w = buf(N * K, 22), s = buf(N * E, 23), dz = buf(N * E, 24);
    TBuf<int32_t> idx(&be);
    idx.resize(size_t(N * K));
    time_ms("route fwd", 0, [&] { be.route_forward(idx.data(), w.data(), s.data(), logits.data(), bias.data(), N, p); });
    time_ms("route bwd", 0, [&] { be.route_backward(dz.data(), w.data(), s.data(), s.data(), idx.data(), N, p); });
    time_ms("balance loss", 0, [&] { be.balance_loss(dz.data(), s.data(), idx.data(), B, T, E, K, 1e-3, 1.0); });
    auto x = buf(N * H, 25), Wg = buf(E * I * H, 26, 0.02), Wu = buf(E * I * H, 27, 0.02), Wd = buf(E * H * I, 28, 0.02),
         out = buf(N * H, 29), dx = buf(N * H, 30), dWg = buf(E * I * H, 31), dWu = buf(E * I * H, 32),
         dWd = buf(E * H * I, 33), dw = buf(N * K, 34);
    auto st = be.new_moe_state();
    const double f = 2.0 * N * K * 3 * H * I;
    time_ms("experts fwd", f, [&] {
      be.experts_forward(out.data(), *st, x.data(), idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
    });
    time_ms("experts fwd + bwd", 3 * f, [&] {
      be.experts_forward(out.data(), *st, x.data(), idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
      be.experts_backward(dx.data(), dw.data(), dWg.data(), dWu.data(), dWd.data(), out.data(), *st, x.data(),
                          idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
    });
  }
  {  // norms, loss, optimizer
    auto x = buf(N * H, 40), w = buf(H, 41), o = buf(N * H, 42), r = buf(N, 43), dx = buf(N * H, 44), dw = buf(H, 45);
    time_ms("rmsnorm fwd", 0, [&] { be.rmsnorm_forward(o.data(), r.data(), x.data(), H, w.data(), N, H, 1e-6); });
    time_ms("rmsnorm bwd", 0, [&] {
      be.rmsnorm_backward(dx.data(), H, dw.data(), o.data(), x.data(), H, r.data(), w.data(), N, H);
    });
    auto z = buf(N * Vv, 46, 2.0);
    I32 tg(static_cast<size_t>(N));
    for (int64_t t = 0; t < N; ++t) tg[t] = int32_t((t * 7919) % Vv);
    auto gt = up(be, tg);
    time_ms("cross-entropy 8192 x 32768 (in place)", 0, [&] {
      be.cross_entropy_forward_backward(z.data(), z.data(), gt.data(), N, Vv, 1.0 / N, nullptr);
    });
    const int64_t P = 64 << 20;
    auto pp = buf(P, 47, 0.02), g = buf(P, 48, 1e-3), m = buf(P, 49, 0), v = buf(P, 50, 0);
    time_ms("sum_squares 64M", 0, [&] { be.sum_squares(g.data(), P); });
    time_ms("adamw 64M", 0, [&] {
      be.adamw_update(pp.data(), g.data(), m.data(), v.data(), 0, P, 0.9f, 0.95f, 1e-8f, 1.f, 0.999f, 1e-3f, 1.f);
    });
  }
}
