#pragma once
// CUDA-only controls of the CUDA backend, for benchmarks and diagnostics (plain C++: no CUDA headers). Model
// code never includes this; everything it needs is in ops/backend.h.
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
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

// Whole-step graphs for pure decode steps (on unless DSV3_CUDA_GRAPHS=0): switch them off or on (off also drops
// every recording), and count how steps ran since the backend was made.
void set_graphs(Backend& be, bool on);
struct GraphStats {
  int64_t captures = 0;  // steps recorded (and run from the new recording)
  int64_t replays = 0;   // steps run from an existing recording
  int64_t eager = 0;     // graph-eligible steps run eagerly (first use of a key)
  int64_t failed = 0;    // recordings that failed (the key then runs eagerly)
};
GraphStats graph_stats(Backend& be);

struct DeviceInfo {
  std::string name;
  int sms = 0;
  double mem_gib = 0;
  int clock_mhz = 0;
};
DeviceInfo device_info(Backend& be);

// Ceilings measured on the device: device-to-device copy (bytes read + written per second) and a
// large bf16 GEMM through cuBLAS (FLOP/s); each the median of `reps` timed runs after warm-up.
double measure_copy_bandwidth(Backend& be, size_t bytes, int reps);
double measure_gemm_flops(Backend& be, int m, int n, int k, int reps);

// An fp8 copy of a bf16 or fp32 device weight ([N, K], or grouped experts [E, N, K]) in 128x128 blocks: the
// F8E4M3 codes (first) with `scale` pointing into the fp32 block scales (second); keep both alive. Benchmarks use
// it to run a random bf16 model with fp8 weights.
std::pair<Tensor, Tensor> quantize_weight_fp8(Backend& be, const Tensor& w);
// The stream every op of the backend is enqueued on (a cudaStream_t), for timing and benchmark kernels.
void* stream_of(Backend& be);

// Median GPU time (ms) of fn() over reps runs after warm runs, with events on the backend's stream.
double time_ms(Backend& be, int warm, int reps, const std::function<void()>& fn);

}  // namespace dsv3::cuda
