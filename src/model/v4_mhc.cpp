// Manifold-constrained hyper-connections (mHC). The residual is N streams per token; before each block the
// streams are collapsed into the block input with weights `pre`, after it the block output is spread back
// with `post` and the streams are mixed by `comb`, a matrix pushed towards doubly stochastic by Sinkhorn
// iterations (so the mixing cannot grow the residual's norm across many layers). All three come from one
// projection of the RMS-normalized, flattened streams. Order of the Sinkhorn steps follows the reference code,
// not the paper's prose: row softmax + eps, column normalization, then (iters - 1) x (row, column).
#include <cmath>

#include "model/v4_parts.h"

namespace dsv3 {

namespace {
float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// mu [T, rows] = rms(X flattened to [T, N d]) fn^T (fn [rows, N d]).
Tensor hc_mix(Backend& be, const V4Config& c, const Tensor& fn, const Tensor& X) {
  const int64_t T = X.dim(0), Nd = c.hc_mult * c.hidden_size;
  Tensor xn = X.clone().reshape({T, Nd});
  v4_rms_unweighted(xn.f32(), T, Nd, float(c.rms_norm_eps));
  Tensor mu = v4_new(be, {T, fn.dim(0)}, "hc_mix");
  be.linear(mu, xn, fn);
  return mu;
}
}  // namespace

Tensor v4_new(Backend& be, Shape s, const char* name) { return be.alloc(DType::F32, std::move(s), name); }

void v4_rms_unweighted(float* x, int64_t rows, int64_t D, float eps) {
  for (int64_t t = 0; t < rows; ++t) {
    float* v = x + t * D;
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += double(v[i]) * v[i];
    const float r = float(1.0 / std::sqrt(ss / double(D) + eps));
    for (int64_t i = 0; i < D; ++i) v[i] *= r;
  }
}

void v4_hc_pre(Backend& be, const V4Config& c, const V4HcWeights& w, const Tensor& X, Tensor& u,
               std::vector<float>& post, std::vector<float>& comb) {
  const int64_t T = X.dim(0), N = c.hc_mult, d = c.hidden_size, R = (2 + N) * N;
  const float eps = float(c.hc_eps);
  Tensor mu = hc_mix(be, c, w.fn, X);  // [T, (2 + N) N]
  const float* base = w.base.f32();
  const float a_pre = w.scale.f32()[0], a_post = w.scale.f32()[1], a_res = w.scale.f32()[2];
  post.assign(size_t(T * N), 0.f);
  comb.assign(size_t(T * N * N), 0.f);
  u = v4_new(be, {T, d}, "hc_collapsed");
  for (int64_t t = 0; t < T; ++t) {
    const float* m = mu.f32() + t * R;
    std::vector<float> pre(static_cast<size_t>(N));
    for (int64_t j = 0; j < N; ++j) {
      pre[size_t(j)] = sigmoid(m[j] * a_pre + base[j]) + eps;
      post[size_t(t * N + j)] = 2.f * sigmoid(m[N + j] * a_post + base[N + j]);
    }
    // comb[j, k]: softmax over k within row j, + eps, then Sinkhorn.
    float* C = comb.data() + t * N * N;
    for (int64_t j = 0; j < N; ++j) {
      float* row = C + j * N;
      float mx = -INFINITY;
      for (int64_t k = 0; k < N; ++k) mx = std::max(mx, row[k] = m[2 * N + j * N + k] * a_res + base[2 * N + j * N + k]);
      float s = 0;
      for (int64_t k = 0; k < N; ++k) s += (row[k] = std::exp(row[k] - mx));
      for (int64_t k = 0; k < N; ++k) row[k] = row[k] / s + eps;
    }
    auto col_norm = [&] {
      for (int64_t k = 0; k < N; ++k) {
        float s = 0;
        for (int64_t j = 0; j < N; ++j) s += C[j * N + k];
        for (int64_t j = 0; j < N; ++j) C[j * N + k] /= s + eps;
      }
    };
    auto row_norm = [&] {
      for (int64_t j = 0; j < N; ++j) {
        float s = 0;
        for (int64_t k = 0; k < N; ++k) s += C[j * N + k];
        for (int64_t k = 0; k < N; ++k) C[j * N + k] /= s + eps;
      }
    };
    col_norm();
    for (int64_t it = 1; it < c.hc_sinkhorn_iters; ++it) {
      row_norm();
      col_norm();
    }
    const float* x = X.f32() + t * N * d;
    float* o = u.f32() + t * d;
    for (int64_t i = 0; i < d; ++i) {
      float s = 0;
      for (int64_t j = 0; j < N; ++j) s += pre[size_t(j)] * x[j * d + i];
      o[i] = s;
    }
  }
}

void v4_hc_post(const V4Config& c, Tensor& X_out, const Tensor& X, const Tensor& f, const std::vector<float>& post,
                const std::vector<float>& comb) {
  const int64_t T = X.dim(0), N = c.hc_mult, d = c.hidden_size;
#pragma omp parallel for schedule(static) if (T * N * d > 65536)
  for (int64_t t = 0; t < T; ++t) {
    const float* x = X.f32() + t * N * d;
    const float* fo = f.f32() + t * d;
    const float* C = comb.data() + t * N * N;
    for (int64_t k = 0; k < N; ++k) {
      float* o = X_out.f32() + (t * N + k) * d;
      const float pk = post[size_t(t * N + k)];
      for (int64_t i = 0; i < d; ++i) {
        float s = 0;
        for (int64_t j = 0; j < N; ++j) s += C[j * N + k] * x[j * d + i];
        o[i] = pk * fo[i] + s;
      }
    }
  }
}

void v4_hc_head(Backend& be, const V4Config& c, const Tensor& fn, const Tensor& base, const Tensor& scale,
                const Tensor& X, Tensor& h) {
  const int64_t T = X.dim(0), N = c.hc_mult, d = c.hidden_size;
  Tensor mu = hc_mix(be, c, fn, X);  // [T, N]
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> pre(static_cast<size_t>(N));
    for (int64_t j = 0; j < N; ++j)
      pre[size_t(j)] = sigmoid(mu.f32()[t * N + j] * scale.f32()[0] + base.f32()[j]) + float(c.hc_eps);
    const float* x = X.f32() + t * N * d;
    float* o = h.f32() + t * d;
    for (int64_t i = 0; i < d; ++i) {
      float s = 0;
      for (int64_t j = 0; j < N; ++j) s += pre[size_t(j)] * x[j * d + i];
      o[i] = s;
    }
  }
}

}  // namespace dsv3
