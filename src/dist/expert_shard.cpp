#include "dist/expert_shard.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace dsv3 {

ModelWeights slice_experts(const ModelWeights& full, int64_t lo, int64_t n) {
  ModelWeights w = alloc_weights(full.cfg, full.flat.dtype, true, lo, n);
  const size_t es = dtype_size(full.flat.dtype);
  for (auto& s : w.layout.specs) {
    const ParamSpec& f = full.layout.at(s.name);
    const Tensor& src = s.is_bias ? full.bias_flat : full.flat;
    Tensor& dst = s.is_bias ? w.bias_flat : w.flat;
    const size_t b = s.is_bias ? sizeof(float) : es;
    std::memcpy(static_cast<char*>(dst.data) + size_t(s.offset) * b,
                static_cast<const char*>(src.data) + size_t(f.offset) * b, size_t(shape_numel(s.shape)) * b);
  }
  return w;
}

std::vector<float> slice_flat(const ParamLayout& full, const std::vector<float>& full_flat, const ParamLayout& local) {
  if (int64_t(full_flat.size()) != full.num_params)
    fail("internal: slice_flat got {} values for {} parameters", full_flat.size(), full.num_params);
  std::vector<float> out(local.num_params);
  for (auto& s : local.specs) {
    if (s.is_bias) continue;
    std::copy_n(full_flat.data() + full.at(s.name).offset, shape_numel(s.shape), out.data() + s.offset);
  }
  return out;
}

void gather_flat(Communicator& ep_group, const ParamLayout& local, const float* local_flat, const ParamLayout& full,
                 float* full_flat) {
  const std::string first = "experts." + std::to_string(local.expert_lo) + ".";
  for (auto& s : local.specs) {
    if (s.is_bias) continue;
    const size_t at = s.name.find(".mlp.experts.");
    if (at == std::string::npos) {  // replicated: copy
      std::copy_n(local_flat + s.offset, shape_numel(s.shape), full_flat + full.at(s.name).offset);
      continue;
    }
    // The first local expert of a projection starts a contiguous block of expert_n tensors in both layouts.
    if (s.name.compare(at + 5, first.size(), first) != 0) continue;
    const std::string rest = s.name.substr(at + 5 + first.size());  // "gate_proj.weight"
    const std::string base = s.name.substr(0, at + 5) + "experts.0." + rest;
    const int64_t block = local.expert_n * shape_numel(s.shape);
    if (ep_group.size() * local.expert_n != full.expert_n)
      fail("internal: {} ranks x {} experts do not make the {} experts of the model", ep_group.size(), local.expert_n,
           full.expert_n);
    ep_group.all_gather(full_flat + full.at(base).offset, local_flat + s.offset,
                        std::vector<int64_t>(ep_group.size(), block), CommType::F32);
  }
}

}  // namespace dsv3
