#pragma once
// `dsv3 train` for DeepSeek-V4 models (model_type deepseek_v4; run_training dispatches here): data windows ->
// V4TrainModel forward/backward (gradient accumulation; CE plus the sequence-wise balance loss of the `moe`
// layers, --balance-alpha; MTP blocks with --mtp-lambda, mtp_loss in the metrics) -> AdamW or Muon (--optimizer)
// -> the auxiliary-loss-free bias update of the `moe` layers (hash_moe layers route by their fixed table and have
// neither bias nor balance loss) -> metrics, validation, checkpoints in the hub layout (release names: dsv3 logits /
// generate / info / eval and train --init-from read them) with the V3 trainer's state files (train/checkpoint.h):
// trainer_state.safetensors holds adam.m, adam.v (and muon.momentum for Muon), f32 [num_params];
// trainer_state.json the step, tokens, optimizer step (adam_t), data RNG, model_type, optimizer and options.
// --resume continues exactly (the same losses bit for bit as an uninterrupted run); the selection biases and hash
// tables travel in model.safetensors (f32). CPU, fp32, one process. Not yet: bf16 checkpoints.
#include "model/v4_weights.h"
#include "train/trainer.h"

namespace dsv3 {

TrainResult run_v4_training(const TrainArgs& args, const TrainCallback& on_step, bool handle_sigint);

// Random weights as transformers' _init_weights (docs/deepseek-v4.md 10.4): matrices and the embedding
// N(0, initializer_range), RMSNorm weights and mHC scales 1, mHC base, sinks, position biases and selection biases
// 0. hash_moe layers get a fixed random table of K distinct experts per token (seeded; the releases ship theirs).
V4Weights init_v4_weights(const V4Config& c, uint64_t seed);

// model.safetensors (release names, fp32, selection biases and tid2eid included) + config.json (config_json, the
// text of the source config) into dir.
void save_v4_model(const std::string& dir, const V4Weights& w, const std::string& config_json);

}  // namespace dsv3
