// The training model's loss and every parameter gradient against transformers' (tests/data/tiny-fp32:
// reference.safetensors holds loss and grad.<name>, computed by torch autograd in fp32).
#include <gtest/gtest.h>

#include <cmath>

#include "io/safetensors.h"
#include "model/weights.h"
#include "train/train_model.h"

using namespace dsv3;

namespace {

double rel_err(const Tensor& a, const Tensor& ref) {
  double d = 0, n = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double x = a.ptr<float>()[i], y = ref.ptr<float>()[i];
    d += (x - y) * (x - y);
    n += y * y;
  }
  return std::sqrt(d) / std::max(std::sqrt(n), 1e-30);
}

}  // namespace

TEST(TrainGrads, TinyFp32MatchesTransformers) {
  const std::string dir = std::string(DSV3_TEST_DATA) + "/tiny-fp32";
  ModelConfig cfg = ModelConfig::load(dir);
  LoadOptions lo;
  lo.dtype = "f32";
  ModelWeights w = load_weights(cfg, dir, lo);
  ModelWeights g = alloc_weights(cfg, DType::F32);
  SafetensorsFile ref(dir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids");
  ASSERT_EQ(ids.dtype, DType::I32);
  auto be = make_cpu_train_backend();
  TrainModel tm(*be, cfg, w, g);
  LossOptions opt;
  opt.mtp = false;
  StepStats st = tm.run(ids.ptr<int32_t>(), ids.dim(0), ids.dim(1), opt, 1.0, true);
  const double ref_loss = ref.get("loss").ptr<float>()[0];
  EXPECT_LT(std::abs(st.total - ref_loss) / std::abs(ref_loss), 1e-5);
  int checked = 0;
  for (auto& s : g.layout.specs) {
    if (s.is_bias) continue;
    ASSERT_TRUE(ref.has("grad." + s.name)) << s.name;
    EXPECT_LT(rel_err(g.view(s.name), ref.get("grad." + s.name)), 1e-4) << s.name;
    ++checked;
  }
  EXPECT_GT(checked, 100);
  // Evaluation (no backward) gives the same loss.
  StepStats ev = tm.run(ids.ptr<int32_t>(), ids.dim(0), ids.dim(1), opt, 1.0, false);
  EXPECT_EQ(ev.total, st.total);
}
