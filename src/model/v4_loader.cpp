#include "model/v4_loader.h"

#include <filesystem>

namespace dsv3 {

LoadedV4Model open_v4_model(const std::string& dir, const std::string& device, const std::string& dtype) {
  if (!std::filesystem::is_directory(dir)) fail("model directory {} does not exist", dir);
  if (device != "cpu") fail("DeepSeek-V4 models run on the CPU only for now (got --device {})", device);
  if (dtype != "auto" && dtype != "f32") fail("DeepSeek-V4 models run in fp32 only for now (got --dtype {})", dtype);
  V4Config c = V4Config::load(dir);
  LoadedV4Model lm;
  lm.backend = make_cpu_backend();
  lm.model = std::make_unique<V4Model>(load_v4_weights(c, dir), *lm.backend);
  return lm;
}

}  // namespace dsv3
