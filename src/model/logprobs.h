#pragma once
// Log-likelihood of sequences under the model: log p(token t+1 | tokens <= t) from full-sequence logits,
// the quantity lm-eval style scoring sums over a continuation.
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace dsv3 {

// logits: fp32 [B, T, V] on the host; ids: [B * T] row-major. Returns [B * (T - 1)] row-major: entry (b, t)
// is log_softmax(logits[b, t])[ids[b, t + 1]], computed in double (log-sum-exp with the row maximum).
std::vector<double> token_logprobs(const Tensor& logits, const std::vector<int32_t>& ids, int64_t B, int64_t T);

}  // namespace dsv3
