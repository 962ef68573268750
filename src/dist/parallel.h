#pragma once
// How the ranks of a job split a training or inference run: world = ep x dp ranks; rank r has expert-parallel
// index r % ep (consecutive ranks exchange tokens, so an expert-parallel group stays on one host when ep
// divides the ranks per host) and data-parallel index r / ep. Every rank reads its own slice of the global
// batch; the non-expert parameters are replicated on every rank, the routed experts of each MoE layer are
// split into ep contiguous slices, each replicated on dp ranks.
#include <cstdint>
#include <memory>
#include <string>

#include "dist/communicator.h"
#include "model/config.h"

namespace dsv3 {

struct Parallel {
  Communicator* world = nullptr;
  int ep = 1, dp = 1, rank = 0, ep_rank = 0, dp_rank = 0;
  std::unique_ptr<Communicator> ep_group;        // ranks r / ep == mine: exchange tokens (size ep)
  std::unique_ptr<Communicator> expert_replicas; // ranks r % ep == mine: hold my expert slice (size dp)
  int64_t expert_lo = 0, expert_n = -1;          // my slice of each MoE layer's experts (-1: all)
  // GPU ranks: the same three groups as NCCL communicators over device memory (attach_device_comms; null on CPU
  // ranks). Bulk data in backend memory (gradients, parameters, token rows) travels on the bulk_* groups; small
  // host values (counts, losses, norms, the config hash) always on the host communicators above.
  std::unique_ptr<Communicator> dev_world, dev_ep_group, dev_replicas;
  Communicator& bulk_world() const { return dev_world ? *dev_world : *world; }
  Communicator& bulk_ep_group() const { return dev_ep_group ? *dev_ep_group : *ep_group; }
  Communicator& bulk_replicas() const { return dev_replicas ? *dev_replicas : *expert_replicas; }

  bool distributed() const { return world && world->size() > 1; }
  bool is_root() const { return rank == 0; }
  int size() const { return world ? world->size() : 1; }
  // Sequences of a global batch of B handled by this rank: [first, first + count).
  int64_t batch_first(int64_t B) const { return B / size() * rank; }
  int64_t batch_count(int64_t B) const { return B / size(); }
  std::string describe() const;  // "2 ranks (ep 2 x dp 1)"
};

// ep, dp: the requested degrees (0: derive; both 0: dp = world). Fails with a one-line reason unless
// ep x dp = world size and ep divides the routed experts (cfg: the model, for n_routed_experts).
Parallel make_parallel(Communicator& world, int ep, int dp, const ModelConfig& cfg);

// For ranks training on GPU `device`: NCCL communicators for the world and both groups (the world's bootstrapped
// over the host world, the groups split from it with the host groups' colors and keys, so ranks keep their
// indices). Fails with one line when this build has no NCCL.
void attach_device_comms(Parallel& p, int device);
// Fails on every rank (the same message) when the ranks were given different settings: `what` is hashed on
// each rank and the hashes compared.
void check_same_on_all_ranks(Communicator& world, const std::string& what, const char* description);

}  // namespace dsv3
