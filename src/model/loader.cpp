#include "model/loader.h"

#include <filesystem>

namespace dsv3 {

ModelWeights upload_weights(ModelWeights w, Backend& be) {
  if (be.device() == Device::CPU) return w;
  w.flat = be.upload(w.flat);
  w.bias_flat = be.upload(w.bias_flat);
  w.bind();
  return w;
}

LoadedModel open_model(const std::string& dir, const std::string& device, const std::string& dtype) {
  if (!std::filesystem::is_directory(dir)) fail("model directory {} does not exist", dir);
  LoadedModel lm;
  lm.dir = dir;
  ModelConfig cfg = ModelConfig::load(dir);
  lm.backend = make_backend(device);
  LoadOptions lo;
  lo.dtype = dtype;
  ModelWeights w = load_weights(cfg, dir, lo, lm.backend.get());  // straight into the backend's memory
  lm.model = std::make_unique<Model>(cfg, std::move(w), *lm.backend);
  return lm;
}

}  // namespace dsv3
