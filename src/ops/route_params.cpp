// Routing hyper-parameters from a config, shared by the inference model and the trainer.
#include "model/config.h"
#include "ops/backend.h"

namespace dsv3 {

RouteParams RouteParams::from_config(const ModelConfig& cfg) {
  RouteParams r;
  r.n_experts = cfg.n_routed_experts;
  r.top_k = cfg.num_experts_per_tok;
  r.n_group = cfg.n_group;
  r.topk_group = cfg.topk_group;
  r.sigmoid = cfg.scoring_func == "sigmoid";
  r.norm_topk_prob = cfg.norm_topk_prob;
  r.group_limited = cfg.topk_method != "greedy";
  r.noaux_bias = cfg.topk_method == "noaux_tc";
  r.scaling = cfg.routed_scaling_factor;
  return r;
}

}  // namespace dsv3
