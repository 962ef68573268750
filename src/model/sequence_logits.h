#pragma once
// Logits of every position of B whole sequences, and of every MTP module: what `dsv3 logits` writes and what
// the reference fixtures hold. MTP module k at row i consumes token i + k with the previous stage's hidden state
// at row i and predicts token i + k + 1 (rows i < T - k).
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "model/model.h"

namespace dsv3 {

struct SequenceLogits {
  Tensor logits;            // [B, T, V] fp32, host memory
  std::vector<Tensor> mtp;  // module k at mtp[k - 1]: [B, T - k, V] (modules with T - k >= 1)
};

// ids [B * T] row-major; a fresh latent cache is made for the call.
SequenceLogits sequence_logits(Model& m, Backend& be, const std::vector<int32_t>& ids, int64_t B, int64_t T);

}  // namespace dsv3
