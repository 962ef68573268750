#pragma once
// FP8 training products on the CPU, emulated exactly: each operand is fake-quantized with the tiles of the
// DeepSeek-V3 recipe (core/fp8.h), then multiplied in fp32 (cpu::gemm). Shapes as in blas.h's linear_*:
//   Fprop  y[M, N]   = q1x128(x)[M, K] q128x128(W)[N, K]^T
//   Dgrad  dx[M, K] (= or +=) q1x128(dy)[M, N] q128x128(W)[N, K]        (dy tiles run along N)
//   Wgrad  dW[N, K] += q128x1(dy)^T q128x1(x)                            (tiles of 128 tokens along M)
#include <cstdint>

namespace dsv3::cpu {

void fp8_linear_forward(float* y, const float* x, const float* W, int64_t M, int64_t N, int64_t K);
void fp8_linear_backward(float* dx, bool dx_accumulate, float* dW, const float* dy, const float* x, const float* W,
                         int64_t M, int64_t N, int64_t K);

}  // namespace dsv3::cpu
