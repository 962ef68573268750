#include "dist/expert_parallel.h"

#include <algorithm>

#include "core/error.h"
#include "train/profile.h"

namespace dsv3 {

namespace {

// What one layer's forward keeps for its backward, on both sides of the exchange. Host vectors are the
// exchange's plan; TBufs are backend memory (host memory on CPU ranks, the GPU's on GPU ranks).
struct EpState final : MoeSavedState {
  // sender side: assignment t*K+k -> its row in the send order (grouped by owner rank, then t*K+k)
  std::vector<int64_t> pos;
  std::vector<int64_t> send_counts, recv_counts;  // assignments per rank
  TBuf<int32_t> send_rows;  // [NK] token of each send row
  TBuf<int32_t> back_rows;  // [K, N] send row of (t, k), k-major: the combine adds one k at a time
  // owner side: the M received assignments
  TBuf<float> xr, wr;        // [M, H], [M]
  TBuf<int32_t> ir;          // [M] local expert index
  std::unique_ptr<MoeSavedState> inner;  // the backend's saved activations of the local experts
  int64_t N = 0, K = 0;
  explicit EpState(TrainBackend* be) : send_rows(be), back_rows(be), xr(be), wr(be), ir(be) {}
};

std::vector<int64_t> scaled(const std::vector<int64_t>& c, int64_t f) {
  std::vector<int64_t> o(c);
  for (auto& v : o) v *= f;
  return o;
}

int64_t total(const std::vector<int64_t>& c) {
  int64_t s = 0;
  for (auto v : c) s += v;
  return s;
}

template <typename T>
std::vector<T> to_host(TrainBackend& be, const T* p, int64_t n) {
  std::vector<T> h(static_cast<size_t>(n));
  if (n > 0) be.download(h.data(), p, size_t(n) * sizeof(T));
  return h;
}
template <typename T>
void to_backend(TrainBackend& be, TBuf<T>& b, const std::vector<T>& h) {
  T* p = b.resize(std::max<size_t>(h.size(), 1));
  if (!h.empty()) be.upload(p, h.data(), h.size() * sizeof(T));
  b.resize(h.size());
}

}  // namespace

ExpertParallel::ExpertParallel(Communicator& comm, Communicator& bulk, int64_t E) : comm_(comm), bulk_(bulk), E_(E) {
  if (E % comm.size() != 0)
    fail("--ep {} must divide the {} routed experts of each MoE layer", comm.size(), E);
  if (bulk.size() != comm.size() || bulk.rank() != comm.rank())
    fail("internal: the expert-parallel host and bulk communicators differ ({}/{} vs {}/{})", comm.rank(), comm.size(),
         bulk.rank(), bulk.size());
  El_ = E / comm.size();
}

std::unique_ptr<MoeSavedState> ExpertParallel::new_state(TrainBackend& be) const {
  auto s = std::make_unique<EpState>(&be);
  s->inner = be.new_moe_state();
  return s;
}

void ExpertParallel::forward(TrainBackend& be, float* out, MoeSavedState& ss, const float* x, const int32_t* idx,
                             const float* w, const float* Wg, const float* Wu, const float* Wd, int64_t N, int64_t K,
                             int64_t H, int64_t I) {
  EpState& s = dynamic_cast<EpState&>(ss);
  const int P = comm_.size();
  const int64_t NK = N * K;
  s.N = N, s.K = K;
  // ---- dispatch: bucket the assignments by owner (stable); the plan on the host, the rows moved by the backend.
  auto prof = std::make_unique<ProfileScope>("ep_fwd_dispatch");
  const std::vector<int32_t> hidx = to_host(be, idx, NK);
  const std::vector<float> hw = to_host(be, w, NK);
  s.send_counts.assign(P, 0);
  for (int64_t a = 0; a < NK; ++a) {
    if (hidx[a] < 0 || hidx[a] >= E_) fail("internal: expert index {} out of range", hidx[a]);
    s.send_counts[hidx[a] / El_]++;
  }
  std::vector<int64_t> fill(P, 0);
  for (int r = 1; r < P; ++r) fill[r] = fill[r - 1] + s.send_counts[r - 1];
  s.pos.resize(NK);
  std::vector<int32_t> send_tok(NK), send_e(NK), back(NK);
  std::vector<float> send_w(NK);
  for (int64_t a = 0; a < NK; ++a) {
    const int64_t p = fill[hidx[a] / El_]++;
    s.pos[a] = p;
    send_tok[p] = int32_t(a / K), send_w[p] = hw[a], send_e[p] = int32_t(hidx[a] % El_);
    back[(a % K) * N + a / K] = int32_t(p);
  }
  to_backend(be, s.send_rows, send_tok);
  to_backend(be, s.back_rows, back);
  TBuf<float> xs(&be);
  be.gather_rows(xs.resize(std::max<int64_t>(NK * H, 1)), x, s.send_rows.data(), NK, H, false);
  s.recv_counts = comm_.exchange_counts(s.send_counts);
  const int64_t M = total(s.recv_counts);
  be.synchronize();  // a device transport runs on its own stream: the rows must be written first
  bulk_.all_to_all(xs.data(), scaled(s.send_counts, H), s.xr.resize(std::max<int64_t>(M * H, 1)),
                   scaled(s.recv_counts, H), CommType::F32);
  std::vector<float> wr(M);
  std::vector<int32_t> ir(M);
  comm_.all_to_all(send_w.data(), s.send_counts, wr.data(), s.recv_counts, CommType::F32);
  comm_.all_to_all(send_e.data(), s.send_counts, ir.data(), s.recv_counts, CommType::I32);
  to_backend(be, s.wr, wr);
  to_backend(be, s.ir, ir);
  // ---- compute: the local experts over the received assignments, each one row with K = 1.
  prof = std::make_unique<ProfileScope>("ep_fwd_experts");
  TBuf<float> yr(&be);
  be.fill(yr.resize(std::max<int64_t>(M * H, 1)), 0.f, M * H);
  if (M > 0)
    be.experts_forward(yr.data(), *s.inner, s.xr.data(), s.ir.data(), s.wr.data(), Wg, Wu, Wd, M, 1, H, I, El_);
  // ---- combine: weighted outputs back to the token's rank, added in k order.
  prof = std::make_unique<ProfileScope>("ep_fwd_combine");
  be.synchronize();
  bulk_.all_to_all(yr.data(), scaled(s.recv_counts, H), xs.data(), scaled(s.send_counts, H), CommType::F32);
  for (int64_t k = 0; k < K; ++k) be.gather_rows(out, xs.data(), s.back_rows.data() + k * N, N, H, true);
}

void ExpertParallel::backward(TrainBackend& be, float* dx, float* dw, float* dWg, float* dWu, float* dWd,
                              const float* dout, MoeSavedState& ss, const float* Wg, const float* Wu, const float* Wd,
                              int64_t N, int64_t K, int64_t H, int64_t I) {
  EpState& s = dynamic_cast<EpState&>(ss);
  if (s.N != N || s.K != K) fail("internal: expert-parallel backward for {}x{} after a forward of {}x{}", N, K, s.N, s.K);
  const int64_t NK = N * K, M = int64_t(s.wr.size());
  // dout of each assignment's token to the owner of its expert.
  auto prof = std::make_unique<ProfileScope>("ep_bwd_dispatch");
  TBuf<float> send(&be), dr(&be);
  be.gather_rows(send.resize(std::max<int64_t>(NK * H, 1)), dout, s.send_rows.data(), NK, H, false);
  be.synchronize();
  bulk_.all_to_all(send.data(), scaled(s.send_counts, H), dr.resize(std::max<int64_t>(M * H, 1)),
                   scaled(s.recv_counts, H), CommType::F32);
  // The owner's backward: dx rows, dw per assignment, local weight gradients.
  prof = std::make_unique<ProfileScope>("ep_bwd_experts");
  TBuf<float> dxr(&be), dwr(&be);
  be.fill(dxr.resize(std::max<int64_t>(M * H, 1)), 0.f, M * H);
  be.fill(dwr.resize(std::max<int64_t>(M, 1)), 0.f, M);
  if (M > 0)
    be.experts_backward(dxr.data(), dwr.data(), dWg, dWu, dWd, dr.data(), *s.inner, s.xr.data(), s.ir.data(),
                        s.wr.data(), Wg, Wu, Wd, M, 1, H, I, El_);
  prof = std::make_unique<ProfileScope>("ep_bwd_combine");
  be.synchronize();
  bulk_.all_to_all(dxr.data(), scaled(s.recv_counts, H), send.data(), scaled(s.send_counts, H), CommType::F32);
  const std::vector<float> hdwr = to_host(be, dwr.data(), M);
  std::vector<float> back_w(NK), hdw(NK);
  comm_.all_to_all(hdwr.data(), s.recv_counts, back_w.data(), s.send_counts, CommType::F32);
  for (int64_t a = 0; a < NK; ++a) hdw[a] = back_w[s.pos[a]];
  if (NK > 0) be.upload(dw, hdw.data(), size_t(NK) * sizeof(float));
  for (int64_t k = 0; k < K; ++k) be.gather_rows(dx, send.data(), s.back_rows.data() + k * N, N, H, true);
}

}  // namespace dsv3
