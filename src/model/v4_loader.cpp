#include "model/v4_loader.h"

#include <filesystem>

namespace dsv3 {

DType v4_matrix_dtype(const std::string& dtype) {
  if (dtype == "auto" || dtype == "f32") return DType::F32;
  if (dtype == "bf16") return DType::BF16;
  if (dtype == "fp8")
    fail("DeepSeek-V4 models load with --dtype auto, f32 or bf16, not fp8 yet: the CPU fp8 product quantizes the "
         "activations in 1x128 tiles (the DeepSeek-V3 recipe), which the V4 path does not compute; --dtype bf16 "
         "holds the released FP8/FP4 values exactly in half the fp32 bytes");
  fail("unknown --dtype '{}' for a DeepSeek-V4 model (auto, f32 or bf16)", dtype);
}

LoadedV4Model open_v4_model(const std::string& dir, const std::string& device, const std::string& dtype) {
  if (!std::filesystem::is_directory(dir)) fail("model directory {} does not exist", dir);
  if (device != "cpu") fail("DeepSeek-V4 models run on the CPU only for now (got --device {})", device);
  const DType matrices = v4_matrix_dtype(dtype);
  V4Config c = V4Config::load(dir);
  LoadedV4Model lm;
  lm.backend = make_cpu_backend();
  lm.model = std::make_unique<V4Model>(load_v4_weights(c, dir, /*dequantize=*/true, matrices), *lm.backend);
  return lm;
}

}  // namespace dsv3
