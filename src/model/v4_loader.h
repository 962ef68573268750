#pragma once
// Opening a DeepSeek-V4 model directory: config, weights (dequantized to fp32 or, with --dtype bf16, to bf16
// matrices; every tensor checked by name, shape and dtype), the CPU backend.
#include <memory>
#include <string>

#include "model/v4_model.h"

namespace dsv3 {

struct LoadedV4Model {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<V4Model> model;
};

// device: cpu only; dtype: auto | f32 (every weight expanded to fp32) | bf16 (the matrices the products read in
// bf16, the rest fp32: v4_weights.h). Activations and accumulation are fp32 either way. InputError otherwise.
// auto stays f32 for V4: the released checkpoint is FP8/FP4 (no dtype to keep as it is, unlike a bf16 V3
// checkpoint) and f32 is the reference the tests and the trainer compare against; bf16 is the opt-in that halves
// the resident bytes and computes the same function on the released layout up to the products' summation order.
LoadedV4Model open_v4_model(const std::string& dir, const std::string& device = "cpu", const std::string& dtype = "auto");
// The resident matrix dtype of a --dtype value (F32 or BF16); InputError for others (fp8 says why).
DType v4_matrix_dtype(const std::string& dtype);

}  // namespace dsv3
