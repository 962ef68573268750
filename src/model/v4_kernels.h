#pragma once
// The DeepSeek-V4-specific math of one token (or one query head, one channel), each as a forward / backward
// pair, templated on the float type: the inference forward (v4_*.cpp) runs the float instantiation, the
// trainer (train/v4_train_model.cpp) runs the same functions and their backward, and the finite-difference
// tests (tests/test_v4_backward.cpp) run both in double. Each backward comment restates the forward line it
// differentiates. Accumulation: gradients of inputs that several terms feed say `+=`; the others are `=`.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace dsv3::v4k {

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// ---- Sinkhorn projection of the mHC residual mixing, one N x N matrix (row j = input stream, column k = output).
// C = softmax_k(A) + eps; C /= colsum + eps; then (iters - 1) x { C /= rowsum + eps; C /= colsum + eps }.
// trace (optional) [2 iters - 1, N*N]: the matrix before each normalization, for the backward.
template <typename T>
void sinkhorn(T* C, const T* A, int64_t N, int64_t iters, T eps, T* trace = nullptr) {
  for (int64_t j = 0; j < N; ++j) {
    T* row = C + j * N;
    T mx = -INFINITY;
    for (int64_t k = 0; k < N; ++k) mx = std::max(mx, row[k] = A[j * N + k]);
    T s = 0;
    for (int64_t k = 0; k < N; ++k) s += (row[k] = std::exp(row[k] - mx));
    for (int64_t k = 0; k < N; ++k) row[k] = row[k] / s + eps;
  }
  const int64_t steps = 2 * iters - 1;
  for (int64_t i = 0; i < steps; ++i) {
    if (trace) std::copy_n(C, N * N, trace + i * N * N);
    const bool col = i % 2 == 0;  // step 0 columns, then rows / columns alternating
    for (int64_t a = 0; a < N; ++a) {
      T s = 0;
      for (int64_t b = 0; b < N; ++b) s += col ? C[b * N + a] : C[a * N + b];
      for (int64_t b = 0; b < N; ++b) (col ? C[b * N + a] : C[a * N + b]) /= s + eps;
    }
  }
}
// dA (=) from dC: backward through each normalization y = x / (s + eps), s = sum of x along the axis:
// dx = dy / (s + eps) - sum_axis(dy x) / (s + eps)^2, then through the row softmax: dA = P (dP - sum_k dP P).
template <typename T>
void sinkhorn_backward(T* dA, const T* dC, const T* A, int64_t N, int64_t iters, T eps) {
  const int64_t steps = 2 * iters - 1;
  std::vector<T> trace(static_cast<size_t>(steps * N * N)), C(static_cast<size_t>(N * N)), g(dC, dC + N * N);
  sinkhorn(C.data(), A, N, iters, eps, trace.data());
  for (int64_t i = steps - 1; i >= 0; --i) {
    const T* x = trace.data() + i * N * N;
    const bool col = i % 2 == 0;
    for (int64_t a = 0; a < N; ++a) {
      T s = 0, dyx = 0;
      for (int64_t b = 0; b < N; ++b) {
        const int64_t e = col ? b * N + a : a * N + b;
        s += x[e];
        dyx += g[static_cast<size_t>(e)] * x[e];
      }
      const T den = s + eps;
      for (int64_t b = 0; b < N; ++b) {
        const int64_t e = col ? b * N + a : a * N + b;
        g[static_cast<size_t>(e)] = g[static_cast<size_t>(e)] / den - dyx / (den * den);
      }
    }
  }
  // The softmax: P = trace[0] - eps.
  for (int64_t j = 0; j < N; ++j) {
    T dot = 0;
    for (int64_t k = 0; k < N; ++k) dot += g[static_cast<size_t>(j * N + k)] * (trace[static_cast<size_t>(j * N + k)] - eps);
    for (int64_t k = 0; k < N; ++k) dA[j * N + k] = (trace[static_cast<size_t>(j * N + k)] - eps) * (g[static_cast<size_t>(j * N + k)] - dot);
  }
}

