// Causal MLA attention core for training: B sequences of Tq tokens, every query attends to keys 0..i of its
// own sequence. The forward saves only the log-sum-exp of each score row; the backward recomputes the
// probabilities from it (as flash attention does), so memory is O(T) per head, not O(T^2).
// Work is split over (sequence, head) pairs; each pair owns its rows of q/kv/out, so there are no races.
// Accumulation: attention_backward overwrites dq, dkv and dkpe (the shared rope key's gradient is summed
// over heads in head order, so it is deterministic).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cpu/blas.h"
#include "ops/cpu/train_ops.h"
#include "ops/cpu/vec_math.h"

namespace dsv3::cpu {

namespace {

// S[Tq, Tq] = scale * (Qn Kn^T + Qp Kpe^T) for one (sequence, head).
// row[j] = exp(row[j] - sub) for j < n; returns the sum.
inline float exp_row(float* row, int64_t n, float sub) { return exp_sub_sum(row, n, sub); }
inline double exp_row(double* row, int64_t n, double sub) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += (row[j] = std::exp(row[j] - sub));
  return s;
}

// DSA: scores of keys outside query row r's selection become -inf; after the exponential (whose vector form
// clamps its argument) zero_unselected sets their probabilities to exactly 0.
template <typename T>
void mask_unselected(T* row, int64_t i, const int32_t* sel, int64_t K, int64_t r, std::vector<uint8_t>& keep) {
  if (!sel) return;
  keep.assign(size_t(i + 1), 0);
  for (int64_t k = 0; k < K; ++k) {
    const int32_t j = sel[r * K + k];
    if (j >= 0 && j <= i) keep[size_t(j)] = 1;
  }
  for (int64_t j = 0; j <= i; ++j)
    if (!keep[size_t(j)]) row[j] = -std::numeric_limits<T>::infinity();
}

template <typename T>
void zero_unselected(T* row, int64_t i, const int32_t* sel, const std::vector<uint8_t>& keep) {
  if (!sel) return;
  for (int64_t j = 0; j <= i; ++j)
    if (!keep[size_t(j)]) row[j] = T(0);
}

template <typename T>
void scores(T* S, const T* q, const T* kv, const T* kpe, int64_t Tq, int64_t qs, int64_t ks, int64_t dn,
            int64_t dr, T scale) {
  gemm(false, true, Tq, Tq, dn, scale, q, qs, kv, ks, T(0), S, Tq);
  gemm(false, true, Tq, Tq, dr, scale, q + dn, qs, kpe, dr, T(1), S, Tq);
}

}  // namespace

// Forward: S = scale (q_nope . k_nope + q_pe . k_pe), P = softmax over keys j <= i, out = P V.
template <typename T>
void attention_forward(T* out, T* lse, const T* q, const T* kv, const T* kpe, int64_t B, int64_t Tq, int64_t nh,
                       int64_t dn, int64_t dr, int64_t dv, double scale, const int32_t* sel, int64_t K) {
  const int64_t qs = nh * (dn + dr), ks = nh * (dn + dv), os = nh * dv;
#pragma omp parallel
  {
    std::vector<T> S(size_t(Tq * Tq));
    std::vector<uint8_t> keep;
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh, r0 = b * Tq;
      const T* qh = q + r0 * qs + h * (dn + dr);
      const T* kh = kv + r0 * ks + h * (dn + dv);
      scores(S.data(), qh, kh, kpe + r0 * dr, Tq, qs, ks, dn, dr, T(scale));
      T* l = lse + bh * Tq;
      for (int64_t i = 0; i < Tq; ++i) {
        T* row = S.data() + i * Tq;
        mask_unselected(row, i, sel, K, r0 + i, keep);
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, row[j]);
        T sum = exp_row(row, i + 1, mx);
        if (sel) {
          zero_unselected(row, i, sel, keep);
          sum = 0;
          for (int64_t j = 0; j <= i; ++j) sum += row[j];
        }
        const T inv = T(1) / sum;
        for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
        for (int64_t j = i + 1; j < Tq; ++j) row[j] = T(0);
        l[i] = mx + std::log(sum);
      }
      gemm(false, false, Tq, dv, Tq, T(1), S.data(), Tq, kh + dn, ks, T(0), out + r0 * os + h * dv, os);
    }
  }
}

