#pragma once
// Memory bandwidth of this machine, measured now (these machines are noisy: a roofline fraction is only
// meaningful against a ceiling measured in the same run). Buffers are 512 MiB, far beyond the caches.
#include <cstddef>

namespace dsv3 {

// memcpy with all threads: bytes copied per second (each byte is read once and written once).
double measure_copy_bandwidth(size_t bytes = size_t(512) << 20, int reps = 5);
// A pure read stream with all threads (what streaming weights needs): bytes read per second.
double measure_read_bandwidth(size_t bytes = size_t(512) << 20, int reps = 5);

}  // namespace dsv3
