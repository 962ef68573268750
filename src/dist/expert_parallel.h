#pragma once
// Expert parallelism for the training model: the ranks of an expert-parallel group each hold a contiguous
// slice of E / ep routed experts of every MoE layer (dist/expert_shard.h) and route their own tokens. For
// one MoE layer, with N local tokens and K experts per token:
//   dispatch  every assignment (t, k) goes to the rank that owns expert idx[t, k]: the row x[t] [H], the
//             weight w[t, k] and the expert's local index, in one all-to-all (counts exchanged first);
//   compute   the owner runs its experts over what it received (the backend's grouped experts kernel with
//             K = 1, so each received row is one assignment) and weights each output by w;
//   combine   a second all-to-all returns the weighted outputs, which are added to out[t] in k order.
// The backward mirrors it: dout rows go to the owners, which return dx rows and dw, and accumulate their
// experts' weight gradients locally. Routing (and so the selection bias, balance loss and expert counts)
// stays on the token's rank; the result is the same as computing every expert locally.
//
// Memory: the exchange plan (counts, positions) is built on the host from the downloaded expert indices and
// weights; token rows stay in backend memory, moved by the backend's gather_rows and exchanged on the bulk
// communicator (the same group as comm on CPU ranks, its NCCL twin on GPU ranks); the small per-assignment values
// (routing weight, local expert, dw) travel on comm. Dispatch and combine are blocking here: the overlap design
// (sending the next chunk while the owner computes) is in README's distribution section.
#include <cstdint>
#include <memory>
#include <vector>

#include "dist/communicator.h"
#include "ops/train_backend.h"

namespace dsv3 {

class ExpertParallel {
 public:
  // comm: the expert-parallel group (rank j owns experts [j * E / size, (j + 1) * E / size)) on the host; bulk:
  // the same ranks for backend memory (comm itself for host backends); E: routed experts.
  ExpertParallel(Communicator& comm, Communicator& bulk, int64_t E);
  int64_t local_experts() const { return El_; }
  int64_t expert_lo() const { return int64_t(comm_.rank()) * El_; }

  std::unique_ptr<MoeSavedState> new_state(TrainBackend& be) const;
  // out[N, H] += sum_k w[t, k] Expert_{idx[t, k]}(x[t]); Wg/Wu/Wd: this rank's local experts [El, ...].
  void forward(TrainBackend& be, float* out, MoeSavedState& s, const float* x, const int32_t* idx, const float* w,
               const float* Wg, const float* Wu, const float* Wd, int64_t N, int64_t K, int64_t H, int64_t I);
  // dx[N, H] +=, dw[N, K] overwritten, dWg/dWu/dWd (local experts) +=.
  void backward(TrainBackend& be, float* dx, float* dw, float* dWg, float* dWu, float* dWd, const float* dout,
                MoeSavedState& s, const float* Wg, const float* Wu, const float* Wd, int64_t N, int64_t K, int64_t H,
                int64_t I);

 private:
  Communicator& comm_;
  Communicator& bulk_;
  int64_t E_, El_;
};

}  // namespace dsv3
