#include "train/param_memory.h"

#include "core/error.h"

namespace dsv3 {

ParamMemory::ParamMemory(TrainBackend& be, ModelWeights& params, ModelWeights& grads)
    : be_(be), P_(params), G_(grads), p_(&be), g_(&be), b_(&be) {
  if (P_.flat.dtype != DType::F32 || G_.flat.dtype != DType::F32) fail("training needs fp32 parameters and gradients");
  const int64_t n = P_.flat.numel(), nb = P_.bias_flat.numel();
  if (be_.is_host()) {
    params_ = P_.flat.ptr<float>(), grads_ = G_.flat.ptr<float>();
    biases_ = nb ? P_.bias_flat.ptr<float>() : nullptr;
  } else {
    params_ = p_.resize(size_t(n)), grads_ = g_.resize(size_t(n)), biases_ = nb ? b_.resize(size_t(nb)) : nullptr;
    be_.upload(params_, P_.flat.ptr<float>(), size_t(n) * sizeof(float));
    if (nb) be_.upload(biases_, P_.bias_flat.ptr<float>(), size_t(nb) * sizeof(float));
  }
  zero_grads();
}

void ParamMemory::zero_grads() { be_.fill(grads_, 0.f, G_.flat.numel()); }

void ParamMemory::download_params() {
  if (!be_.is_host()) be_.download(P_.flat.ptr<float>(), params_, size_t(P_.flat.numel()) * sizeof(float));
}

void ParamMemory::download_grads() {
  if (!be_.is_host()) be_.download(G_.flat.ptr<float>(), grads_, size_t(G_.flat.numel()) * sizeof(float));
}

void ParamMemory::upload_biases(int64_t offset, int64_t n) {
  if (!be_.is_host() && n > 0)
    be_.upload(biases_ + offset, P_.bias_flat.ptr<float>() + offset, size_t(n) * sizeof(float));
}

}  // namespace dsv3