// Backward of out = P V, P = softmax(S), S = scale (Qn Kn^T + Qp Kpe^T):
//   dV = P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O));
//   dQn = scale dS Kn;  dQp = scale dS Kpe;  dKn = scale dS^T Qn;  dKpe = sum_h scale dS^T Qp.
template <typename T>
void attention_backward(T* dq, T* dkv, T* dkpe, const T* dout, const T* out, const T* lse, const T* q, const T* kv,
                        const T* kpe, int64_t B, int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv,
                        double scale, const int32_t* sel, int64_t K) {
  const int64_t qs = nh * (dn + dr), ks = nh * (dn + dv), os = nh * dv;
  std::vector<T> dkpe_h(size_t(B * nh * Tq * dr));  // per-head partials of the shared key's gradient
  const T sc = T(scale);
#pragma omp parallel
  {
    std::vector<T> P(size_t(Tq * Tq)), dP(size_t(Tq * Tq)), D(Tq);
    std::vector<uint8_t> keep;
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < B * nh; ++bh) {
      const int64_t b = bh / nh, h = bh % nh, r0 = b * Tq;
      const T* qh = q + r0 * qs + h * (dn + dr);
      const T* kh = kv + r0 * ks + h * (dn + dv);
      const T* doh = dout + r0 * os + h * dv;
      const T* oh = out + r0 * os + h * dv;
      scores(P.data(), qh, kh, kpe + r0 * dr, Tq, qs, ks, dn, dr, sc);
      const T* l = lse + bh * Tq;
      for (int64_t i = 0; i < Tq; ++i) {
        T* row = P.data() + i * Tq;
        mask_unselected(row, i, sel, K, r0 + i, keep);
        exp_row(row, i + 1, l[i]);
        zero_unselected(row, i, sel, keep);
        for (int64_t j = i + 1; j < Tq; ++j) row[j] = T(0);
        T d = 0;
        for (int64_t c = 0; c < dv; ++c) d += doh[i * os + c] * oh[i * os + c];
        D[i] = d;
      }
      T* dkh = dkv + r0 * ks + h * (dn + dv);
      gemm(true, false, Tq, dv, Tq, T(1), P.data(), Tq, doh, os, T(0), dkh + dn, ks);       // dV
      gemm(false, true, Tq, Tq, dv, T(1), doh, os, kh + dn, ks, T(0), dP.data(), Tq);       // dP
      for (int64_t i = 0; i < Tq; ++i) {
        T* ds = dP.data() + i * Tq;
        const T* p = P.data() + i * Tq;
        for (int64_t j = 0; j <= i; ++j) ds[j] = p[j] * (ds[j] - D[i]);
        for (int64_t j = i + 1; j < Tq; ++j) ds[j] = T(0);
      }
      T* dqh = dq + r0 * qs + h * (dn + dr);
      gemm(false, false, Tq, dn, Tq, sc, dP.data(), Tq, kh, ks, T(0), dqh, qs);                 // dQn
      gemm(false, false, Tq, dr, Tq, sc, dP.data(), Tq, kpe + r0 * dr, dr, T(0), dqh + dn, qs);  // dQp
      gemm(true, false, Tq, dn, Tq, sc, dP.data(), Tq, qh, qs, T(0), dkh, ks);                  // dKn
      gemm(true, false, Tq, dr, Tq, sc, dP.data(), Tq, qh + dn, qs, T(0), dkpe_h.data() + bh * Tq * dr, dr);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    T* d = dkpe + b * Tq * dr;
    std::fill(d, d + Tq * dr, T(0));
    for (int64_t h = 0; h < nh; ++h) {
      const T* src = dkpe_h.data() + (b * nh + h) * Tq * dr;
      for (int64_t i = 0; i < Tq * dr; ++i) d[i] += src[i];
    }
  }
}

template void attention_forward<float>(float*, float*, const float*, const float*, const float*, int64_t, int64_t,
                                       int64_t, int64_t, int64_t, int64_t, double, const int32_t*, int64_t);
template void attention_forward<double>(double*, double*, const double*, const double*, const double*, int64_t,
                                        int64_t, int64_t, int64_t, int64_t, int64_t, double, const int32_t*, int64_t);
template void attention_backward<float>(float*, float*, float*, const float*, const float*, const float*,
                                        const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, double, const int32_t*, int64_t);
template void attention_backward<double>(double*, double*, double*, const double*, const double*, const double*,
                                         const double*, const double*, const double*, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, int64_t, double, const int32_t*, int64_t);

}  // namespace dsv3::cpu
