#pragma once
// Memory copy bandwidth of this machine, measured now (these machines are noisy: a roofline fraction is only
// meaningful against a ceiling measured in the same run). Returns (bytes read + bytes written) per second.
#include <cstddef>

namespace dsv3 {

double measure_copy_bandwidth(size_t bytes = size_t(512) << 20, int reps = 5);

}  // namespace dsv3
