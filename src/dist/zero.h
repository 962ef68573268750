#pragma once
// ZeRO stage 1 AdamW: gradients reduce-scattered, optimizer state sharded, parameters all-gathered. Each
// parameter group (dist/param_groups.h) is split into contiguous shards over the ranks that hold it; one step
//   1. packs the group's gradients and reduce-scatters them: this rank gets the summed gradient of its shard;
//   2. the global gradient norm = sqrt(world sum of every shard's sum of squares) (each element counted once);
//   3. AdamW (the backend's fused update, PyTorch semantics, clipping as train/optimizer.h) on the shard only,
//      with moments of the shard's size;
//   4. all-gathers the updated shards into every rank's parameters.
// With one rank this is the plain AdamW of train/optimizer.h (same update, same clipping). The shards live in the
// backend's memory and the collectives run on each group's bulk communicator (MPI on CPU ranks, NCCL on GPU ranks);
// the norm's partial sums travel on the host communicator.
// Memory per rank: the parameters and gradients, plus 4 x the shard (moments, reduced gradient, updated
// parameters); without expert parallelism the collectives work in place on the flat buffers.
#include <cstdint>
#include <vector>

#include "dist/param_groups.h"
#include "ops/train_backend.h"
#include "train/optimizer.h"

namespace dsv3 {

class ShardedAdamW {
 public:
  ShardedAdamW(TrainBackend& be, const ParamLayout& layout, const Parallel& par, AdamWConfig cfg);
  // params, grads: this rank's flat buffers (grads are summed over ranks in place for the shard, the rest of
  // grads is left partial). Returns the global gradient norm before clipping.
  double step(float* params, float* grads, double lr);
  // Moments in this rank's flat layout [num_params] (every rank gets the whole local layout: collective).
  void get_moments(std::vector<float>& m, std::vector<float>& v);
  // From moments in this rank's flat layout (each rank keeps its shards).
  void set_moments(const std::vector<float>& m, const std::vector<float>& v);
  int64_t t = 0;
  int64_t state_elements() const;  // moments held by this rank (2 per shard element)

 private:
  struct Shard {
    TBuf<float> m, v, g, p;  // [shard_n] moments, gradient, parameters (backend memory)
    TBuf<float> packed;      // [group n] staging, only for a group of several runs (expert parallelism)
  };
  // packed[g.n] = the group's pieces of flat, and back (backend copies).
  void pack_dev(const ParamGroup& g, const float* flat, float* packed);
  void unpack_dev(const ParamGroup& g, const float* packed, float* flat);
  TrainBackend& be_;
  const Parallel& par_;
  std::vector<ParamGroup> groups_;
  std::vector<Shard> shards_;
  int64_t num_params_;
  AdamWConfig cfg_;
};

}  // namespace dsv3
