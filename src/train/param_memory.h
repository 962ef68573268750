#pragma once
// The trainable state in a TrainBackend's memory: parameters, gradients and selection biases with the flat
// layouts of host ModelWeights. On a host backend these are the host buffers themselves (no copy, no extra
// memory); on a device backend, device copies made once here. The host ModelWeights stay the layout and the
// copy that checkpoints are written from: download_params() refreshes them.
#include <cstdint>

#include "model/weights.h"
#include "ops/train_backend.h"
#include "train/train_model.h"

namespace dsv3 {

class ParamMemory {
 public:
  // Uploads params.flat and params.bias_flat; gradients start at zero.
  ParamMemory(TrainBackend& be, ModelWeights& params, ModelWeights& grads);
  float* params() { return params_; }
  float* grads() { return grads_; }
  float* biases() { return biases_; }
  TrainMemory view() { return {params_, grads_, biases_}; }
  void zero_grads();
  void download_params();  // backend params -> params.flat (nothing to do on a host backend)
  void download_grads();   // backend grads -> grads.flat
  void upload_biases(int64_t offset, int64_t n);  // params.bias_flat[offset, offset + n) -> backend

 private:
  TrainBackend& be_;
  ModelWeights& P_;
  ModelWeights& G_;
  TBuf<float> p_, g_, b_;
  float *params_, *grads_, *biases_;
};

}  // namespace dsv3