// ---- mHC weights of one token from its mix mu [(2 + N) N] (= fn . rms(streams)), base [(2 + N) N], scale [3]:
// pre_j = sigmoid(a_pre mu_j + base_j) + eps;  post_j = 2 sigmoid(a_post mu_{N+j} + base_{N+j});
// comb = sinkhorn(a_res mu_{2N..} + base_{2N..}).
template <typename T>
void hc_weights(T* pre, T* post, T* comb, const T* mu, const T* base, const T* scale, int64_t N, int64_t iters,
                T eps) {
  for (int64_t j = 0; j < N; ++j) {
    pre[j] = sigmoid(mu[j] * scale[0] + base[j]) + eps;
    post[j] = T(2) * sigmoid(mu[N + j] * scale[1] + base[N + j]);
  }
  std::vector<T> A(static_cast<size_t>(N * N));
  for (int64_t e = 0; e < N * N; ++e) A[static_cast<size_t>(e)] = mu[2 * N + e] * scale[2] + base[2 * N + e];
  sinkhorn(comb, A.data(), N, iters, eps);
}
// dmu (=), dbase (+=), dscale (+=) from dpre [N], dpost [N], dcomb [N*N].
template <typename T>
void hc_weights_backward(T* dmu, T* dbase, T* dscale, const T* dpre, const T* dpost, const T* dcomb, const T* mu,
                         const T* base, const T* scale, int64_t N, int64_t iters, T eps) {
  for (int64_t j = 0; j < N; ++j) {
    const T sp = sigmoid(mu[j] * scale[0] + base[j]), zp = dpre[j] * sp * (1 - sp);
    dmu[j] = zp * scale[0], dbase[j] += zp, dscale[0] += zp * mu[j];
    const T so = sigmoid(mu[N + j] * scale[1] + base[N + j]), zo = dpost[j] * 2 * so * (1 - so);
    dmu[N + j] = zo * scale[1], dbase[N + j] += zo, dscale[1] += zo * mu[N + j];
  }
  std::vector<T> A(static_cast<size_t>(N * N)), dA(static_cast<size_t>(N * N));
  for (int64_t e = 0; e < N * N; ++e) A[static_cast<size_t>(e)] = mu[2 * N + e] * scale[2] + base[2 * N + e];
  sinkhorn_backward(dA.data(), dcomb, A.data(), N, iters, eps);
  for (int64_t e = 0; e < N * N; ++e) {
    dmu[2 * N + e] = dA[static_cast<size_t>(e)] * scale[2], dbase[2 * N + e] += dA[static_cast<size_t>(e)];
    dscale[2] += dA[static_cast<size_t>(e)] * mu[2 * N + e];
  }
}

// ---- the head's collapse weights: pre_j = sigmoid(scale mu_j + base_j) + eps (mu [N], scale [1]).
template <typename T>
void hc_head_weights(T* pre, const T* mu, const T* base, const T* scale, int64_t N, T eps) {
  for (int64_t j = 0; j < N; ++j) pre[j] = sigmoid(mu[j] * scale[0] + base[j]) + eps;
}
template <typename T>
void hc_head_weights_backward(T* dmu, T* dbase, T* dscale, const T* dpre, const T* mu, const T* base, const T* scale,
                              int64_t N) {
  for (int64_t j = 0; j < N; ++j) {
    const T s = sigmoid(mu[j] * scale[0] + base[j]), z = dpre[j] * s * (1 - s);
    dmu[j] = z * scale[0], dbase[j] += z, dscale[0] += z * mu[j];
  }
}

// ---- collapse u [d] = sum_j pre_j X_j (X [N, d]).
template <typename T>
void hc_collapse(T* u, const T* pre, const T* X, int64_t N, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    T s = 0;
    for (int64_t j = 0; j < N; ++j) s += pre[j] * X[j * d + i];
    u[i] = s;
  }
}
// dpre_j (=) = <du, X_j>;  dX_j += pre_j du.
template <typename T>
void hc_collapse_backward(T* dpre, T* dX, const T* du, const T* pre, const T* X, int64_t N, int64_t d) {
  for (int64_t j = 0; j < N; ++j) {
    T s = 0;
    for (int64_t i = 0; i < d; ++i) s += du[i] * X[j * d + i], dX[j * d + i] += pre[j] * du[i];
    dpre[j] = s;
  }
}

