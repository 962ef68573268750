// One candidate of the tile sweep (tiles.h): bf16_swap_coop_128x192_c1x1.
#include "bench/sm90_tiles/variant.cuh"

static const bool registered = dsv3::bench::register_variant(dsv3::bench::make_variant<false, 128, 192, 64, 1, 1, false, true>());
