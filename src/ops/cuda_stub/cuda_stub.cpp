// Built when nvcc is absent: the CUDA backend is reported as unavailable with a clear message.
#include "core/error.h"
#include "ops/backend.h"
#include "ops/train_backend.h"

namespace dsv3 {

bool cuda_available() { return false; }

std::unique_ptr<Backend> make_cuda_backend(int) {
  fail("this dsv3 was built without CUDA (nvcc was not found at configure time); use --device cpu");
}

std::unique_ptr<TrainBackend> make_cuda_train_backend(int) {
  fail("this dsv3 was built without CUDA (nvcc was not found at configure time); use --device cpu");
}

}  // namespace dsv3
