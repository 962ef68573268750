#pragma once
// Perplexity and bits per byte of whole documents under the model's context, with rolling windows (as
// lm-evaluation-harness' loglikelihood_rolling): the document is prefixed with BOS (EOS when there is no BOS)
// so its first token is predicted too; windows of at most `context` tokens each predict the next `stride`
// tokens not predicted yet, with as much preceding text as fits as their context.
//   perplexity    = exp(-sum log p / tokens)
//   bits_per_byte = -sum log p / ln 2 / bytes   (bytes: UTF-8 bytes of the documents' text)
#include <cstdint>
#include <vector>

#include "eval/scorer.h"

namespace dsv3 {

struct PerplexityResult {
  double logprob = 0;  // natural log, summed over every document token
  int64_t tokens = 0, bytes = 0, documents = 0, windows = 0;
  double perplexity() const;
  double bits_per_byte() const;
};

// The windows of one document: tokens[score_from..] of each are the ones it predicts (each exactly once).
std::vector<ScoreRequest> rolling_windows(const std::vector<int32_t>& doc, int32_t prefix, int64_t context,
                                          int64_t stride);

PerplexityResult perplexity(Scorer& sc, const std::vector<std::vector<int32_t>>& docs, const std::vector<int64_t>& bytes,
                            int32_t prefix, int64_t context, int64_t stride, const Progress& progress = {});

}  // namespace dsv3
