#include "ops/cuda/step_graph.h"

#include <cstring>

namespace dsv3::cuda {

namespace {

constexpr int kMaxGraphs = 16;  // recordings kept (least recently used dropped first)
constexpr int kEagerUses = 1;   // a key runs eagerly this many times before it is recorded (warms caches and modules)

}  // namespace

StepGraphs::~StepGraphs() {
  try {
    clear();
  } catch (...) {
  }
}

void StepGraphs::destroy(Entry& e) {
  if (e.exec) cudaGraphExecDestroy(e.exec);
  if (e.copied) cudaEventDestroy(e.copied);
  if (e.meta_host) cudaFreeHost(e.meta_host);
  e.exec = nullptr;
  e.copied = nullptr;
  e.meta_host = nullptr;
  e.meta_dev = Tensor();
  if (e.pool) e.pool->trim();
  e.pool.reset();
}

void StepGraphs::clear() {
  if (mode_ != Mode::Off) cancel();
  if (graphs_.empty()) return;
  cudaStreamSynchronize(ctx_.stream);
  for (auto& [k, e] : graphs_) destroy(e);
  graphs_.clear();
}

void StepGraphs::evict_to(size_t n) {
  if (graphs_.size() <= n) return;
  cudaStreamSynchronize(ctx_.stream);  // a dropped recording may still run
  while (graphs_.size() > n) {
    auto old = graphs_.begin();
    for (auto it = graphs_.begin(); it != graphs_.end(); ++it)
      if (it->second.last_use < old->second.last_use) old = it;
    destroy(old->second);
    graphs_.erase(old);
  }
}

StepGraphs::Mode StepGraphs::begin(const Key& key, size_t meta_bytes) {
  DSV3_CHECK(mode_ == Mode::Off, "begin_graph_step: a graph step is already open");
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    if (failed_.count(key) || seen_[key]++ < kEagerUses) {
      stats_.eager++;
      return Mode::Off;
    }
    evict_to(kMaxGraphs - 1);
    Entry& e = graphs_[key];
    e.pool = std::make_shared<DeviceAllocator>();
    e.meta_cap = (meta_bytes + 4095) / 4096 * 4096;
    DSV3_CUDA_CHECK(cudaMallocHost(&e.meta_host, e.meta_cap));
    e.meta_dev = device_tensor(ctx_, DType::U8, {int64_t(e.meta_cap)}, "graph_metadata");
    DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&e.copied, cudaEventDisableTiming));
    DSV3_CUDA_CHECK(cudaStreamBeginCapture(ctx_.stream, cudaStreamCaptureModeRelaxed));
    cur_ = &e;
    mode_ = Mode::Capture;
  } else {
    cur_ = &it->second;
    DSV3_CUDA_CHECK(cudaEventSynchronize(cur_->copied));
    mode_ = Mode::Replay;
  }
  cur_->last_use = ++clock_;
  cur_key_ = key;
  n_alloc_ = n_up_ = 0;
  last_up_.clear();
  unsupported_.clear();
  return mode_;
}

void StepGraphs::launch(Entry& e) {
  if (e.meta_used)
    DSV3_CUDA_CHECK(cudaMemcpyAsync(e.meta_dev.data, e.meta_host, e.meta_used, cudaMemcpyHostToDevice, ctx_.stream));
  DSV3_CUDA_CHECK(cudaEventRecord(e.copied, ctx_.stream));
  DSV3_CUDA_CHECK(cudaGraphLaunch(e.exec, ctx_.stream));
}

bool StepGraphs::end() {
  DSV3_CHECK(mode_ != Mode::Off, "end_graph_step without begin_graph_step");
  Entry& e = *cur_;
  if (mode_ == Mode::Capture) {
    cudaGraph_t g = nullptr;
    cudaError_t err = cudaStreamEndCapture(ctx_.stream, &g);
    if (err == cudaSuccess && unsupported_.empty()) err = cudaGraphInstantiate(&e.exec, g, 0);
    if (g) cudaGraphDestroy(g);
    if (err != cudaSuccess || !unsupported_.empty()) {
      (void)cudaGetLastError();
      mode_ = Mode::Off;
      cur_ = nullptr;
      destroy(e);
      graphs_.erase(cur_key_);
      failed_.insert(cur_key_);
      stats_.failed++;
      return false;
    }
    stats_.captures++;
  } else {
    if (n_alloc_ != e.ptrs.size() || n_up_ != e.ups.size()) {
      const size_t na = n_alloc_, nu = n_up_, ra = e.ptrs.size(), ru = e.ups.size();
      cancel();
      fail("graph step replay: {} allocations and {} uploads, the recording had {} and {}", na, nu, ra, ru);
    }
    stats_.replays++;
  }
  mode_ = Mode::Off;
  cur_ = nullptr;
  launch(e);
  return true;
}

