// One candidate of the tile sweep (tiles.h): bf16_coop_256x128_c1x1.
#include "bench/sm90_tiles/variant.cuh"

static const bool registered = dsv3::bench::register_variant(dsv3::bench::make_variant<false, 256, 128, 64, 1, 1, false>());
