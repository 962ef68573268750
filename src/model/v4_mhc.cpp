// Manifold-constrained hyper-connections (mHC). The residual is N streams per token; before each block the
// streams are collapsed into the block input with weights `pre`, after it the block output is spread back
// with `post` and the streams are mixed by `comb`, a matrix pushed towards doubly stochastic by Sinkhorn
// iterations (so the mixing cannot grow the residual's norm across many layers). All three come from one
// projection of the RMS-normalized, flattened streams. Order of the Sinkhorn steps follows the reference code,
// not the paper's prose: row softmax + eps, column normalization, then (iters - 1) x (row, column).
#include <cmath>

#include "model/v4_kernels.h"
#include "model/v4_parts.h"

namespace dsv3 {

namespace {
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
  for (int64_t t = 0; t < rows; ++t) v4k::rms_row(x + t * D, x + t * D, D, eps);
}

void v4_hc_pre(Backend& be, const V4Config& c, const V4HcWeights& w, const Tensor& X, Tensor& u,
               std::vector<float>& post, std::vector<float>& comb) {
  const int64_t T = X.dim(0), N = c.hc_mult, d = c.hidden_size, R = (2 + N) * N;
  Tensor mu = hc_mix(be, c, w.fn, X);  // [T, (2 + N) N]
  post.assign(size_t(T * N), 0.f);
  comb.assign(size_t(T * N * N), 0.f);
  u = v4_new(be, {T, d}, "hc_collapsed");
  std::vector<float> pre(static_cast<size_t>(N));
  for (int64_t t = 0; t < T; ++t) {
    v4k::hc_weights(pre.data(), post.data() + t * N, comb.data() + t * N * N, mu.f32() + t * R, w.base.f32(),
                    w.scale.f32(), N, c.hc_sinkhorn_iters, float(c.hc_eps));
    v4k::hc_collapse(u.f32() + t * d, pre.data(), X.f32() + t * N * d, N, d);
  }
}

void v4_hc_post(const V4Config& c, Tensor& X_out, const Tensor& X, const Tensor& f, const std::vector<float>& post,
                const std::vector<float>& comb) {
  const int64_t T = X.dim(0), N = c.hc_mult, d = c.hidden_size;
#pragma omp parallel for schedule(static) if (T * N * d > 65536)
  for (int64_t t = 0; t < T; ++t)
    v4k::hc_expand(X_out.f32() + t * N * d, X.f32() + t * N * d, f.f32() + t * d, post.data() + t * N,
                   comb.data() + t * N * N, N, d);
}

void v4_hc_head(Backend& be, const V4Config& c, const Tensor& fn, const Tensor& base, const Tensor& scale,
                const Tensor& X, Tensor& h) {
  const int64_t T = X.dim(0), N = c.hc_mult, d = c.hidden_size;
  Tensor mu = hc_mix(be, c, fn, X);  // [T, N]
  std::vector<float> pre(static_cast<size_t>(N));
  for (int64_t t = 0; t < T; ++t) {
    v4k::hc_head_weights(pre.data(), mu.f32() + t * N, base.f32(), scale.f32(), N, float(c.hc_eps));
    v4k::hc_collapse(h.f32() + t * d, pre.data(), X.f32() + t * N * d, N, d);
  }
}

}  // namespace dsv3
