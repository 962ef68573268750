// One candidate of the tile sweep (tiles.h): fp8_swap_coop_128x128_c1x1.
#include "bench/sm90_tiles/variant.cuh"

static const bool registered = dsv3::bench::register_variant(dsv3::bench::make_variant<true, 128, 128, 128, 1, 1, false, true>());
