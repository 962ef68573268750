#include "train/flops.h"

#include <algorithm>
#include <string>

namespace dsv3 {

int64_t train_active_params(const ModelConfig& cfg, const ParamLayout& layout, bool mtp) {
  int64_t main = 0, mtp_n = 0, routed_main = 0, routed_mtp = 0, head = 0;
  for (const auto& s : layout.specs) {
    if (s.is_bias || s.name == "model.embed_tokens.weight") continue;
    const int64_t n = shape_numel(s.shape);
    if (s.name == "lm_head.weight") head = n;
    const bool in_mtp =
        s.name.rfind("model.layers.", 0) == 0 && std::stoll(s.name.substr(13)) >= cfg.num_hidden_layers;
    const bool routed = s.name.find(".mlp.experts.") != std::string::npos;
    (routed ? (in_mtp ? routed_mtp : routed_main) : (in_mtp ? mtp_n : main)) += n;
  }
  // Every expert has the same shape, so the top-k share of a layer's routed parameters is K/E of them.
  const int64_t K = cfg.num_experts_per_tok, E = std::max<int64_t>(cfg.n_routed_experts, 1);
  int64_t active = main + routed_main * K / E;
  if (mtp) active += mtp_n + routed_mtp * K / E + head * cfg.num_nextn_predict_layers;
  return active;
}

}  // namespace dsv3