// ---- expand Xo_k [d] = post_k f + sum_j comb_jk X_j (X, Xo [N, d]; f [d]).
template <typename T>
void hc_expand(T* Xo, const T* X, const T* f, const T* post, const T* comb, int64_t N, int64_t d) {
  for (int64_t k = 0; k < N; ++k) {
    T* o = Xo + k * d;
    for (int64_t i = 0; i < d; ++i) {
      T s = 0;
      for (int64_t j = 0; j < N; ++j) s += comb[j * N + k] * X[j * d + i];
      o[i] = post[k] * f[i] + s;
    }
  }
}
// dX_j (=) = sum_k comb_jk dXo_k;  df (=) = sum_k post_k dXo_k;  dpost_k (=) = <dXo_k, f>;  dcomb_jk (=) = <dXo_k, X_j>.
template <typename T>
void hc_expand_backward(T* dX, T* df, T* dpost, T* dcomb, const T* dXo, const T* X, const T* f, const T* post,
                        const T* comb, int64_t N, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    T s = 0;
    for (int64_t k = 0; k < N; ++k) s += post[k] * dXo[k * d + i];
    df[i] = s;
  }
  for (int64_t k = 0; k < N; ++k) {
    T s = 0;
    for (int64_t i = 0; i < d; ++i) s += dXo[k * d + i] * f[i];
    dpost[k] = s;
    for (int64_t j = 0; j < N; ++j) {
      T c = 0;
      for (int64_t i = 0; i < d; ++i) c += dXo[k * d + i] * X[j * d + i];
      dcomb[j * N + k] = c;
    }
  }
  for (int64_t j = 0; j < N; ++j)
    for (int64_t i = 0; i < d; ++i) {
      T s = 0;
      for (int64_t k = 0; k < N; ++k) s += comb[j * N + k] * dXo[k * d + i];
      dX[j * d + i] = s;
    }
}

// ---- unweighted RMSNorm of one row of D values: y = x r, r = 1 / sqrt(mean(x^2) + eps) (sum in double).
template <typename T>
T rms_row(T* y, const T* x, int64_t D, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < D; ++i) ss += double(x[i]) * double(x[i]);
  const T r = T(1.0 / std::sqrt(ss / double(D) + eps));
  for (int64_t i = 0; i < D; ++i) y[i] = x[i] * r;
  return r;
}
// dx += r g - x r^3 (g . x) / D.
template <typename T>
void rms_row_backward(T* dx, const T* g, const T* x, T r, int64_t D) {
  T dot = 0;
  for (int64_t i = 0; i < D; ++i) dot += g[i] * x[i];
  const T c = dot * r * r * r / T(D);
  for (int64_t i = 0; i < D; ++i) dx[i] += r * g[i] - x[i] * c;
}

// ---- attention of one query head over nk keys (= values) with a sink logit:
// z_j = scale q . k_j;  p = softmax([z, sink]) without the sink column;  o = sum_j p_j k_j.
// p [nk] saved; returns the sink's probability.
template <typename T>
T sink_attention(T* o, T* p, const T* q, const T* const* keys, int64_t nk, T sink, T scale, int64_t hd) {
  T mx = sink;
  for (int64_t j = 0; j < nk; ++j) {
    T s = 0;
    for (int64_t i = 0; i < hd; ++i) s += q[i] * keys[j][i];
    p[j] = s * scale;
    mx = std::max(mx, p[j]);
  }
  T den = std::exp(sink - mx);
  const T es = den;
  for (int64_t j = 0; j < nk; ++j) den += (p[j] = std::exp(p[j] - mx));
  std::fill(o, o + hd, T(0));
  for (int64_t j = 0; j < nk; ++j) {
    p[j] = p[j] / den;
    for (int64_t i = 0; i < hd; ++i) o[i] += p[j] * keys[j][i];
  }
  return es / den;
}
// With g = dL/do: delta_j = g . k_j, mean = sum_j p_j delta_j, dz_j = p_j (delta_j - mean);
// dq += scale sum_j dz_j k_j;  dk_j += p_j g + scale dz_j q;  dsink += -p_sink mean.
template <typename T>
void sink_attention_backward(T* dq, T* const* dkeys, T* dsink, const T* g, const T* p, T p_sink, const T* q,
                             const T* const* keys, int64_t nk, T scale, int64_t hd) {
  std::vector<T> delta(static_cast<size_t>(nk));
  T mean = 0;
  for (int64_t j = 0; j < nk; ++j) {
    T s = 0;
    for (int64_t i = 0; i < hd; ++i) s += g[i] * keys[j][i];
    delta[static_cast<size_t>(j)] = s;
    mean += p[j] * s;
  }
  for (int64_t j = 0; j < nk; ++j) {
    const T dz = p[j] * (delta[static_cast<size_t>(j)] - mean) * scale;
    for (int64_t i = 0; i < hd; ++i) {
      dq[i] += dz * keys[j][i];
      dkeys[j][i] += p[j] * g[i] + dz * q[i];
    }
  }
  *dsink += -p_sink * mean;
}

