// Loading a checkpoint straight into GPU memory (load_weights with a CUDA backend as target) gives exactly the
// parameters of the host load: bf16 copies, fp32 -> bf16 conversion and fp8 dequantization on the device
// must all be bit-identical to the host path. Skips without a GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "model/weights.h"
#include "ops/backend.h"

using namespace dsv3;

namespace {

std::vector<float> as_f32(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  convert_to_f32(t.dtype, t.data, v.data(), v.size());
  return v;
}

}  // namespace

TEST(CudaLoader, StraightToDeviceEqualsHostLoad) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto be = make_backend("cuda");
  for (const char* name : {"tiny-fp8", "tiny-bf16-yarn", "tiny-fp32", "tiny-mtp"})
    for (const char* dtype : {"auto", "bf16", "f32"}) {
      const std::string dir = std::string(DSV3_TEST_DATA) + "/" + name;
      ModelConfig cfg = ModelConfig::load(dir);
      LoadOptions lo;
      lo.dtype = dtype;
      ModelWeights host = load_weights(cfg, dir, lo);
      ModelWeights dev = load_weights(cfg, dir, lo, be.get());
      ASSERT_EQ(dev.flat.device, Device::CUDA) << name;
      ASSERT_EQ(dev.flat.dtype, host.flat.dtype) << name << " " << dtype;
      const std::vector<float> a = as_f32(be->to_host(dev.flat)), b = as_f32(host.flat);
      ASSERT_EQ(a.size(), b.size());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << name << " " << dtype << ": parameters differ";
      const std::vector<float> c = as_f32(be->to_host(dev.bias_flat)), d = as_f32(host.bias_flat);
      EXPECT_EQ(c, d) << name << " biases";
      // The views point into the device buffer.
      EXPECT_EQ(dev.lm_head.device, Device::CUDA);
    }
}
