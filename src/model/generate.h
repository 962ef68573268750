#pragma once
// Single-sequence generation over the latent cache: prefill the prompt, then one absorbed decode step per
// token. Used by `dsv3 generate` and `dsv3 chat`; the server batches many sequences through Model::forward.
#include <functional>
#include <string>
#include <vector>

#include "model/model.h"
#include "model/sampler.h"

namespace dsv3 {

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // stop after emitting one of these (it is included in the output)
  bool absorb_decode = true;
  bool speculative_mtp = false;   // draft with MTP module 1, verify in one main-model pass (greedy only)
};

struct GenerateStats {
  int64_t prompt_tokens = 0, new_tokens = 0;
  double prefill_s = 0, decode_s = 0;
  std::string finish_reason;  // "stop" | "length"
  int64_t drafted = 0, accepted = 0;  // speculative decoding: MTP drafts proposed and accepted
};

// on_token is called for each new token; returning false stops generation.
std::vector<int32_t> generate(Model& m, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                              GenerateStats* stats = nullptr,
                              const std::function<bool(int32_t)>& on_token = nullptr);

}  // namespace dsv3
