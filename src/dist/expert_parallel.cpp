#include "dist/expert_parallel.h"

#include <algorithm>

#include "core/error.h"
#include "train/profile.h"

namespace dsv3 {

namespace {

// What one layer's forward keeps for its backward, on both sides of the exchange.
struct EpState final : MoeSavedState {
  // sender side: assignment t*K+k -> its row in the send order (grouped by owner rank, then t*K+k)
  std::vector<int64_t> pos;
  std::vector<int64_t> send_counts, recv_counts;  // assignments per rank
  // owner side: the M received assignments
  std::vector<float> xr, wr;   // [M, H], [M]
  std::vector<int32_t> ir;     // [M] local expert index
  std::unique_ptr<MoeSavedState> inner;  // the backend's saved activations of the local experts
  int64_t N = 0, K = 0;
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

}  // namespace

ExpertParallel::ExpertParallel(Communicator& comm, int64_t E) : comm_(comm), E_(E) {
  if (E % comm.size() != 0)
    fail("--ep {} must divide the {} routed experts of each MoE layer", comm.size(), E);
  El_ = E / comm.size();
}

std::unique_ptr<MoeSavedState> ExpertParallel::new_state(TrainBackend& be) const {
  if (!be.is_host()) fail("expert parallelism needs host memory (the {} backend is not host)", be.name());
  auto s = std::make_unique<EpState>();
  s->inner = be.new_moe_state();
  return s;
}

void ExpertParallel::forward(TrainBackend& be, float* out, MoeSavedState& ss, const float* x, const int32_t* idx,
                             const float* w, const float* Wg, const float* Wu, const float* Wd, int64_t N, int64_t K,
                             int64_t H, int64_t I) {
  EpState& s = dynamic_cast<EpState&>(ss);
  const int P = comm_.size();
  const int64_t NK = N * K, row = H + 2;
  s.N = N, s.K = K;
  // ---- dispatch: bucket the assignments by owner (stable), pack [x row | w | local expert] per assignment.
  auto prof = std::make_unique<ProfileScope>("ep_fwd_dispatch");
  s.send_counts.assign(P, 0);
  for (int64_t a = 0; a < NK; ++a) {
    if (idx[a] < 0 || idx[a] >= E_) fail("internal: expert index {} out of range", idx[a]);
    s.send_counts[idx[a] / El_]++;
  }
  std::vector<int64_t> fill(P, 0);
  for (int r = 1; r < P; ++r) fill[r] = fill[r - 1] + s.send_counts[r - 1];
  s.pos.resize(NK);
  std::vector<float> send(NK * row);
  for (int64_t a = 0; a < NK; ++a) {
    const int64_t p = fill[idx[a] / El_]++;
    s.pos[a] = p;
    float* dst = send.data() + p * row;
    std::copy_n(x + (a / K) * H, H, dst);
    dst[H] = w[a];
    dst[H + 1] = float(idx[a] % El_);  // exact: El < 2^24
  }
  s.recv_counts = comm_.exchange_counts(s.send_counts);
  const int64_t M = total(s.recv_counts);
  std::vector<float> recv(M * row);
  comm_.all_to_all(send.data(), scaled(s.send_counts, row), recv.data(), scaled(s.recv_counts, row), CommType::F32);
  // ---- compute: the local experts over the received assignments, each one row with K = 1.
  prof = std::make_unique<ProfileScope>("ep_fwd_experts");
  s.xr.resize(M * H), s.wr.resize(M), s.ir.resize(M);
  for (int64_t m = 0; m < M; ++m) {
    std::copy_n(recv.data() + m * row, H, s.xr.data() + m * H);
    s.wr[m] = recv[m * row + H];
    s.ir[m] = int32_t(recv[m * row + H + 1]);
  }
  std::vector<float> yr(M * H, 0.f);
  if (M > 0)
    be.experts_forward(yr.data(), *s.inner, s.xr.data(), s.ir.data(), s.wr.data(), Wg, Wu, Wd, M, 1, H, I, El_);
  // ---- combine: weighted outputs back to the token's rank, added in k order.
  prof = std::make_unique<ProfileScope>("ep_fwd_combine");
  std::vector<float> back(NK * H);
  comm_.all_to_all(yr.data(), scaled(s.recv_counts, H), back.data(), scaled(s.send_counts, H), CommType::F32);
  for (int64_t t = 0; t < N; ++t) {
    float* o = out + t * H;
    for (int64_t k = 0; k < K; ++k) {
      const float* y = back.data() + s.pos[t * K + k] * H;
      for (int64_t j = 0; j < H; ++j) o[j] += y[j];
    }
  }
}

void ExpertParallel::backward(TrainBackend& be, float* dx, float* dw, float* dWg, float* dWu, float* dWd,
                              const float* dout, MoeSavedState& ss, const float* Wg, const float* Wu, const float* Wd,
                              int64_t N, int64_t K, int64_t H, int64_t I) {
  EpState& s = dynamic_cast<EpState&>(ss);
  if (s.N != N || s.K != K) fail("internal: expert-parallel backward for {}x{} after a forward of {}x{}", N, K, s.N, s.K);
  const int64_t NK = N * K, M = int64_t(s.wr.size()), row = H + 1;
  // dout of each assignment's token to the owner of its expert.
  auto prof = std::make_unique<ProfileScope>("ep_bwd_dispatch");
  std::vector<float> send(NK * H);
  for (int64_t a = 0; a < NK; ++a) std::copy_n(dout + (a / K) * H, H, send.data() + s.pos[a] * H);
  std::vector<float> dr(M * H);
  comm_.all_to_all(send.data(), scaled(s.send_counts, H), dr.data(), scaled(s.recv_counts, H), CommType::F32);
  // The owner's backward: dx rows, dw per assignment, local weight gradients.
  prof = std::make_unique<ProfileScope>("ep_bwd_experts");
  std::vector<float> dxr(M * H, 0.f), dwr(M, 0.f);
  if (M > 0)
    be.experts_backward(dxr.data(), dwr.data(), dWg, dWu, dWd, dr.data(), *s.inner, s.xr.data(), s.ir.data(),
                        s.wr.data(), Wg, Wu, Wd, M, 1, H, I, El_);
  prof = std::make_unique<ProfileScope>("ep_bwd_combine");
  std::vector<float> pack(M * row);
  for (int64_t m = 0; m < M; ++m) {
    std::copy_n(dxr.data() + m * H, H, pack.data() + m * row);
    pack[m * row + H] = dwr[m];
  }
  std::vector<float> back(NK * row);
  comm_.all_to_all(pack.data(), scaled(s.recv_counts, row), back.data(), scaled(s.send_counts, row), CommType::F32);
  for (int64_t t = 0; t < N; ++t) {
    float* d = dx + t * H;
    for (int64_t k = 0; k < K; ++k) {
      const float* b = back.data() + s.pos[t * K + k] * row;
      for (int64_t j = 0; j < H; ++j) d[j] += b[j];
      dw[t * K + k] = b[H];
    }
  }
}

}  // namespace dsv3
