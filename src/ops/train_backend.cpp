// make_train_backend: the --device string of `dsv3 train` / `grads` / `bench-train` to a TrainBackend.
#include "ops/train_backend.h"

#include <algorithm>
#include <cctype>

#include "core/error.h"

namespace dsv3 {

std::unique_ptr<TrainBackend> make_train_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_train_backend();
  if (device == "cuda") return make_cuda_train_backend(0);
  if (device.rfind("cuda:", 0) == 0) {
    const std::string n = device.substr(5);
    const bool digits = !n.empty() && n.size() <= 4 &&
                        std::all_of(n.begin(), n.end(), [](unsigned char ch) { return std::isdigit(ch); });
    if (digits) return make_cuda_train_backend(std::stoi(n));
  }
  fail("unknown device '{}': use cpu, cuda or cuda:N (N = GPU index)", device);
}

TrainBackend::Precision parse_precision(const std::string& s) {
  if (s == "default") return TrainBackend::Precision::Default;
  if (s == "fp8") return TrainBackend::Precision::FP8;
  fail("unknown --precision '{}' (default or fp8)", s);
}

void TrainBackend::fp8_linear_forward(float*, const float*, const float*, int64_t, int64_t, int64_t) {
  fail("FP8 training products are not available on the {} training backend", name());
}
void TrainBackend::fp8_linear_backward(float*, bool, float*, const float*, const float*, const float*, int64_t,
                                       int64_t, int64_t) {
  fail("FP8 training products are not available on the {} training backend", name());
}

}  // namespace dsv3
