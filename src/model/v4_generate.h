#pragma once
// Single-sequence generation with a DeepSeek-V4 model: prefill the prompt into a V4Cache, then one forward per
// new token (greedy or sampled, the same Sampler and options as the V3 path). opt.speculative_mtp (greedy only):
// MTP block 0 drafts the token after next from the main model's final streams; one main pass over [current, draft]
// verifies it (accepted: two tokens per pass; rejected: the cache is restored and the current token alone is run).
#include <functional>
#include <vector>

#include "model/generate.h"
#include "model/v4_model.h"

namespace dsv3 {

std::vector<int32_t> v4_generate(V4Model& m, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                 GenerateStats* stats = nullptr,
                                 const std::function<bool(int32_t)>& on_token = nullptr);

}  // namespace dsv3
