#pragma once
// Tile-shape candidates for the sm90 grouped expert GEMMs (src/ops/cuda/sm90), each a separate CUTLASS
// instantiation, timed against the production choice on the infer-m prefill routing by tiles_main.cpp. Built
// only on request (target gpu_grouped_tiles): each instantiation takes about a minute to compile.
#include <cstddef>
#include <string>
#include <vector>

#include "ops/cuda/sm90/grouped.h"

namespace dsv3::bench {

struct TileVariant {
  std::string name;  // schedule, tile M x N x K, cluster
  bool fp8 = false;
  void (*run)(const cuda::sm90::ExpertGemm&, void*, size_t, cudaStream_t) = nullptr;
  size_t (*workspace)(int groups) = nullptr;
};

// One variant per translation unit (so they compile in parallel), each registering itself at start-up.
bool register_variant(TileVariant v);
std::vector<TileVariant>& registered_variants();

}  // namespace dsv3::bench
