#pragma once
// `dsv3 train` for DeepSeek-V4 models (model_type deepseek_v4; run_training dispatches here): data windows ->
// V4TrainModel forward/backward (gradient accumulation) -> AdamW or Muon (--optimizer) -> the auxiliary-loss-free
// bias update of the `moe` layers (hash_moe layers route by their fixed table and have no bias) -> metrics,
// validation, checkpoints in the hub layout (release names: dsv3 logits / generate / info and train --init-from
// read them), MTP blocks with --mtp-lambda (mtp_loss in the metrics). CPU, fp32, one process. Not yet: --resume, the
// sequence-wise balance loss, bf16 checkpoints.
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
