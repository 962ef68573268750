#pragma once
// One tile variant of the expert form: the production Family template with other tile/cluster/schedule choices.
#include "bench/sm90_tiles/tiles.h"
#include "ops/cuda/sm90/grouped_impl.cuh"

namespace dsv3::bench {

template <bool Fp8, int TM, int TN, int TK, int CM, int CN, bool Pingpong, bool Swap = false>
TileVariant make_variant() {
  using AB = std::conditional_t<Fp8, cutlass::float_e4m3_t, cutlass::bfloat16_t>;
  using F = cuda::sm90::detail::Family<AB, void, cutlass::bfloat16_t, cute::Shape<cute::Int<TM>, cute::Int<TN>, cute::Int<TK>>,
                                       cute::Shape<cute::Int<CM>, cute::Int<CN>, cute::_1>, Fp8, Pingpong, Swap>;
  TileVariant v;
  v.name = std::string(Swap ? "swapped " : "") + (Pingpong ? "pingpong " : "cooperative ") + std::to_string(TM) + "x" + std::to_string(TN) + "x" +
           std::to_string(TK) + " cluster " + std::to_string(CM) + "x" + std::to_string(CN);
  v.fp8 = Fp8;
  v.run = [](const cuda::sm90::ExpertGemm& g, void* ws, size_t b, cudaStream_t s) {
    cuda::sm90::detail::run_expert<F>(g, ws, b, s);
  };
  v.workspace = [](int groups) { return F::workspace_bytes(groups); };
  return v;
}

}  // namespace dsv3::bench
