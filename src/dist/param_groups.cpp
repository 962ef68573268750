#include "dist/param_groups.h"

#include <algorithm>

namespace dsv3 {

namespace {

bool is_routed_expert(const std::string& name) { return name.find(".mlp.experts.") != std::string::npos; }

void add_piece(ParamGroup& g, int64_t off, int64_t n, bool decay) {
  if (!g.pieces.empty() && g.pieces.back().offset + g.pieces.back().n == off) g.pieces.back().n += n;
  else g.pieces.push_back({off, n});
  if (!g.decay.empty() && g.decay.back().decay == decay) g.decay.back().n += n;
  else g.decay.push_back({g.n, n, decay});
  g.n += n;
}

}  // namespace

std::vector<ParamGroup> make_param_groups(const ParamLayout& layout, const Parallel& par) {
  ParamGroup dense, experts;
  dense.comm = par.world;
  experts.comm = par.expert_replicas.get();
  dense.bulk = &par.bulk_world();
  experts.bulk = &par.bulk_replicas();
  const bool ep = par.ep > 1;
  for (auto& s : layout.specs) {
    if (s.is_bias) continue;
    const bool decay = s.is_matrix() && !s.is_norm;
    add_piece(ep && is_routed_expert(s.name) ? experts : dense, s.offset, shape_numel(s.shape), decay);
  }
  std::vector<ParamGroup> out;
  for (ParamGroup* g : {&dense, &experts}) {
    if (g->n == 0) continue;
    g->counts = even_counts(g->n, g->comm->size());
    for (int r = 0; r < g->comm->rank(); ++r) g->shard_lo += g->counts[r];
    out.push_back(std::move(*g));
  }
  return out;
}

void pack(const ParamGroup& g, const float* flat, float* packed) {
  for (const ParamPiece& p : g.pieces) packed = std::copy_n(flat + p.offset, p.n, packed);
}

void unpack(const ParamGroup& g, const float* packed, float* flat) {
  for (const ParamPiece& p : g.pieces) std::copy_n(packed, p.n, flat + p.offset), packed += p.n;
}

void all_reduce_grads(const std::vector<ParamGroup>& groups, float* grads) {
  for (const ParamGroup& g : groups) {
    if (g.comm->size() == 1) continue;
    std::vector<float> buf(g.n);
    pack(g, grads, buf.data());
    g.comm->all_reduce_sum(buf.data(), g.n, CommType::F32);
    unpack(g, buf.data(), grads);
  }
}

}  // namespace dsv3