// ---- compressor pooling of one channel over n slots: P = softmax(z) (z may be -inf: weight 0), out = sum P_i v_i.
template <typename T>
T pool(T* P, const T* v, const T* z, int64_t n) {
  T mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, z[i]);
  T den = 0;
  for (int64_t i = 0; i < n; ++i) den += (P[i] = std::exp(z[i] - mx));
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += v[i] * (P[i] = P[i] / den);
  return s;
}
// dv_i (=) = P_i g;  dz_i (=) = P_i g (v_i - out).
template <typename T>
void pool_backward(T* dv, T* dz, T g, const T* P, const T* v, T out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dv[i] = P[i] * g, dz[i] = P[i] * g * (v[i] - out);
}

// ---- clamped SwiGLU: h = silu(min(g, L)) clamp(u, -L, L).
template <typename T>
inline T swiglu_clamped(T g, T u, T L) {
  const T a = std::min(g, L), b = std::clamp(u, -L, L);
  return a / (T(1) + std::exp(-a)) * b;
}
// dg = [g <= L] silu'(a) b dh;  du = [-L <= u <= L] silu(a) dh (the clamps pass the gradient at the bounds, as torch).
template <typename T>
inline void swiglu_clamped_backward(T* dg, T* du, T dh, T g, T u, T L) {
  const T a = std::min(g, L), b = std::clamp(u, -L, L), s = sigmoid(a);
  *dg = g <= L ? s * (1 + a * (1 - s)) * b * dh : T(0);
  *du = (u >= -L && u <= L) ? a * s * dh : T(0);
}

// ---- router score s = sqrt(softplus(l)) (softplus as torch: identity above 20), or sigmoid(l); and ds/dl.
template <typename T>
inline T route_score(T l, bool sigmoid_fn) {
  return sigmoid_fn ? sigmoid(l) : std::sqrt(l > T(20) ? l : std::log1p(std::exp(l)));
}
template <typename T>
inline T route_score_grad(T l, T s, bool sigmoid_fn) {
  if (sigmoid_fn) return s * (1 - s);
  return (l > T(20) ? T(1) : sigmoid(l)) / (2 * s);
}
// Learned selection (moe layers): idx [K] = the K experts of largest score + bias (ties: the lower id first).
template <typename T, typename B>
void route_select(int32_t* idx, const T* s, const B* bias, int64_t E, int64_t K) {
  std::vector<T> b(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) b[static_cast<size_t>(e)] = s[e] + T(bias[e]);
  std::vector<int32_t> ix(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) ix[static_cast<size_t>(e)] = int32_t(e);
  std::partial_sort(ix.begin(), ix.begin() + K, ix.end(), [&](int32_t a1, int32_t a2) {
    const T x = b[static_cast<size_t>(a1)], y = b[static_cast<size_t>(a2)];
    return x > y || (x == y && a1 < a2);
  });
  std::copy_n(ix.begin(), K, idx);
}
// Weights of the K chosen experts: w_k = rho s_k / (sum_k s_k + 1e-20).
template <typename T>
void route_weights(T* w, const T* s, int64_t K, T rho) {
  T sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += s[k];
  for (int64_t k = 0; k < K; ++k) w[k] = s[k] / (sum + T(1e-20)) * rho;
}
// ds_k (=) = rho / Z (dw_k - sum_i dw_i s_i / Z), Z = sum s + 1e-20.
template <typename T>
void route_weights_backward(T* ds, const T* dw, const T* s, int64_t K, T rho) {
  T Z = T(1e-20), dot = 0;
  for (int64_t k = 0; k < K; ++k) Z += s[k], dot += dw[k] * s[k];
  for (int64_t k = 0; k < K; ++k) ds[k] = rho / Z * (dw[k] - dot / Z);
}

}  // namespace dsv3::v4k
