// Every training backward kernel against central finite differences, in double precision on tiny shapes.
// Each test builds a scalar L = sum(out * R) with a fixed random R, runs the backward with dout = R, and
// compares every input/weight gradient with (L(p + h) - L(p - h)) / 2h, h = 1e-6.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "core/rng.h"
#include "ops/cpu/blas.h"
#include "ops/cpu/train_ops.h"

using namespace dsv3;
using namespace dsv3::cpu;
using Vec = std::vector<double>;

namespace {

Vec randn(size_t n, uint64_t seed, double scale = 1.0) {
  Rng r(seed);
  Vec v(n);
  for (auto& x : v) x = r.normal() * scale;
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Relative error ||analytic - numeric|| / max(||numeric||, tiny) of the gradient of `loss` w.r.t. `p`.
double fd_error(const std::function<double()>& loss, Vec& p, const Vec& analytic) {
  const double h = 1e-6;
  double num2 = 0, diff2 = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const double keep = p[i];
    p[i] = keep + h;
    const double lp = loss();
    p[i] = keep - h;
    const double lm = loss();
    p[i] = keep;
    const double g = (lp - lm) / (2 * h);
    num2 += g * g;
    diff2 += (g - analytic[i]) * (g - analytic[i]);
  }
  return std::sqrt(diff2) / std::max(std::sqrt(num2), 1e-12);
}

constexpr double kTol = 1e-6;

}  // namespace

TEST(BackwardOps, Linear) {
  const int64_t M = 3, N = 4, K = 5;
  Vec x = randn(M * K, 1), W = randn(N * K, 2), R = randn(M * N, 3);
  auto loss = [&] {
    Vec y(M * N);
    linear_forward(y.data(), x.data(), W.data(), M, N, K);
    return dot(y, R);
  };
  Vec dx(M * K, 0.0), dW(N * K, 0.0);
  linear_backward(dx.data(), false, dW.data(), R.data(), x.data(), W.data(), M, N, K);
  EXPECT_LT(fd_error(loss, x, dx), kTol);
  EXPECT_LT(fd_error(loss, W, dW), kTol);
}

TEST(BackwardOps, RMSNormStrided) {
  const int64_t N = 3, D = 5, xs = 7;
  Vec x = randn(N * xs, 4), w = randn(D, 5), R = randn(N * D, 6);
  auto loss = [&] {
    Vec y(N * D), r(N);
    rmsnorm_forward(y.data(), r.data(), x.data(), xs, w.data(), N, D, 1e-6);
    return dot(y, R);
  };
  Vec y(N * D), rstd(N), dx(N * xs, 0.0), dw(D, 0.0);
  rmsnorm_forward(y.data(), rstd.data(), x.data(), xs, w.data(), N, D, 1e-6);
  rmsnorm_backward(dx.data(), xs, dw.data(), R.data(), x.data(), xs, rstd.data(), w.data(), N, D);
  EXPECT_LT(fd_error(loss, x, dx), kTol);
  EXPECT_LT(fd_error(loss, w, dw), kTol);
}

TEST(BackwardOps, RopeYarnScaledBothLayouts) {
  const int64_t N = 3, n = 2, stride = 6, off = 2, dr = 4;
  std::vector<float> cs(8 * dr / 2), sn(8 * dr / 2);
  // Tables scaled by 1.2, as YaRN's mscale scales cos/sin: the backward must not assume a pure rotation.
  for (size_t i = 0; i < cs.size(); ++i) cs[i] = float(1.2 * std::cos(0.3 * i)), sn[i] = float(1.2 * std::sin(0.3 * i));
  std::vector<int32_t> pos = {5, 1, 7};
  for (bool inter : {true, false}) {
    Vec x = randn(N * n * stride, 7), R = randn(N * n * stride, 8);
    auto loss = [&] {
      Vec y = x;
      rope_forward(y.data(), N, n, stride, off, dr, pos.data(), cs.data(), sn.data(), inter);
      return dot(y, R);
    };
    Vec dx = R;
    rope_backward(dx.data(), N, n, stride, off, dr, pos.data(), cs.data(), sn.data(), inter);
    EXPECT_LT(fd_error(loss, x, dx), kTol) << "interleave " << inter;
  }
}

TEST(BackwardOps, SwiGLU) {
  const int64_t n = 11;
  Vec g = randn(n, 9), u = randn(n, 10), R = randn(n, 11);
  auto loss = [&] {
    Vec y(n);
    swiglu_forward(y.data(), g.data(), u.data(), n);
    return dot(y, R);
  };
  Vec dg(n), du(n);
  swiglu_backward(dg.data(), du.data(), R.data(), g.data(), u.data(), n);
  EXPECT_LT(fd_error(loss, g, dg), kTol);
  EXPECT_LT(fd_error(loss, u, du), kTol);
}

