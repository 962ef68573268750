// RMSNorm and rotary embedding on the CPU (fp32).
#include <cmath>

#include "ops/cpu/cpu_ops.h"

namespace dsv3::cpu {

void rmsnorm(float* out, const float* x, int64_t x_stride, const Tensor& w, int64_t T, int64_t D, float eps) {
  DSV3_CHECK(w.dtype == DType::F32 || w.dtype == DType::BF16, "rmsnorm weight dtype");
  const bool bf = w.dtype == DType::BF16;
#pragma omp parallel for schedule(static) if (T * D > 16384)
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * x_stride;
    double ss = 0;  // fp64 sum: cheap here, and keeps long rows exact to fp32 rounding
    for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i];
    float r = float(1.0 / std::sqrt(ss / double(D) + eps));
    float* o = out + t * D;
    if (bf) {
      auto wp = w.ptr<uint16_t>();
      for (int64_t i = 0; i < D; ++i) o[i] = bf16_to_f32(wp[i]) * (xr[i] * r);
    } else {
      auto wp = w.ptr<float>();
      for (int64_t i = 0; i < D; ++i) o[i] = wp[i] * (xr[i] * r);
    }
  }
}

void rope(float* x, int64_t T, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
          const float* cos, const float* sin, bool interleave) {
  const int64_t half = dr / 2;
#pragma omp parallel for schedule(static) if (T * n > 256)
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cos + int64_t(pos[t]) * half;
    const float* s = sin + int64_t(pos[t]) * half;
    for (int64_t h = 0; h < n; ++h) {
      float* v = x + (t * n + h) * stride + off;
      for (int64_t j = 0; j < half; ++j) {
        // Interleaved (DeepSeek): pairs (2j, 2j+1). Otherwise (NeoX): pairs (j, j + half).
        int64_t i0 = interleave ? 2 * j : j, i1 = interleave ? 2 * j + 1 : j + half;
        float a = v[i0], b = v[i1];
        v[i0] = a * c[j] - b * s[j];
        v[i1] = b * c[j] + a * s[j];
      }
    }
  }
}

}  // namespace dsv3::cpu
