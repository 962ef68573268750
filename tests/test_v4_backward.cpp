// DeepSeek-V4 backward against central finite differences in double precision: every V4-specific kernel of
// model/v4_kernels.h on tiny shapes (L = sum(out * R) with a fixed random R, the backward run with dout = R),
// then the whole training model (V4TrainModel<double>) on the tiny-v4-fwd fixture, a few entries of every
// parameter tensor, which covers the wiring: window + compressed keys, output de-rotation, grouped output
// projection, CSA/HCA compressors, hash and learned routing, the mHC of every block and the head.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <vector>

#include "core/rng.h"
#include "model/v4_kernels.h"
#include "model/v4_loader.h"
#include "test_helpers.h"
#include "train/v4_train_model.h"

using namespace dsv3;
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

// ||analytic - numeric|| / ||numeric|| of the gradient of `loss` w.r.t. p (central differences, step h).
double fd_error(const std::function<double()>& loss, Vec& p, const Vec& analytic, double h = 1e-6) {
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

TEST(V4Backward, SinkhornThroughEveryIteration) {
  const int64_t N = 4, iters = 20;
  Vec A = randn(N * N, 1, 1.5), R = randn(N * N, 2);
  auto loss = [&] {
    Vec C(N * N);
    v4k::sinkhorn(C.data(), A.data(), N, iters, 1e-6);
    return dot(C, R);
  };
  Vec dA(N * N);
  v4k::sinkhorn_backward(dA.data(), R.data(), A.data(), N, iters, 1e-6);
  const double e = fd_error(loss, A, dA);
  std::printf("[v4 fd] sinkhorn (20 iterations) rel err %.2e\n", e);
  EXPECT_LT(e, kTol);
}

TEST(V4Backward, HcWeightsPrePostComb) {
  const int64_t N = 3, R_ = (2 + N) * N, iters = 20;
  Vec mu = randn(R_, 3), base = randn(R_, 4, 0.5), scale = {0.8, 1.3, 1.1};
  Vec Rp = randn(N, 5), Ro = randn(N, 6), Rc = randn(N * N, 7);
  auto loss = [&] {
    Vec pre(N), post(N), comb(N * N);
    v4k::hc_weights(pre.data(), post.data(), comb.data(), mu.data(), base.data(), scale.data(), N, iters, 1e-6);
    return dot(pre, Rp) + dot(post, Ro) + dot(comb, Rc);
  };
  Vec dmu(R_), dbase(R_, 0.0), dscale(3, 0.0);
  v4k::hc_weights_backward(dmu.data(), dbase.data(), dscale.data(), Rp.data(), Ro.data(), Rc.data(), mu.data(),
                           base.data(), scale.data(), N, iters, 1e-6);
  const double e = std::max({fd_error(loss, mu, dmu), fd_error(loss, base, dbase), fd_error(loss, scale, dscale)});
  std::printf("[v4 fd] mHC pre/post/comb weights rel err %.2e\n", e);
  EXPECT_LT(e, kTol);
}

TEST(V4Backward, HcCollapseExpandAndHead) {
  const int64_t N = 3, d = 5;
  Vec X = randn(N * d, 8), pre = randn(N, 9), post = randn(N, 10), comb = randn(N * N, 11), f = randn(d, 12);
  Vec Ru = randn(d, 13), Rx = randn(N * d, 14);
  auto loss = [&] {
    Vec u(d), Xo(N * d);
    v4k::hc_collapse(u.data(), pre.data(), X.data(), N, d);
    v4k::hc_expand(Xo.data(), X.data(), f.data(), post.data(), comb.data(), N, d);
    return dot(u, Ru) + dot(Xo, Rx);
  };
  Vec dX(N * d), df(d), dpost(N), dcomb(N * N), dpre(N);
  v4k::hc_expand_backward(dX.data(), df.data(), dpost.data(), dcomb.data(), Rx.data(), X.data(), f.data(), post.data(),
                          comb.data(), N, d);
  v4k::hc_collapse_backward(dpre.data(), dX.data(), Ru.data(), pre.data(), X.data(), N, d);
  double e = std::max({fd_error(loss, X, dX), fd_error(loss, f, df), fd_error(loss, post, dpost),
                       fd_error(loss, comb, dcomb), fd_error(loss, pre, dpre)});
  // The head: pre = sigmoid(scale mu + base) + eps, and the unweighted RMSNorm of the flattened streams.
  Vec mu = randn(N, 15), base = randn(N, 16), sc = {1.2}, Rh = randn(N, 17);
  auto lh = [&] {
    Vec p(N);
    v4k::hc_head_weights(p.data(), mu.data(), base.data(), sc.data(), N, 1e-6);
    return dot(p, Rh);
  };
  Vec dmu(N), db(N, 0.0), ds(1, 0.0);
  v4k::hc_head_weights_backward(dmu.data(), db.data(), ds.data(), Rh.data(), mu.data(), base.data(), sc.data(), N);
  e = std::max({e, fd_error(lh, mu, dmu), fd_error(lh, base, db), fd_error(lh, sc, ds)});
  Vec x = randn(N * d, 18), Rr = randn(N * d, 19);
  auto lr = [&] {
    Vec y(N * d);
    v4k::rms_row(y.data(), x.data(), N * d, 1e-6);
    return dot(y, Rr);
  };
  Vec y(N * d), dx(N * d, 0.0);
  const double r = v4k::rms_row(y.data(), x.data(), N * d, 1e-6);
  v4k::rms_row_backward(dx.data(), Rr.data(), x.data(), r, N * d);
  e = std::max(e, fd_error(lr, x, dx));
  std::printf("[v4 fd] mHC collapse / expand / head / stream RMSNorm rel err %.2e\n", e);
  EXPECT_LT(e, kTol);
}

TEST(V4Backward, SinkAttentionSharedKeyValue) {
  const int64_t hd = 6, nk = 5;
  Vec q = randn(hd, 20), K = randn(nk * hd, 21), sink = {0.7}, R = randn(hd, 22);
  const double scale = 1 / std::sqrt(double(hd));
  auto ptrs = [&] {
    std::vector<const double*> k;
    for (int64_t j = 0; j < nk; ++j) k.push_back(K.data() + j * hd);
    return k;
  };
  auto loss = [&] {
    Vec o(hd), p(nk);
    v4k::sink_attention(o.data(), p.data(), q.data(), ptrs().data(), nk, sink[0], scale, hd);
    return dot(o, R);
  };
  Vec o(hd), p(nk), dq(hd, 0.0), dK(nk * hd, 0.0), ds(1, 0.0);
  const double ps = v4k::sink_attention(o.data(), p.data(), q.data(), ptrs().data(), nk, sink[0], scale, hd);
  std::vector<double*> dk;
  for (int64_t j = 0; j < nk; ++j) dk.push_back(dK.data() + j * hd);
  v4k::sink_attention_backward(dq.data(), dk.data(), ds.data(), R.data(), p.data(), ps, q.data(), ptrs().data(), nk,
                               scale, hd);
  const double e = std::max({fd_error(loss, q, dq), fd_error(loss, K, dK), fd_error(loss, sink, ds)});
  std::printf("[v4 fd] sink attention (K = V) rel err %.2e\n", e);
  EXPECT_LT(e, kTol);
}

TEST(V4Backward, CompressorPoolingWithEmptySlots) {
  const int64_t n = 8;
  Vec v = randn(n, 23), z = randn(n, 24);
  for (int64_t i = 0; i < 3; ++i) v[i] = 0, z[i] = -INFINITY;  // window 0's missing lookahead slots
  const double R = 1.7;
  auto loss = [&] {
    Vec P(n);
    return R * v4k::pool(P.data(), v.data(), z.data(), n);
  };
  Vec P(n), dv(n), dz(n);
  const double out = v4k::pool(P.data(), v.data(), z.data(), n);
  v4k::pool_backward(dv.data(), dz.data(), R, P.data(), v.data(), out, n);
  Vec vv(v.begin() + 3, v.end()), zz(z.begin() + 3, z.end()), dvv(dv.begin() + 3, dv.end()), dzz(dz.begin() + 3, dz.end());
  auto loss2 = [&] {
    for (int64_t i = 3; i < n; ++i) v[i] = vv[i - 3], z[i] = zz[i - 3];
    return loss();
  };
  const double e = std::max(fd_error(loss2, vv, dvv), fd_error(loss2, zz, dzz));
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(dz[i], 0.0);
    EXPECT_EQ(dv[i], 0.0);
  }
  std::printf("[v4 fd] compressor pooling rel err %.2e\n", e);
  EXPECT_LT(e, kTol);
}

