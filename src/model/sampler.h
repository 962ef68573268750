#pragma once
// Token sampling from a row of logits: greedy (temperature 0), or temperature + top-k + top-p with a seeded RNG.
#include <cstdint>
#include <vector>

#include "core/rng.h"

namespace dsv3 {

struct SamplingParams {
  double temperature = 0.0;  // 0: greedy
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int32_t sample(const float* logits, int64_t V);
  static int32_t argmax(const float* logits, int64_t V);  // lowest index among equal maxima

 private:
  SamplingParams p_;
  Rng rng_;
};

void validate_sampling(const SamplingParams& p);  // InputError on absurd values

}  // namespace dsv3
