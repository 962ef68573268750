// RMSNorm, RoPE, SwiGLU and embedding: forward (saving what the backward needs) and backward.
// Accumulation: rmsnorm_backward dx +=, dw +=; embedding_backward dtable +=; rope_backward is in place;
// swiglu_backward overwrites dg and du.
// Determinism: reductions over rows use fixed chunks of rows summed in chunk order, so results do not
// depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include <type_traits>

#include "ops/cpu/train_ops.h"
#include "ops/cpu/vec_math.h"

namespace dsv3::cpu {

namespace {
constexpr int64_t kRowChunk = 64;
}

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* x, int64_t xs, const T* w, int64_t N, int64_t D, double eps) {
#pragma omp parallel for schedule(static) if (N * D > 16384)
  for (int64_t t = 0; t < N; ++t) {
    const T* xr = x + t * xs;
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i];
    const T r = T(1.0 / std::sqrt(ss / double(D) + eps));
    rstd[t] = r;
    T* o = out + t * D;
    for (int64_t i = 0; i < D; ++i) o[i] = w[i] * (xr[i] * r);
  }
}

// Forward: out_ti = w_i * x_ti * r_t, r_t = (mean_j x_tj^2 + eps)^-1/2.
// dw_i += sum_t dout_ti x_ti r_t
// dx_ti += r_t w_i dout_ti - r_t^3 / D * x_ti * sum_j (dout_tj w_j x_tj)
template <typename T>
void rmsnorm_backward(T* dx, int64_t dxs, T* dw, const T* dout, const T* x, int64_t xs, const T* rstd, const T* w,
                      int64_t N, int64_t D) {
  const int64_t nchunks = (N + kRowChunk - 1) / kRowChunk;
  std::vector<T> part(size_t(nchunks * D), T(0));
#pragma omp parallel for schedule(static) if (N * D > 16384)
  for (int64_t c = 0; c < nchunks; ++c) {
    T* pw = part.data() + c * D;
    for (int64_t t = c * kRowChunk; t < std::min(N, (c + 1) * kRowChunk); ++t) {
      const T* xr = x + t * xs;
      const T* dr = dout + t * D;
      const T r = rstd[t];
      T dot = 0;
      for (int64_t i = 0; i < D; ++i) {
        dot += dr[i] * w[i] * xr[i];
        pw[i] += dr[i] * xr[i] * r;
      }
      const T k = r * r * r * dot / T(D);
      T* dxr = dx + t * dxs;
      for (int64_t i = 0; i < D; ++i) dxr[i] += r * w[i] * dr[i] - k * xr[i];
    }
  }
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t i = 0; i < D; ++i) dw[i] += part[c * D + i];
}

// Rotates each pair (a, b) by its angle: a' = a c - b s, b' = b c + a s. The backward applies the transpose,
// the rotation by minus the angle (s -> -s): da = da' c + db' s, db = db' c - da' s.
template <typename T>
static void rope_rotate(T* x, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
                        const float* cos, const float* sin, bool interleave, bool inverse) {
  const int64_t half = dr / 2;
#pragma omp parallel for schedule(static) if (N * n > 256)
  for (int64_t t = 0; t < N; ++t) {
    const float* c = cos + int64_t(pos[t]) * half;
    const float* s = sin + int64_t(pos[t]) * half;
    for (int64_t h = 0; h < n; ++h) {
      T* v = x + (t * n + h) * stride + off;
      for (int64_t j = 0; j < half; ++j) {
        const int64_t i0 = interleave ? 2 * j : j, i1 = interleave ? 2 * j + 1 : j + half;
        const T a = v[i0], b = v[i1], sn = inverse ? -T(s[j]) : T(s[j]);
        v[i0] = a * T(c[j]) - b * sn;
        v[i1] = b * T(c[j]) + a * sn;
      }
    }
  }
}

template <typename T>
void rope_forward(T* x, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
                  const float* cos, const float* sin, bool interleave) {
  rope_rotate(x, N, n, stride, off, dr, pos, cos, sin, interleave, false);
}

