#pragma once
// Model FLOPs of training, for throughput reports: 6 x (parameters a token's forward multiplies by) per
// token (2 forward + 4 backward, the usual convention; attention scores, norms and the optimizer excluded).
#include <cstdint>

#include "model/config.h"
#include "model/weights.h"

namespace dsv3 {

// Parameters one token's training forward multiplies by: every main-model matrix and norm except the
// embedding (a row lookup), lm_head included, routed experts counted only for the top-k chosen
// (num_experts_per_tok of n_routed_experts) plus the shared experts. With `mtp`, each MTP module adds its
// active parameters (eh_proj, norms, its decoder layer) and lm_head once more, which it runs again.
int64_t train_active_params(const ModelConfig& cfg, const ParamLayout& layout, bool mtp);

}  // namespace dsv3
