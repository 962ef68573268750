#pragma once
// Whole-step CUDA graphs for the CUDA backend (see Backend::begin_graph_step). A pure decode step of B sequences
// issues ~650 small launches whose host cost (2 ms at batch 1) exceeds their GPU time; recorded once into a graph
// per (batch, block-table capacity, variant), the step is one memcpy + one graph launch.
//   capture  the backend's ops run as usual while the stream is being captured (nothing executes). Tensors come
//            from a private allocator of the recording; host metadata is staged at fixed offsets of one pinned
//            buffer whose device twin the kernels read.
//   replay   the model calls the same ops; the backend skips their launches, hands out the recorded block of
//            each allocation (by order; sizes checked) and writes the step's metadata at the recorded offsets. end(): one host-to-device copy of the
//            metadata, then cudaGraphLaunch.
// Nothing in either phase waits for the device except begin(), which waits for the previous replay's metadata
// copy before its pinned buffer is rewritten (finished long ago when the caller read its logits).
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "ops/cuda/device.h"

namespace dsv3::cuda {

// Block-table capacity of a recording: the next power of two of the blocks a step needs, so one recording
// serves every length up to it (the decode kernel reads the true lengths from device memory).
inline int64_t graph_capacity_blocks(int64_t blocks) {
  int64_t c = 1;
  while (c < blocks) c *= 2;
  return c;
}

class StepGraphs {
 public:
  enum class Mode { Off, Capture, Replay };
  struct Key {
    int64_t batch = 0, cap_blocks = 0, variant = 0;
    bool operator<(const Key& o) const {
      return std::array<int64_t, 3>{batch, cap_blocks, variant} < std::array<int64_t, 3>{o.batch, o.cap_blocks, o.variant};
    }
  };
  struct Stats {
    int64_t captures = 0, replays = 0, eager = 0, failed = 0;
  };

  explicit StepGraphs(DeviceContext& ctx) : ctx_(ctx) {}
  ~StepGraphs();
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;

  // Decides how this step runs: Off (eagerly: first use of the key, or a key that could not be recorded),
  // Capture or Replay. meta_bytes: the most metadata a step of this key can stage.
  Mode begin(const Key& key, size_t meta_bytes);
  // Capture: ends it and instantiates; then (both) copies the metadata and launches. false: nothing was
  // launched (the recording failed; the key runs eagerly from now on).
  bool end();
  // An op threw between begin and end: abandon the capture (or this replay) and the recording.
  void cancel();

  Mode mode() const { return mode_; }
  bool replaying() const { return mode_ == Mode::Replay; }
  const Key& key() const { return cur_key_; }
  Stats stats() const { return stats_; }
  void clear();  // drops every recording (synchronizes the stream)

  // The step's next tensor (see the file comment).
  Tensor alloc(DType t, Shape s, const char* name);
  // Stages `bytes` of host metadata for slot `slot` (same content as the slot's previous upload in this step:
  // the same region) and returns the device address the kernels read.
  const void* upload(int slot, const void* data, size_t bytes);
  // An op that cannot be recorded (it would wait for the device): the capture will fail and the key runs eagerly.
  void unsupported(const char* what);

 private:
  struct Upload {
    size_t off = 0, bytes = 0;
    bool fresh = false;
  };
  struct Entry {
    cudaGraphExec_t exec = nullptr;
    std::shared_ptr<DeviceAllocator> pool;  // the recording's memory, reused within the step
    std::vector<void*> ptrs;                // address of every tensor the step allocates, in order
    std::vector<size_t> sizes;              // and its bytes
    std::vector<Upload> ups;
    Tensor meta_dev;
    void* meta_host = nullptr;
    size_t meta_cap = 0, meta_used = 0;
    cudaEvent_t copied = nullptr;  // the last metadata copy out of meta_host
    int64_t last_use = 0;
  };
  void destroy(Entry& e);
  void launch(Entry& e);
  void evict_to(size_t n);

  DeviceContext& ctx_;
  std::map<Key, Entry> graphs_;
  std::map<Key, int> seen_;
  std::set<Key> failed_;
  Mode mode_ = Mode::Off;
  Key cur_key_;
  Entry* cur_ = nullptr;
  size_t n_alloc_ = 0, n_up_ = 0;
  std::string unsupported_;
  std::map<int, size_t> last_up_;  // slot -> index into cur_->ups of its latest upload in this step
  int64_t clock_ = 0;
  Stats stats_;
};

}  // namespace dsv3::cuda
