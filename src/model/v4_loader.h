#pragma once
// Opening a DeepSeek-V4 model directory: config, weights (dequantized to fp32, every tensor checked by name,
// shape and dtype), the CPU backend.
#include <memory>
#include <string>

#include "model/v4_model.h"

namespace dsv3 {

struct LoadedV4Model {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<V4Model> model;
};

// device: cpu only; dtype: auto | f32 (V4 runs in fp32). InputError otherwise.
LoadedV4Model open_v4_model(const std::string& dir, const std::string& device = "cpu", const std::string& dtype = "auto");

}  // namespace dsv3