TEST(V4Backward, ClampedSwiGLU) {
  const double L = 0.8;
  Vec g = {-2.0, -0.3, 0.2, 0.5, 1.4, 3.0}, u = {-1.5, -0.6, 0.1, 0.79, 0.9, -0.2}, R = randn(6, 25);
  auto loss = [&] {
    double s = 0;
    for (size_t i = 0; i < g.size(); ++i) s += R[i] * v4k::swiglu_clamped(g[i], u[i], L);
    return s;
  };
  Vec dg(6), du(6);
  for (size_t i = 0; i < g.size(); ++i) v4k::swiglu_clamped_backward(&dg[i], &du[i], R[i], g[i], u[i], L);
  const double e = std::max(fd_error(loss, g, dg), fd_error(loss, u, du));
  EXPECT_EQ(dg[5], 0.0);  // gate above the limit
  EXPECT_EQ(du[0], 0.0);  // up below -limit
  std::printf("[v4 fd] clamped SwiGLU rel err %.2e\n", e);
  EXPECT_LT(e, kTol);
}

TEST(V4Backward, SqrtSoftplusRoutingWeights) {
  for (bool sig : {false, true}) {
    const int64_t K = 3;
    Vec l = {-1.3, 0.4, 21.5};  // includes softplus' identity branch above 20
    Vec R = randn(K, 26);
    const double rho = 1.5;
    auto loss = [&] {
      Vec s(K), w(K);
      for (int64_t k = 0; k < K; ++k) s[k] = v4k::route_score(l[k], sig);
      v4k::route_weights(w.data(), s.data(), K, rho);
      return dot(w, R);
    };
    Vec s(K), ds(K), dl(K);
    for (int64_t k = 0; k < K; ++k) s[k] = v4k::route_score(l[k], sig);
    v4k::route_weights_backward(ds.data(), R.data(), s.data(), K, rho);
    for (int64_t k = 0; k < K; ++k) dl[k] = ds[k] * v4k::route_score_grad(l[k], s[k], sig);
    const double e = fd_error(loss, l, dl);
    std::printf("[v4 fd] %s routing weights rel err %.2e\n", sig ? "sigmoid" : "sqrtsoftplus", e);
    EXPECT_LT(e, kTol);
  }
}