TEST(BackwardOps, EmbeddingRepeatedIds) {
  const int64_t V = 5, H = 40, N = 6;
  std::vector<int32_t> ids = {1, 3, 1, 0, 4, 1};
  Vec table = randn(V * H, 12), R = randn(N * H, 13);
  auto loss = [&] {
    Vec y(N * H);
    embedding_forward(y.data(), table.data(), ids.data(), N, H);
    return dot(y, R);
  };
  Vec dt(V * H, 0.0);
  embedding_backward(dt.data(), R.data(), ids.data(), N, H);
  EXPECT_LT(fd_error(loss, table, dt), kTol);
}

TEST(BackwardOps, CrossEntropy) {
  const int64_t N = 4, V = 7;
  std::vector<int32_t> y = {3, -1, 0, 6};  // -1: ignored row
  Vec z = randn(N * V, 14, 2.0);
  const double scale = 0.37;
  auto loss = [&] {
    Vec d(N * V);
    return scale * cross_entropy_forward_backward(d.data(), z.data(), y.data(), N, V, 1.0, nullptr);
  };
  Vec dz(N * V);
  cross_entropy_forward_backward(dz.data(), z.data(), y.data(), N, V, scale, nullptr);
  EXPECT_LT(fd_error(loss, z, dz), kTol);
  // In place (dlogits aliasing logits) gives the same gradient.
  Vec zz = z;
  cross_entropy_forward_backward(zz.data(), zz.data(), y.data(), N, V, scale, nullptr);
  for (size_t i = 0; i < zz.size(); ++i) EXPECT_DOUBLE_EQ(zz[i], dz[i]);
}

TEST(BackwardOps, Attention) {
  const int64_t B = 2, Tq = 5, nh = 2, dn = 3, dr = 2, dv = 3;
  const double scale = 0.4;
  Vec q = randn(B * Tq * nh * (dn + dr), 15), kv = randn(B * Tq * nh * (dn + dv), 16), kpe = randn(B * Tq * dr, 17);
  Vec R = randn(B * Tq * nh * dv, 18);
  auto loss = [&] {
    Vec o(B * Tq * nh * dv), l(B * nh * Tq);
    attention_forward(o.data(), l.data(), q.data(), kv.data(), kpe.data(), B, Tq, nh, dn, dr, dv, scale);
    return dot(o, R);
  };
  Vec o(B * Tq * nh * dv), lse(B * nh * Tq);
  attention_forward(o.data(), lse.data(), q.data(), kv.data(), kpe.data(), B, Tq, nh, dn, dr, dv, scale);
  Vec dq(q.size()), dkv(kv.size()), dkpe(kpe.size());
  attention_backward(dq.data(), dkv.data(), dkpe.data(), R.data(), o.data(), lse.data(), q.data(), kv.data(),
                     kpe.data(), B, Tq, nh, dn, dr, dv, scale);
  EXPECT_LT(fd_error(loss, q, dq), kTol);
  EXPECT_LT(fd_error(loss, kv, dkv), kTol);
  EXPECT_LT(fd_error(loss, kpe, dkpe), kTol);
}

// The DeepSeek-V3.2 form: each query attends only to its selected positions (some rows select fewer than K,
// padded with -1). fp64 finite differences; the forward equals a dense attention whose unselected scores are -inf.
TEST(BackwardOps, AttentionWithDsaSelection) {
  const int64_t B = 2, Tq = 6, nh = 2, dn = 3, dr = 2, dv = 3, K = 3;
  const double scale = 0.4;
  Vec q = randn(B * Tq * nh * (dn + dr), 25), kv = randn(B * Tq * nh * (dn + dv), 26), kpe = randn(B * Tq * dr, 27);
  Vec R = randn(B * Tq * nh * dv, 28);
  std::vector<int32_t> sel(size_t(B * Tq * K), -1);
  for (int64_t r = 0; r < B * Tq; ++r) {
    const int64_t i = r % Tq;
    for (int64_t k = 0; k < std::min<int64_t>(K, i + 1); ++k) sel[size_t(r * K + k)] = int32_t((i * 5 + k * 2 + r) % (i + 1));
    if (i >= 3) sel[size_t(r * K + 1)] = sel[size_t(r * K)] == 0 ? 1 : 0;  // distinct entries
  }
  auto loss = [&] {
    Vec o(B * Tq * nh * dv), l(B * nh * Tq);
    attention_forward(o.data(), l.data(), q.data(), kv.data(), kpe.data(), B, Tq, nh, dn, dr, dv, scale, sel.data(), K);
    return dot(o, R);
  };
  Vec o(B * Tq * nh * dv), lse(B * nh * Tq);
  attention_forward(o.data(), lse.data(), q.data(), kv.data(), kpe.data(), B, Tq, nh, dn, dr, dv, scale, sel.data(), K);
  Vec dq(q.size()), dkv(kv.size()), dkpe(kpe.size());
  attention_backward(dq.data(), dkv.data(), dkpe.data(), R.data(), o.data(), lse.data(), q.data(), kv.data(),
                     kpe.data(), B, Tq, nh, dn, dr, dv, scale, sel.data(), K);
  EXPECT_LT(fd_error(loss, q, dq), kTol);
  EXPECT_LT(fd_error(loss, kv, dkv), kTol);
  EXPECT_LT(fd_error(loss, kpe, dkpe), kTol);
  // Selecting everything is the dense attention.
  std::vector<int32_t> all(size_t(B * Tq * Tq), -1);
  for (int64_t r = 0; r < B * Tq; ++r)
    for (int64_t j = 0; j <= r % Tq; ++j) all[size_t(r * Tq + j)] = int32_t(j);
  Vec od(o.size()), ls(lse.size()), oa(o.size());
  attention_forward(od.data(), ls.data(), q.data(), kv.data(), kpe.data(), B, Tq, nh, dn, dr, dv, scale);
  attention_forward(oa.data(), ls.data(), q.data(), kv.data(), kpe.data(), B, Tq, nh, dn, dr, dv, scale, all.data(), Tq);
  for (size_t i = 0; i < od.size(); ++i) EXPECT_NEAR(oa[i], od[i], 1e-12);
  // And a real restriction changes the output.
  double diff = 0;
  for (size_t i = 0; i < od.size(); ++i) diff += std::abs(o[i] - od[i]);
  EXPECT_GT(diff, 1e-3);
}