template <typename T>
void rope_backward(T* dx, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
                   const float* cos, const float* sin, bool interleave) {
  rope_rotate(dx, N, n, stride, off, dr, pos, cos, sin, interleave, true);
}

template <typename T>
void swiglu_forward(T* out, const T* g, const T* u, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t nv = n / 8 * 8;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < nv; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid8(gv)), _mm256_loadu_ps(u + i)));
    }
    for (int64_t i = nv; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  } else {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
  }
}

// Forward: out = g * sig(g) * u. Backward: du = dout * g sig(g); dg = dout * u * sig(g) (1 + g (1 - sig(g))).
template <typename T>
void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t n) {
  int64_t nv = 0;
  if constexpr (std::is_same_v<T, float>) {
    nv = n / 8 * 8;
    const __m256 one = _mm256_set1_ps(1.f);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < nv; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i), uv = _mm256_loadu_ps(u + i), d = _mm256_loadu_ps(dout + i);
      const __m256 s = sigmoid8(gv);
      _mm256_storeu_ps(du + i, _mm256_mul_ps(d, _mm256_mul_ps(gv, s)));
      const __m256 k = _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one);  // 1 + g (1 - s)
      _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, uv), _mm256_mul_ps(s, k)));
    }
  }
#pragma omp parallel for schedule(static) if (n - nv > 65536)
  for (int64_t i = nv; i < n; ++i) {
    const T s = T(1) / (T(1) + std::exp(-g[i]));
    const T d = dout[i], gi = g[i], ui = u[i];
    du[i] = d * gi * s;
    dg[i] = d * ui * s * (T(1) + gi * (T(1) - s));
  }
}

template <typename T>
void embedding_forward(T* out, const T* table, const int32_t* ids, int64_t N, int64_t H) {
#pragma omp parallel for schedule(static) if (N * H > 65536)
  for (int64_t t = 0; t < N; ++t) std::copy(table + int64_t(ids[t]) * H, table + int64_t(ids[t] + 1) * H, out + t * H);
}

// Forward: out[t] = table[ids[t]]. Backward: dtable[ids[t]] += dout[t], tokens in order; each thread owns a
// block of columns, so repeated ids never race and the sum order is fixed.
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* ids, int64_t N, int64_t H) {
  const int64_t cb = 32, nb = (H + cb - 1) / cb;
#pragma omp parallel for schedule(static) if (N * H > 65536)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t c0 = b * cb, c1 = std::min(H, c0 + cb);
    for (int64_t t = 0; t < N; ++t) {
      T* d = dtable + int64_t(ids[t]) * H;
      const T* g = dout + t * H;
      for (int64_t c = c0; c < c1; ++c) d[c] += g[c];
    }
  }
}

#define DSV3_INSTANTIATE(T)                                                                                      \
  template void rmsnorm_forward<T>(T*, T*, const T*, int64_t, const T*, int64_t, int64_t, double);               \
  template void rmsnorm_backward<T>(T*, int64_t, T*, const T*, const T*, int64_t, const T*, const T*, int64_t,   \
                                    int64_t);                                                                    \
  template void rope_forward<T>(T*, int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*, const float*,   \
                                const float*, bool);                                                             \
  template void rope_backward<T>(T*, int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*, const float*,  \
                                 const float*, bool);                                                            \
  template void swiglu_forward<T>(T*, const T*, const T*, int64_t);                                              \
  template void swiglu_backward<T>(T*, T*, const T*, const T*, const T*, int64_t);                               \
  template void embedding_forward<T>(T*, const T*, const int32_t*, int64_t, int64_t);                            \
  template void embedding_backward<T>(T*, const T*, const int32_t*, int64_t, int64_t);
DSV3_INSTANTIATE(float)
DSV3_INSTANTIATE(double)
#undef DSV3_INSTANTIATE

}  // namespace dsv3::cpu
