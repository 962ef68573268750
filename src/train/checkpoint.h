#pragma once
// Training checkpoints: a hub directory that transformers and dsv3 load (config.json, model.safetensors,
// tokenizer files when known) plus the trainer's state:
//   trainer_state.safetensors  adam.m, adam.v [num_params] f32; master [num_params] f32 when the model file is
//                              not f32 (so resuming is exact); the selection biases are in model.safetensors (f32)
//   trainer_state.json         step, tokens, optimizer step, data RNG state, the run's arguments
// Written into a temporary sibling directory and then swapped in with one rename, so a failure at any point
// (a full disk included) leaves the previous checkpoint as it was.
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/weights.h"

namespace dsv3 {

struct TrainerState {
  int64_t step = 0;     // optimizer steps done
  int64_t tokens = 0;   // training tokens consumed
  int64_t adam_t = 0;
  std::array<uint64_t, 4> rng{};  // data loader RNG
  nlohmann::json args;            // the run's options (informational; resume reuses them)
};

void save_checkpoint(const std::string& dir, const ModelConfig& cfg, const ModelWeights& params, DType save_dtype,
                     const std::vector<float>& adam_m, const std::vector<float>& adam_v, const TrainerState& st,
                     const std::string& tokenizer_dir);

struct Checkpoint {
  ModelConfig cfg;
  ModelWeights params;  // F32 master weights and biases
  std::vector<float> adam_m, adam_v;
  TrainerState state;
};
// expert_lo / expert_n: load only that slice of every MoE layer's routed experts (an expert-parallel rank;
// make_param_layout), parameters and moments alike, straight from the mmap'd files; -1: the whole model.
Checkpoint load_checkpoint(const std::string& dir, int64_t expert_lo = 0, int64_t expert_n = -1);
bool is_checkpoint(const std::string& dir);
// Replaces directory dst by src (atomically where the kernel supports RENAME_EXCHANGE; dst may not exist).
void swap_in_directory(const std::string& src, const std::string& dst);  // has trainer_state.json
nlohmann::json load_checkpoint_args(const std::string& dir);  // the saved run's options

}  // namespace dsv3
