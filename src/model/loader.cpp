#include "model/loader.h"

#include <filesystem>

#include "model/v4_config.h"

namespace dsv3 {

ModelWeights upload_weights(ModelWeights w, Backend& be) {
  if (be.device() == Device::CPU) return w;
  w.flat = be.upload(w.flat);
  w.bias_flat = be.upload(w.bias_flat);
  w.bind();
  return w;
}

LoadedModel open_model(const std::string& dir, const std::string& device, const std::string& dtype,
                       Communicator* experts) {
  if (!std::filesystem::is_directory(dir)) fail("model directory {} does not exist", dir);
  if (std::filesystem::exists(std::filesystem::path(dir) / "config.json") && config_model_type(dir) == "deepseek_v4")
    fail("{} is a DeepSeek-V4 model: only `dsv3 info`, `logits`, `generate`, `serve`, `chat`, `eval` and `train` run it so far "
         "(CPU, fp32)",
         dir);
  LoadedModel lm;
  lm.dir = dir;
  ModelConfig cfg = ModelConfig::load(dir);
  lm.backend = make_backend(device);
  LoadOptions lo;
  lo.dtype = dtype;
  const bool ep = experts && experts->size() > 1;
  if (ep) {
    if (cfg.n_routed_experts == 0 || cfg.n_routed_experts % experts->size() != 0)
      fail("expert parallelism over {} ranks needs a routed-expert count divisible by it (the model has {})",
           experts->size(), cfg.n_routed_experts);
    lo.expert_n = cfg.n_routed_experts / experts->size();
    lo.expert_lo = int64_t(experts->rank()) * lo.expert_n;
  }
  ModelWeights w = load_weights(cfg, dir, lo, lm.backend.get());  // straight into the backend's memory
  lm.model = std::make_unique<Model>(cfg, std::move(w), *lm.backend);
  if (ep) lm.model->set_expert_parallel(experts);
  return lm;
}

}  // namespace dsv3
