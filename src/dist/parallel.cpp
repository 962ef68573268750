#include "dist/parallel.h"

#include <vector>

#include "core/error.h"
#include "dist/nccl.h"

namespace dsv3 {

std::string Parallel::describe() const {
  return fmt::format("{} rank{} (ep {} x dp {}, {})", size(), size() == 1 ? "" : "s", ep, dp,
                     world ? world->transport() : "local");
}

Parallel make_parallel(Communicator& world, int ep, int dp, const ModelConfig& cfg) {
  const int W = world.size();
  if (ep < 0 || dp < 0) fail("--ep and --dp must be positive, got {} and {}", ep, dp);
  if (ep == 0 && dp == 0) ep = 1, dp = W;
  else if (ep == 0) ep = dp > 0 && W % dp == 0 ? W / dp : 0;
  else if (dp == 0) dp = W % ep == 0 ? W / ep : 0;
  if (ep < 1 || dp < 1 || ep * dp != W)
    fail("--ep x --dp must equal the number of ranks ({}), got ep {} and dp {}", W, ep, dp);
  if (ep > 1 && cfg.n_routed_experts % ep != 0)
    fail("--ep {} must divide the model's {} routed experts", ep, cfg.n_routed_experts);
  if (ep > 1 && cfg.n_routed_experts == 0) fail("--ep {} needs a model with routed experts", ep);
  Parallel p;
  p.world = &world;
  p.ep = ep, p.dp = dp, p.rank = world.rank();
  p.ep_rank = p.rank % ep, p.dp_rank = p.rank / ep;
  p.ep_group = world.split(p.dp_rank, p.rank);
  p.expert_replicas = world.split(p.ep_rank, p.rank);
  if (ep > 1) {
    p.expert_n = cfg.n_routed_experts / ep;
    p.expert_lo = int64_t(p.ep_rank) * p.expert_n;
  }
  return p;
}

void attach_device_comms(Parallel& p, int device) {
  if (!have_nccl()) fail("distributed training on GPU ranks needs NCCL: this build has none (rebuild with the CUDA toolkit's NCCL)");
  p.dev_world = make_nccl_communicator(*p.world, device);
  p.dev_ep_group = p.dev_world->split(p.dp_rank, p.rank);
  p.dev_replicas = p.dev_world->split(p.ep_rank, p.rank);
}

void check_same_on_all_ranks(Communicator& world, const std::string& what, const char* description) {
  if (world.size() <= 1) return;
  uint64_t h = 1469598103934665603ull;  // FNV-1a 64
  for (unsigned char c : what) h = (h ^ c) * 1099511628211ull;
  std::vector<int64_t> all = world.gather_all<int64_t>(int64_t(h));
  for (int r = 1; r < world.size(); ++r)
    if (all[r] != all[0])
      fail("rank {} was started with a different {} than rank 0: every rank must get the same model and options",
           r, description);
}

}  // namespace dsv3
