// bf16 expert form of sm90/grouped.h: 128 x 256 x 64 tiles (two consumer warp groups of 64 x 256), no cluster.
// Why this tile: the expert products are N = 1408..7168 wide and a few hundred rows tall per expert, so a wide
// N tile halves the A re-reads and keeps the accumulator at 128 fp32 registers per thread.
#include "ops/cuda/sm90/grouped_impl.cuh"

namespace dsv3::cuda::sm90 {

namespace {
using F = detail::Family<cutlass::bfloat16_t, void, cutlass::bfloat16_t, cute::Shape<cute::_128, cute::_256, cute::_64>,
                         cute::Shape<cute::_1, cute::_1, cute::_1>, false>;
}

void expert_gemm_bf16(const ExpertGemm& g, void* ws, size_t ws_bytes, cudaStream_t s) {
  auto al = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  DSV3_CHECK(g.sets >= 1 && g.sets <= 2 && g.E > 0 && g.N > 0 && g.K > 0, "expert_gemm_bf16: E {} N {} K {} sets {}",
             g.E, g.N, g.K, g.sets);
  DSV3_CHECK(g.K % 8 == 0 && g.lda % 8 == 0 && g.ldd % 8 == 0 && g.w_stride % 8 == 0 && al(g.A) && al(g.W[0]) &&
                 al(g.D[0]) && (g.sets == 1 || (al(g.W[1]) && al(g.D[1]))),
             "expert_gemm_bf16: K {} lda {} ldd {} must be multiples of 8 and operands 16-byte aligned", g.K, g.lda,
             g.ldd);
  detail::run_expert<F>(g, ws, ws_bytes, s);
}

size_t detail::expert_workspace_bytes_bf16(int groups) { return F::workspace_bytes(groups); }

}  // namespace dsv3::cuda::sm90