void StepGraphs::cancel() {
  if (mode_ == Mode::Off) return;
  if (mode_ == Mode::Capture) {
    cudaGraph_t g = nullptr;
    if (cudaStreamEndCapture(ctx_.stream, &g) == cudaSuccess && g) cudaGraphDestroy(g);
    (void)cudaGetLastError();
  }
  // The recording may not match what the model does (a replay threw): drop it; the key is recorded again later.
  mode_ = Mode::Off;
  Entry& e = *cur_;
  cur_ = nullptr;
  cudaStreamSynchronize(ctx_.stream);
  destroy(e);
  graphs_.erase(cur_key_);
}

void StepGraphs::unsupported(const char* what) {
  if (mode_ == Mode::Capture && unsupported_.empty()) unsupported_ = what;
  DSV3_CHECK(mode_ != Mode::Replay, "graph step replay: {} cannot be replayed", what);
}

Tensor StepGraphs::alloc(DType t, Shape s, const char* name) {
  Tensor r;
  r.name = name;
  r.dtype = t;
  r.shape = std::move(s);
  r.device = Device::CUDA;
  for (auto d : r.shape)
    if (d < 0) fail("tensor {}: negative dimension in {}", r.name, shape_str(r.shape));
  const size_t bytes = std::max<size_t>(r.nbytes(), 1);
  std::shared_ptr<DeviceAllocator> pool = cur_->pool;
  if (mode_ == Mode::Capture) {
    // Blocks freed during the capture are reused by later allocations of the same step (the graph keeps the
    // stream's order), and never leave the recording's pool.
    size_t rounded = 0;
    void* p = pool->alloc(bytes, &rounded);
    r.storage = std::shared_ptr<void>(p, [pool, rounded](void* q) { pool->release(q, rounded); });
    r.data = p;
    cur_->ptrs.push_back(p);
    cur_->sizes.push_back(bytes);
  } else {
    // The recorded block of the same allocation: the graph reads and writes exactly these addresses.
    DSV3_CHECK(n_alloc_ < cur_->ptrs.size() && cur_->sizes[n_alloc_] == bytes,
               "graph step replay: allocation {} ({} {}) differs from the recording", n_alloc_, r.name,
               shape_str(r.shape));
    r.data = cur_->ptrs[n_alloc_];
    r.storage = std::shared_ptr<void>(r.data, [pool](void*) {});
  }
  ++n_alloc_;
  return r;
}

const void* StepGraphs::upload(int slot, const void* data, size_t bytes) {
  Entry& e = *cur_;
  char* host = static_cast<char*>(e.meta_host);
  const char* dev = static_cast<const char*>(e.meta_dev.data);
  if (mode_ == Mode::Capture) {
    Upload u;
    u.bytes = bytes;
    auto prev = last_up_.find(slot);
    if (prev != last_up_.end() && e.ups[prev->second].bytes == bytes &&
        std::memcmp(host + e.ups[prev->second].off, data, bytes) == 0) {
      u.off = e.ups[prev->second].off;
    } else {
      u.off = (e.meta_used + 15) / 16 * 16;
      u.fresh = true;
      if (u.off + bytes > e.meta_cap) {
        unsupported("metadata beyond the recording's staging buffer");
        u.off = 0;
      } else {
        std::memcpy(host + u.off, data, bytes);
        e.meta_used = u.off + bytes;
      }
    }
    last_up_[slot] = e.ups.size();
    e.ups.push_back(u);
    ++n_up_;
    return dev + u.off;
  }
  DSV3_CHECK(n_up_ < e.ups.size() && e.ups[n_up_].bytes == bytes,
             "graph step replay: metadata upload {} of {} bytes differs from the recording", n_up_, bytes);
  const Upload& u = e.ups[n_up_++];
  if (u.fresh) std::memcpy(host + u.off, data, bytes);
  else
    DSV3_CHECK(std::memcmp(host + u.off, data, bytes) == 0,
               "graph step replay: metadata upload {} shares a region whose content differs", n_up_ - 1);
  return dev + u.off;
}

}  // namespace dsv3::cuda
