#pragma once
// The operands of the infer-m prefill routed experts (2048 tokens, top-6 of 64 experts, H 2048, I 1408) for the
// grouped-GEMM benchmarks (gpu_grouped_bench, bench/sm90_tiles), in bf16 and in FP8: random rows and weights,
// their 1x128 / 128x128 quantizations, and the weight scales transposed for the sm90 kernels. CUDA builds only.
#include <cuda_runtime.h>

#include <tuple>

#include "core/fp8.h"
#include "ops/backend.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/fp8.h"
#include "ops/cuda/sm90/grouped.h"

namespace dsv3::bench {

struct InferMExperts {
  static constexpr int64_t T = 2048, E = 64, H = 2048, I = 1408;
  static constexpr int topk = 6;
  static constexpr int64_t P = T * topk;
  const int64_t kh = fp8::tiles(H), ki = fp8::tiles(I);
  Tensor x, a, gw, uw, dw;    // bf16 rows [P, H], activations [P, I], weights [E, I, H] x2 and [E, H, I]
  Tensor g, u, y;             // bf16 outputs [P, I] x2, [P, H]
  Tensor xq, sx, aq, sa;      // e4m3 codes and 1x128 scales of x and a ([P, kt] layout)
  Tensor sxg, sag;            // the same scales regrouped per expert (filled per routing by the caller)
  Tensor gq, gs, uq, us, dq, ds;  // e4m3 weights and their 128x128 scales
  Tensor gst, ust, dst;       // the weight scales transposed for the sm90 kernels (when sm90)

  InferMExperts(Backend& be, cudaStream_t s, bool sm90) {
    x = be.alloc(DType::BF16, {P, H}, "x"), a = be.alloc(DType::BF16, {P, I}, "act");
    gw = be.alloc(DType::BF16, {E, I, H}, "gate"), uw = be.alloc(DType::BF16, {E, I, H}, "up");
    dw = be.alloc(DType::BF16, {E, H, I}, "down");
    for (Tensor* t : {&x, &a}) be.fill_normal(*t, 0.f, 1.f, 11);
    for (Tensor* t : {&gw, &uw, &dw}) be.fill_normal(*t, 0.f, 0.02f, 12);
    g = be.alloc(DType::BF16, {P, I}, "g"), u = be.alloc(DType::BF16, {P, I}, "u");
    y = be.alloc(DType::BF16, {P, H}, "y");
    xq = be.alloc(DType::U8, {P, H}, "xq"), sx = be.alloc(DType::F32, {P * kh}, "sx");
    aq = be.alloc(DType::U8, {P, I}, "aq"), sa = be.alloc(DType::F32, {P * ki}, "sa");
    sxg = be.alloc(DType::F32, {P * kh}, "sxg"), sag = be.alloc(DType::F32, {P * ki}, "sag");
    cuda::quantize_1x128(xq.ptr<uint8_t>(), sx.f32(), 0, x.data, DType::BF16, H, P, H, s);
    cuda::quantize_1x128(aq.ptr<uint8_t>(), sa.f32(), 0, a.data, DType::BF16, I, P, I, s);
    std::tie(gq, gs) = cuda::quantize_weight_fp8(be, gw);
    std::tie(uq, us) = cuda::quantize_weight_fp8(be, uw);
    std::tie(dq, ds) = cuda::quantize_weight_fp8(be, dw);
    gst = be.alloc(DType::F32, {E * ki * kh}, "gst"), ust = be.alloc(DType::F32, {E * ki * kh}, "ust");
    dst = be.alloc(DType::F32, {E * kh * ki}, "dst");
    if (sm90) {
      cuda::sm90::transpose_block_scales(gst.f32(), gs.f32(), E, ki, kh, s);
      cuda::sm90::transpose_block_scales(ust.f32(), us.f32(), E, ki, kh, s);
      cuda::sm90::transpose_block_scales(dst.f32(), ds.f32(), E, kh, ki, s);
    }
  }
};

}  // namespace dsv3::bench
