#pragma once
// GPU time per op of a backend, from CUDA events around each call (DSV3_CUDA_PROFILE=1; off: one branch per
// call). Scopes nest: an op called inside another is listed as "outer > inner", and the total is the sum of the
// outermost scopes, so shares add up. Events are read back in batches (one stream synchronization per 2048
// scopes), so profiling slows a step down but does not reorder it. The table goes to stderr when the profiler
// is destroyed (with the backend). Next to each op's GPU time the table gives the host time spent inside its
// scope (issuing it): when the GPU has caught up with the host, the events also time the host's gap, so an op
// whose GPU time is close to its host time is bound by the host, not by its kernels.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace dsv3::cuda {

class OpProfiler {
 public:
  explicit OpProfiler(const char* what) : what_(what) {
    const char* p = std::getenv("DSV3_CUDA_PROFILE");
    on_ = p && std::string(p) == "1";
  }
  ~OpProfiler() {
    if (!on_) return;
    drain();
    double total = 0;
    std::vector<std::pair<std::string, Total>> rows(totals_.begin(), totals_.end());
    for (auto& [n, t] : rows)
      if (n.find(" > ") == std::string::npos) total += t.ms;
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
    std::fprintf(stderr, "  per-op GPU time, %s (all calls)\n  %-48s %8s %10s %7s %10s\n", what_, "op", "calls", "ms",
                 "share", "host ms");
    for (auto& [n, t] : rows)
      std::fprintf(stderr, "  %-48s %8lld %10.3f %6.1f%% %10.3f\n", n.c_str(), (long long)t.calls, t.ms,
                   100.0 * t.ms / total, t.host_ms);
    std::fprintf(stderr, "  %-48s %8s %10.3f\n", "total (outermost ops)", "", total);
    for (auto& r : pending_) cudaEventDestroy(r.a), cudaEventDestroy(r.b);
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
  }
  bool on() const { return on_; }
  void reset() {
    if (!on_) return;
    drain();
    totals_.clear();
  }

  class Scope {
   public:
    Scope(OpProfiler& p, const char* name, cudaStream_t s) : p_(p.on_ ? &p : nullptr), s_(s) {
      if (!p_) return;
      name_ = p_->stack_.empty() ? std::string(name) : p_->stack_.back() + " > " + name;
      p_->stack_.push_back(name_);
      a_ = p_->event();
      cudaEventRecord(a_, s_);
      t0_ = std::chrono::steady_clock::now();
    }
    ~Scope() {
      if (!p_) return;
      cudaEvent_t b = p_->event();
      cudaEventRecord(b, s_);
      const double host_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
      p_->stack_.pop_back();
      p_->pending_.push_back({name_, a_, b, host_ms});
      if (p_->pending_.size() >= 2048) p_->drain();
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    OpProfiler* p_;
    cudaStream_t s_;
    std::string name_;
    cudaEvent_t a_ = nullptr;
    std::chrono::steady_clock::time_point t0_;
  };

 private:
  struct Pending {
    std::string name;
    cudaEvent_t a, b;
    double host_ms;
  };
  struct Total {
    double ms = 0, host_ms = 0;
    int64_t calls = 0;
  };
  cudaEvent_t event() {
    if (!free_.empty()) {
      cudaEvent_t e = free_.back();
      free_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    cudaEventCreate(&e);
    return e;
  }
  void drain() {
    for (Pending& r : pending_) {
      cudaEventSynchronize(r.b);
      float ms = 0;
      cudaEventElapsedTime(&ms, r.a, r.b);
      Total& t = totals_[r.name];
      t.ms += ms, t.host_ms += r.host_ms, t.calls += 1;
      free_.push_back(r.a), free_.push_back(r.b);
    }
    pending_.clear();
  }
  const char* what_;
  bool on_ = false;
  std::vector<std::string> stack_;
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> free_;
  std::map<std::string, Total> totals_;
};

}  // namespace dsv3::cuda
