#pragma once
// AdamW over the flat parameter buffer (fp32 master weights), the learning-rate schedule and global-norm
// gradient clipping. Parameters, gradients and both moments share one layout (make_param_layout order), so
// the update is one fused loop over flat buffers.
#include <cstdint>
#include <string>
#include <vector>

#include "model/weights.h"

namespace dsv3 {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.1;  // decoupled; matrices only (not norms, not biases)
  double clip = 1.0;          // global gradient norm limit (0: off)
};

// lr(step), step counted from 0:
//   cosine:   linear warmup to lr over `warmup` steps, then cosine decay to min_lr at `total`
//   constant: linear warmup, then lr
//   wsd:      warmup, stable at lr, then linear decay to min_lr over the last `decay_frac` of the steps
struct LrSchedule {
  std::string kind = "cosine";
  double lr = 1e-3, min_lr = 1e-4, decay_frac = 0.2;
  int64_t warmup = 0, total = 1;
  double at(int64_t step) const;
  void validate() const;
};

// Sum of squares of n floats, in fp64, with fixed chunks summed in order (independent of thread count).
double sum_squares(const float* x, int64_t n);

class AdamW {
 public:
  AdamW(const ParamLayout& layout, AdamWConfig cfg);
  // Clips grads to cfg.clip (scaling in the update), applies one AdamW step with learning rate lr to params.
  // Returns the gradient's global norm before clipping.
  double step(float* params, const float* grads, double lr);
  std::vector<float> m, v;  // first and second moments, [num_params]
  int64_t t = 0;            // steps taken (bias correction)
  const AdamWConfig& config() const { return cfg_; }

 private:
  struct Segment {
    int64_t offset, n;
    bool decay;
  };
  std::vector<Segment> segs_;
  AdamWConfig cfg_;
};

}  // namespace dsv3