// The whole model in double: 5 layers (sliding, CSA, HCA, CSA, HCA), hash and learned routing, 3 streams.
TEST(V4Backward, FullModelFiniteDifferences) {
  LoadedV4Model m = open_v4_model(test::data_dir("tiny-v4-fwd"));
  // The weights the model holds (fp32) as the float master; a double copy is what the test perturbs.
  const V4Weights& w = m.model->weights();
  const int64_t n = w.layout.num_params;
  Vec P(w.flat.f32(), w.flat.f32() + n), G(static_cast<size_t>(n), 0.0);
  V4TrainModel<double> tm(w, P.data(), G.data());
  const int64_t Tn = 30;  // 7 CSA windows (> index_topk = 3), 3 HCA windows, every layer type
  std::vector<int32_t> ids(static_cast<size_t>(Tn));
  Rng rng(5);
  for (auto& t : ids) t = int32_t(2 + rng.next() % 120);
  tm.run(ids.data(), 1, Tn, 1.0, true);
  Vec scratch(static_cast<size_t>(n));
  auto loss = [&] {
    Vec G2(static_cast<size_t>(n));
    V4TrainModel<double> t2(w, P.data(), G2.data());
    return t2.run(ids.data(), 1, Tn, 1.0, false).loss;
  };
  double worst = 0;
  std::string worst_name;
  int64_t checked = 0;
  for (const auto& s : w.layout.specs) {
    if (s.is_bias) continue;
    const int64_t numel = shape_numel(s.shape);
    const bool indexer = s.name.find(".attn.indexer.") != std::string::npos;
    if (indexer) {  // no gradient through the top-k selection
      for (int64_t i = 0; i < numel; ++i) ASSERT_EQ(G[static_cast<size_t>(s.offset + i)], 0.0) << s.name;
      continue;
    }
    // The largest-gradient entry and two random ones of each tensor.
    int64_t big = 0;
    for (int64_t i = 0; i < numel; ++i)
      if (std::fabs(G[static_cast<size_t>(s.offset + i)]) > std::fabs(G[static_cast<size_t>(s.offset + big)])) big = i;
    Vec num, ana;
    for (int64_t i : {big, int64_t(rng.next() % uint64_t(numel)), int64_t(rng.next() % uint64_t(numel))}) {
      double& p = P[static_cast<size_t>(s.offset + i)];
      const double keep = p, h = 1e-5;
      p = keep + h;
      const double lp = loss();
      p = keep - h;
      const double lm = loss();
      p = keep;
      num.push_back((lp - lm) / (2 * h));
      ana.push_back(G[static_cast<size_t>(s.offset + i)]);
      ++checked;
    }
    double d2 = 0, n2 = 0;
    for (size_t i = 0; i < num.size(); ++i) d2 += (num[i] - ana[i]) * (num[i] - ana[i]), n2 += num[i] * num[i];
    const double e = n2 > 0 ? std::sqrt(d2 / n2) : std::sqrt(d2);
    if (e > worst) worst = e, worst_name = s.name;
    EXPECT_LT(e, 1e-5) << s.name;
  }
  std::printf("[v4 fd] full model: %lld entries of every tensor, worst rel err %.2e (%s)\n", (long long)checked, worst,
              worst_name.c_str());
}
