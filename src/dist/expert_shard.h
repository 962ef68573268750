#pragma once
// Moving flat parameter-layout arrays (parameters, AdamW moments) between the full model's layout and an
// expert-parallel rank's slice (make_param_layout with an expert range): every tensor but the routed experts
// is the same in both; the slice has experts [lo, lo + n) of each MoE layer, under their global names.
#include <cstdint>
#include <vector>

#include "dist/communicator.h"
#include "model/weights.h"

namespace dsv3 {

// The slice of a full model (host, any float dtype kept): non-expert tensors, biases and experts [lo, lo + n).
ModelWeights slice_experts(const ModelWeights& full, int64_t lo, int64_t n);
// local[local.num_params] = the local layout's elements of full_flat [full.num_params].
std::vector<float> slice_flat(const ParamLayout& full, const std::vector<float>& full_flat, const ParamLayout& local);
// full_flat [full.num_params] = every rank's local_flat put together: the non-expert tensors from this rank
// (identical on every rank of the group), each MoE layer's experts all-gathered over ep_group in rank order.
// Collective over ep_group.
void gather_flat(Communicator& ep_group, const ParamLayout& local, const float* local_flat, const ParamLayout& full,
                 float* full_flat);

}  // namespace dsv3
