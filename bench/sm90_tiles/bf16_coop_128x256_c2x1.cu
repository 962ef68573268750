// One candidate of the tile sweep (tiles.h): bf16_coop_128x256_c2x1.
#include "bench/sm90_tiles/variant.cuh"

static const bool registered = dsv3::bench::register_variant(dsv3::bench::make_variant<false, 128, 256, 64, 2, 1, false>());
