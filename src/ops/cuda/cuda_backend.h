#pragma once
// CUDA-only controls of the CUDA backend, for benchmarks and diagnostics (plain C++: no CUDA headers). Model
// code never includes this; everything it needs is in ops/backend.h.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ops/backend.h"

namespace dsv3::cuda {

// Per-op GPU time: events around every backend op (they do not synchronize), read back by take_profile.
struct OpStat {
  std::string name;    // op, or "linear:<weight kind>" (e.g. linear:self_attn.q_proj)
  int64_t calls = 0;
  double ms = 0;       // summed GPU time
  double bytes = 0;    // bytes the op must move at least (weights + activations), where known
};
void set_profiling(Backend& be, bool on);
// Sorted by GPU time, descending; clears the counters. Entries named "(...)" are notes, not GPU time: the host
// time spent issuing ops between two waits (ms summed over `calls` waits; measured with profiling off too) and
// MoE routing statistics (profiling on).
std::vector<OpStat> take_profile(Backend& be);

// Linear layers with <= 16 rows use the skinny tensor-core kernel unless turned off (then cuBLAS).
void set_skinny(Backend& be, bool on);

struct DeviceInfo {
  std::string name;
  int sms = 0;
  double mem_gib = 0;
  int clock_mhz = 0;
};
DeviceInfo device_info(Backend& be);

// Ceilings measured on the device (METHOD.md): device-to-device copy (bytes read + written per second) and a
// large bf16 GEMM through cuBLAS (FLOP/s); each the median of `reps` timed runs after warm-up.
double measure_copy_bandwidth(Backend& be, size_t bytes, int reps);
double measure_gemm_flops(Backend& be, int m, int n, int k, int reps);

// Median GPU time (ms) of fn() over reps runs after warm runs, with events on the backend's stream.
double time_ms(Backend& be, int warm, int reps, const std::function<void()>& fn);

}  // namespace dsv3::cuda
