#pragma once
// AdamW over the flat parameter buffer (fp32 master weights), the learning-rate schedule and global-norm
// gradient clipping. Parameters, gradients and both moments share one layout (make_param_layout order) and
// live in a TrainBackend's memory, so the update is one fused op per segment of that layout.
#include <cstdint>
#include <string>
#include <vector>

#include "model/weights.h"
#include "ops/train_backend.h"

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

class AdamW {
 public:
  // m and v start at zero in be's memory.
  AdamW(TrainBackend& be, const ParamLayout& layout, AdamWConfig cfg);
  // params, grads: [num_params] in the backend's memory. Clips grads to cfg.clip (scaling in the update),
  // applies one AdamW step with learning rate lr to params. Returns the gradient's global norm before clipping.
  double step(float* params, const float* grads, double lr);
  // Moments to and from host vectors [num_params] (checkpoints).
  void get_moments(std::vector<float>& m, std::vector<float>& v);
  void set_moments(const std::vector<float>& m, const std::vector<float>& v);
  int64_t t = 0;  // steps taken (bias correction)
  const AdamWConfig& config() const { return cfg_; }

 private:
  struct Segment {
    int64_t offset, n;
    bool decay;
  };
  TrainBackend& be_;
  int64_t n_;
  TBuf<float> m_, v_;  // first and second moments, [num_params]
  std::vector<Segment> segs_;
  AdamWConfig cfg_;
};

}  // namespace dsv3
