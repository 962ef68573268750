// Built when cuDNN or its frontend headers were not found: callers keep the hand-written attention kernel.
#include "ops/cuda/cudnn/attention.h"

namespace dsv3::cuda::cudnn {

bool available() { return false; }

bool causal_attention(const CausalAttention&, cudaStream_t, const char** why) {
  if (why) *why = "built without cuDNN";
  return false;
}

}  // namespace dsv3::cuda::cudnn
