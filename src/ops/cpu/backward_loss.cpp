// Cross-entropy over logits rows, forward and backward in one pass (the logits are not needed afterwards,
// so the gradient may overwrite them). Accumulation: dlogits is overwritten.
#include <cmath>
#include <vector>

#include "ops/cpu/train_ops.h"

namespace dsv3::cpu {

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
    int64_t arg = 0;
    T mx = z[0];
    for (int64_t v = 1; v < V; ++v)
      if (z[v] > mx) mx = z[v], arg = v;
    const T zy = z[y];
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) {  // z[v] is read before dz[v] (which may alias it) is written
      const T e = std::exp(z[v] - mx);
      sum += double(e);
      dz[v] = e;
    }
    row_loss[t] = double(mx) + std::log(sum) - double(zy);
    hit[t] = arg == y;
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
