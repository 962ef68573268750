// Cross-entropy over logits rows, forward and backward in one pass (the logits are not needed afterwards,
// so the gradient may overwrite them). Accumulation: dlogits is overwritten.
#include <immintrin.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "ops/cpu/train_ops.h"
#include "ops/cpu/vec_math.h"

namespace dsv3::cpu {

namespace {

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One float row: writes exp(z - max) into dz (may alias z), returns the max and the sum of the exps.
inline void row_exp(float* dz, const float* z, int64_t V, float* mx_out, double* sum_out) {
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  int64_t v = 0;
  for (; v + 8 <= V; v += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(z + v));
  float mx = hmax8(m8);
  for (; v < V; ++v) mx = std::max(mx, z[v]);
  __m256 s8 = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(mx);
  for (v = 0; v + 8 <= V; v += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + v), mv));
    s8 = _mm256_add_ps(s8, e);
    _mm256_storeu_ps(dz + v, e);
  }
  double sum = hsum8(s8);
  for (; v < V; ++v) sum += (dz[v] = std::exp(z[v] - mx));
  *mx_out = mx;
  *sum_out = sum;
}

}  // namespace

// Forward: loss_t = log sum_v exp(z_tv) - z_t,target.
// Backward: dz_tv = scale * (softmax(z_t)_v - [v == target]).
template <typename T>
double cross_entropy_forward_backward(T* dlogits, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                                      double scale, int64_t* correct) {
  std::vector<double> row_loss(N, 0.0);
  std::vector<char> hit(N, 0);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    const T* z = logits + t * V;
    T* dz = dlogits + t * V;
    const int32_t y = targets[t];
    if (y < 0) {
      for (int64_t v = 0; v < V; ++v) dz[v] = T(0);
      continue;
    }
    const T zy = z[y];
    T mx = z[0];
    double sum = 0;
    if constexpr (std::is_same_v<T, float>) {
      row_exp(dz, z, V, &mx, &sum);  // z is dead after this when dz aliases it; only its max and z[y] are kept
      hit[t] = zy == mx;             // the target is (one of) the argmax
    } else {
      int64_t arg = 0;
      for (int64_t v = 1; v < V; ++v)
        if (z[v] > mx) mx = z[v], arg = v;
      for (int64_t v = 0; v < V; ++v) {  // z[v] is read before dz[v] (which may alias it) is written
        const T e = std::exp(z[v] - mx);
        sum += double(e);
        dz[v] = e;
      }
      hit[t] = arg == y;
    }
    row_loss[t] = double(mx) + std::log(sum) - double(zy);
    const T k = T(scale / sum);
    for (int64_t v = 0; v < V; ++v) dz[v] *= k;
    dz[y] -= T(scale);
  }
  double total = 0;
  int64_t c = 0;
  for (int64_t t = 0; t < N; ++t) total += row_loss[t], c += hit[t];
  if (correct) *correct = c;
  return total;
}

template double cross_entropy_forward_backward<float>(float*, const float*, const int32_t*, int64_t, int64_t, double,
                                                      int64_t*);
template double cross_entropy_forward_backward<double>(double*, const double*, const int32_t*, int64_t, int64_t,
                                                       double, int64_t*);

}  // namespace dsv3::cpu
