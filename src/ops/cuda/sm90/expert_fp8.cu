// FP8 expert form of sm90/grouped.h: CUTLASS's blockwise-scaled mainloop (1x128 activation scales, 128x128
// weight scales, each 128-deep K block's wgmma result scaled and added to fp32 registers: the promotion the
// DeepSeek-V3 report prescribes), 128 x 128 x 128 tiles, bf16 D.
#include "ops/cuda/sm90/grouped_impl.cuh"

namespace dsv3::cuda::sm90 {

namespace {
using F = detail::Family<cutlass::float_e4m3_t, void, cutlass::bfloat16_t, cute::Shape<cute::_128, cute::_128, cute::_128>,
                         cute::Shape<cute::_1, cute::_1, cute::_1>, true>;
}

void expert_gemm_fp8(const ExpertGemm& g, void* ws, size_t ws_bytes, cudaStream_t s) {
  auto al = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  DSV3_CHECK(g.sets >= 1 && g.sets <= 2 && g.E > 0 && g.N > 0 && g.K > 0, "expert_gemm_fp8: E {} N {} K {} sets {}",
             g.E, g.N, g.K, g.sets);
  DSV3_CHECK(g.K % 16 == 0 && g.lda % 16 == 0 && g.ldd % 8 == 0 && g.w_stride % 16 == 0 && al(g.A) && al(g.W[0]) &&
                 al(g.D[0]) && (g.sets == 1 || (al(g.W[1]) && al(g.D[1]))),
             "expert_gemm_fp8: K {} lda {} must be multiples of 16, ldd {} of 8, operands 16-byte aligned", g.K, g.lda,
             g.ldd);
  DSV3_CHECK(g.sa && g.sw[0] && (g.sets == 1 || g.sw[1]), "expert_gemm_fp8: missing scales");
  detail::run_expert<F>(g, ws, ws_bytes, s);
}

size_t detail::expert_workspace_bytes_fp8(int groups) { return F::workspace_bytes(groups); }

}  // namespace dsv3::cuda::sm90