namespace {

RouteParams route_params(bool sigmoid, bool norm) {
  RouteParams p;
  p.n_experts = 8;
  p.top_k = 3;
  p.n_group = 4;
  p.topk_group = 2;
  p.sigmoid = sigmoid;
  p.norm_topk_prob = norm;
  p.group_limited = true;
  p.noaux_bias = sigmoid;
  p.scaling = 2.5;
  return p;
}

}  // namespace

// Router: gradient through the (unbiased) scores of the selected experts, their normalization and the scaling,
// plus the balance loss on every score. The selection itself is held fixed by the tiny step.
TEST(BackwardOps, RouterAndBalanceLoss) {
  const int64_t B = 2, Tq = 3, N = B * Tq, E = 8, K = 3;
  std::vector<float> bias = {0.1f, -0.2f, 0.05f, 0.f, 0.3f, -0.1f, 0.02f, 0.f};
  for (int variant = 0; variant < 3; ++variant) {
    const bool sigmoid = variant != 2, norm = variant != 1;
    RouteParams p = route_params(sigmoid, norm);
    Vec z = randn(N * E, 19 + variant), R = randn(N * K, 22);
    const double alpha = 0.3;
    auto loss = [&] {
      std::vector<int32_t> idx(N * K);
      Vec w(N * K), s(N * E), ds(N * E);
      route_forward(idx.data(), w.data(), s.data(), z.data(), bias.data(), N, p);
      return dot(w, R) + balance_loss(ds.data(), s.data(), idx.data(), B, Tq, E, K, alpha, 1.0);
    };
    std::vector<int32_t> idx(N * K);
    Vec w(N * K), s(N * E), ds(N * E), dz(N * E);
    route_forward(idx.data(), w.data(), s.data(), z.data(), bias.data(), N, p);
    balance_loss(ds.data(), s.data(), idx.data(), B, Tq, E, K, alpha, 1.0);
    route_backward(dz.data(), R.data(), ds.data(), s.data(), idx.data(), N, p);
    EXPECT_LT(fd_error(loss, z, dz), kTol) << "variant " << variant;
  }
}

TEST(BackwardOps, Experts) {
  const int64_t N = 6, K = 2, H = 4, I = 3, E = 4;
  std::vector<int32_t> idx = {0, 2, 1, 2, 2, 3, 0, 1, 3, 2, 2, 0};  // expert 2 busy, every expert used
  Vec x = randn(N * H, 30), w = randn(N * K, 31), Wg = randn(E * I * H, 32), Wu = randn(E * I * H, 33),
      Wd = randn(E * H * I, 34), R = randn(N * H, 35);
  auto loss = [&] {
    Vec out(N * H, 0.0);
    MoeSaved<double> s;
    experts_forward(out.data(), s, x.data(), idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
    return dot(out, R);
  };
  Vec out(N * H, 0.0);
  MoeSaved<double> s;
  experts_forward(out.data(), s, x.data(), idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
  Vec dx(N * H, 0.0), dw(N * K), dWg(Wg.size(), 0.0), dWu(Wu.size(), 0.0), dWd(Wd.size(), 0.0);
  experts_backward(dx.data(), dw.data(), dWg.data(), dWu.data(), dWd.data(), R.data(), s, x.data(), idx.data(),
                   w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E);
  EXPECT_LT(fd_error(loss, x, dx), kTol);
  EXPECT_LT(fd_error(loss, w, dw), kTol);
  EXPECT_LT(fd_error(loss, Wg, dWg), kTol);
  EXPECT_LT(fd_error(loss, Wu, dWu), kTol);
  EXPECT_LT(fd_error(loss, Wd, dWd), kTol);
}
