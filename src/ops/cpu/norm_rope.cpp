// RMSNorm and rotary embedding on the CPU (fp32).
#include <cmath>

#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/train_ops.h"

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
  // Interleaved (DeepSeek): pairs (2j, 2j+1); otherwise (NeoX) pairs (j, j + dr/2). One implementation,
  // shared with training (ops/cpu/backward_norm.cpp holds the forward/backward pair).
  rope_forward<float>(x, T, n, stride, off, dr, pos, cos, sin, interleave);
}

}  // namespace dsv3::cpu
