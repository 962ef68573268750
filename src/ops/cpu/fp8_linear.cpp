#include "ops/cpu/fp8_linear.h"

#include <vector>

#include "core/fp8.h"
#include "ops/cpu/blas.h"

namespace dsv3::cpu {

namespace {

std::vector<float> copy_of(const float* p, int64_t n) { return std::vector<float>(p, p + n); }

}  // namespace

void fp8_linear_forward(float* y, const float* x, const float* W, int64_t M, int64_t N, int64_t K) {
  std::vector<float> xq = copy_of(x, M * K), wq = copy_of(W, N * K);
  fp8::round_trip_1x128(xq.data(), M, K, K);
  fp8::round_trip_128x128(wq.data(), N, K);
  gemm(false, true, M, N, K, 1.f, xq.data(), K, wq.data(), K, 0.f, y, N);
}

void fp8_linear_backward(float* dx, bool dx_accumulate, float* dW, const float* dy, const float* x, const float* W,
                         int64_t M, int64_t N, int64_t K) {
  if (dx) {
    std::vector<float> dyq = copy_of(dy, M * N), wq = copy_of(W, N * K);
    fp8::round_trip_1x128(dyq.data(), M, N, N);
    fp8::round_trip_128x128(wq.data(), N, K);
    gemm(false, false, M, K, N, 1.f, dyq.data(), N, wq.data(), K, dx_accumulate ? 1.f : 0.f, dx, K);
  }
  if (dW) {
    std::vector<float> dyt = copy_of(dy, M * N), xt = copy_of(x, M * K);
    fp8::round_trip_128x1(dyt.data(), M, N, N);
    fp8::round_trip_128x1(xt.data(), M, K, K);
    gemm(true, false, N, K, M, 1.f, dyt.data(), N, xt.data(), K, 1.f, dW, K);
  }
}

}  // namespace dsv3::cpu
