#pragma once
// The parameters of a rank's (possibly expert-sliced) flat layout in two groups, by which ranks hold a copy:
//   dense    everything but the routed experts: on every rank, so reduced over the world;
//   experts  the routed experts of this rank's slice: on the dp ranks with the same slice (Parallel::
//            expert_replicas), reduced over those. Without expert parallelism everything is dense.
// A group is a list of pieces of the flat buffer (in layout order) that pack() copies into one contiguous
// array, so a collective covers the whole group in one call.
#include <cstdint>
#include <vector>

#include "dist/parallel.h"
#include "model/weights.h"

namespace dsv3 {

struct ParamPiece {
  int64_t offset, n;  // elements of the flat parameter buffer
};
struct DecaySpan {
  int64_t at, n;  // packed elements [at, at + n) of the group
  bool decay;     // AdamW weight decay applies (matrices that are not norms)
};

struct ParamGroup {
  Communicator* comm = nullptr;  // the ranks holding the group (host values)
  Communicator* bulk = nullptr;  // the same ranks for backend memory (comm itself on CPU ranks)
  std::vector<ParamPiece> pieces;   // contiguous runs of the flat buffer, merged
  std::vector<DecaySpan> decay;     // the decay flag along the packed order
  int64_t n = 0;                // elements in the group
  std::vector<int64_t> counts;  // ZeRO shard of each rank of comm (even_counts)
  int64_t shard_lo = 0;         // this rank's shard: packed elements [shard_lo, shard_lo + counts[rank])
  int64_t shard_n() const { return counts[comm->rank()]; }
  // One run of the flat buffer (no expert parallelism): collectives can use the flat buffer in place.
  bool contiguous() const { return pieces.size() == 1; }
};

std::vector<ParamGroup> make_param_groups(const ParamLayout& layout, const Parallel& par);
void pack(const ParamGroup& g, const float* flat, float* packed);    // packed[g.n] = flat's pieces
void unpack(const ParamGroup& g, const float* packed, float* flat);  // the reverse
// grads = the sum over the ranks holding each parameter (dense: world, experts: replicas), in place.
void all_reduce_grads(const std::vector<ParamGroup>& groups, float* grads);

}  // namespace dsv3
