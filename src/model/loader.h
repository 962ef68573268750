#pragma once
// Opening a model directory on a device: config, weights (checked against the config), backend.
#include <memory>
#include <string>

#include "model/model.h"

namespace dsv3 {

struct LoadedModel {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::string dir;
};

// device: cpu | cuda | cuda:N; dtype: auto | f32 | bf16 (see LoadOptions).
// experts: an expert-parallel group (dist/); with more than one rank, only this rank's slice of each MoE
// layer's routed experts is loaded and the model exchanges expert work with the group (Model::set_expert_parallel).
LoadedModel open_model(const std::string& dir, const std::string& device = "cpu", const std::string& dtype = "auto",
                       Communicator* experts = nullptr);
// Moves CPU weights to a backend (a no-op on the CPU) and rebinds the views.
ModelWeights upload_weights(ModelWeights w, Backend& be);

}  // namespace dsv3
