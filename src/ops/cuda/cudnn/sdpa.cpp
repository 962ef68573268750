// cuDNN fused attention for causal prefill (attention.h): one frontend graph per shape, cached, executed on the
// caller's stream. Dynamic shapes with a shared kernel cache are asked for first, so a new prompt length
// reuses the compiled kernel and only rebuilds the (cheap) plan; where the runtime refuses them, static plans.
#include <cudnn.h>

#include <cstdio>
#include <cstring>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include <cudnn_frontend.h>
#pragma GCC diagnostic pop

#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/cudnn/attention.h"

namespace dsv3::cuda::cudnn {

namespace fe = cudnn_frontend;

namespace {

enum Uid : int64_t { kQ = 1, kK = 2, kV = 3, kO = 4 };

using Key = std::tuple<int, int, int, int, int, int64_t, int64_t, uint32_t>;  // len n nh dqk dv v_row v_head scale

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t ws_bytes = 0;
};

struct State {
  std::mutex mu;
  cudnnHandle_t handle = nullptr;
  int dev = -1;
  std::shared_ptr<fe::KernelCache> kernels = std::make_shared<fe::KernelCache>();
  bool dynamic_ok = true;
  std::map<Key, Plan> plans;
  std::list<Key> order;  // oldest first: the cache keeps kMaxPlans shapes
  void* ws = nullptr;
  size_t ws_cap = 0;
  static constexpr size_t kMaxPlans = 64;
};

State& state() {
  static State s;
  return s;
}

// Builds the graph for one shape; an empty graph and *why when cuDNN does not take it.
Plan build(State& st, const CausalAttention& a, bool dynamic, std::string* why) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  if (dynamic) g->set_dynamic_shape_enabled(true).set_kernel_cache(st.kernels);
  const int64_t nh = a.nh, len = a.len, n = a.n, dqk = a.dqk, dv = a.dv;
  // Logical [batch, head, seq, dim] with the strides of our token-major buffers.
  auto Q = g->tensor(fe::graph::Tensor_attributes().set_name("q").set_uid(kQ).set_dim({1, nh, len, dqk})
                         .set_stride({len * nh * dqk, dqk, nh * dqk, 1}));
  auto K = g->tensor(fe::graph::Tensor_attributes().set_name("k").set_uid(kK).set_dim({1, nh, n, dqk})
                         .set_stride({n * nh * dqk, dqk, nh * dqk, 1}));
  auto V = g->tensor(fe::graph::Tensor_attributes().set_name("v").set_uid(kV).set_dim({1, nh, n, dv})
                         .set_stride({n * a.v_row, a.v_head, a.v_row, 1}));
  auto opts = fe::graph::SDPA_attributes()
                  .set_name("causal_prefill")
                  .set_generate_stats(false)
                  .set_attn_scale(a.scale)
                  .set_causal_mask_bottom_right(true);
  auto [O, stats] = g->sdpa(Q, K, V, opts);
  (void)stats;
  O->set_output(true).set_uid(kO).set_dim({1, nh, len, dv}).set_stride({len * nh * dv, dv, nh * dv, 1});
  Plan p;
  auto fail = [&](fe::error_t e) {
    *why = e.get_message();
    return Plan{};
  };
  if (auto e = g->validate(); e.is_bad()) return fail(e);
  if (auto e = g->build_operation_graph(st.handle); e.is_bad()) return fail(e);
  if (auto e = g->create_execution_plans({fe::HeurMode_t::A}); e.is_bad()) return fail(e);
  if (auto e = g->check_support(st.handle); e.is_bad()) return fail(e);
  if (auto e = g->build_plans(st.handle); e.is_bad()) return fail(e);
  if (auto e = g->get_workspace_size(p.ws_bytes); e.is_bad()) return fail(e);
  p.graph = std::move(g);
  return p;
}

}  // namespace

bool available() {
  static const bool ok = [] {
    const size_t v = cudnnGetVersion();
    return v >= 90600;  // bottom-right causal masks on any length (frontend's requirement)
  }();
  return ok;
}

bool causal_attention(const CausalAttention& a, cudaStream_t s, const char** why) {
  static thread_local std::string reason;
  auto refuse = [&](std::string r) {
    reason = std::move(r);
    if (why) *why = reason.c_str();
    return false;
  };
  if (!available()) return refuse("cuDNN older than 9.6");
  if (a.len <= 0 || a.n < a.len || a.nh <= 0) return refuse("empty or inconsistent shape");
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  int dev = 0;
  DSV3_CUDA_CHECK(cudaGetDevice(&dev));
  if (!st.handle || st.dev != dev) {
    DSV3_CHECK(!st.handle, "cuDNN attention: one device per process (device {} after {})", dev, st.dev);
    if (cudnnCreate(&st.handle) != CUDNN_STATUS_SUCCESS) return refuse("cudnnCreate failed");
    st.dev = dev;
  }
  if (cudnnSetStream(st.handle, s) != CUDNN_STATUS_SUCCESS) return refuse("cudnnSetStream failed");
  uint32_t sb = 0;
  std::memcpy(&sb, &a.scale, 4);
  const Key key{a.len, a.n, a.nh, a.dqk, a.dv, a.v_row, a.v_head, sb};
  auto it = st.plans.find(key);
  if (it == st.plans.end()) {
    std::string r;
    Plan p;
    if (st.dynamic_ok) {
      p = build(st, a, true, &r);
      if (!p.graph) st.dynamic_ok = false;  // this runtime has no dynamic-shape engine: static plans from now on
    }
    if (!p.graph) p = build(st, a, false, &r);
    if (!p.graph) return refuse("cuDNN has no engine for this attention: " + r);
    if (st.plans.size() >= State::kMaxPlans) {
      st.plans.erase(st.order.front());
      st.order.pop_front();
    }
    st.order.push_back(key);
    it = st.plans.emplace(key, std::move(p)).first;
  }
  Plan& p = it->second;
  if (size_t(p.ws_bytes) > st.ws_cap) {
    // Grown rarely (a larger shape): wait for work that may still read the old buffer, then replace it.
    DSV3_CUDA_CHECK(cudaStreamSynchronize(s));
    if (st.ws) DSV3_CUDA_CHECK(cudaFree(st.ws));
    st.ws_cap = size_t(p.ws_bytes) * 2;
    DSV3_CUDA_CHECK(cudaMalloc(&st.ws, st.ws_cap));
  }
  std::unordered_map<int64_t, void*> pack{{kQ, const_cast<__nv_bfloat16*>(a.q)},
                                          {kK, const_cast<__nv_bfloat16*>(a.k)},
                                          {kV, const_cast<__nv_bfloat16*>(a.v)},
                                          {kO, a.out}};
  if (auto e = p.graph->execute(st.handle, pack, st.ws); e.is_bad())
    return refuse("cuDNN attention failed: " + e.get_message());
  return true;
}

}  // namespace dsv3::cuda::cudnn
