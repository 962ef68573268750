#pragma once
// The training loop behind `dsv3 train`: data windows -> forward/backward (with gradient accumulation) ->
// AdamW -> auxiliary-loss-free bias update -> metrics, validation, checkpoints, on one TrainBackend (--device). Deterministic given the seed:
// the same arguments give the same losses bit for bit, and --resume continues a run exactly.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "train/optimizer.h"

namespace dsv3 {

struct TrainArgs {
  std::string config, init_from, resume, out = "out", data, save_dtype = "f32";
  std::string device = "cpu";                // cpu | cuda | cuda:N (make_train_backend)
  std::string precision = "default";         // default | fp8 (the FP8 recipe's products, TrainBackend::Precision)
  int64_t batch = 8, seq = 256, grad_accum = 1, steps = 0, tokens = 0, stop_after = 0;
  LrSchedule sched;                          // lr, min_lr, warmup, kind, decay_frac (total set from steps)
  AdamWConfig adam;
  double bias_gamma = 0.001;                 // aux-loss-free bias step (0: off)
  double balance_alpha = 1e-4;               // sequence-wise balance loss weight (0: off)
  double mtp_lambda = 0.3;                   // MTP loss weight (0: off)
  int64_t eval_every = 0, eval_batches = 8, save_every = 0, log_every = 10;
  uint64_t seed = 0;
  bool report = true;

  nlohmann::json to_json() const;
  static TrainArgs from_json(const nlohmann::json& j);
};

// Runs training; returns normally after the last step or on SIGINT (after saving). Throws InputError on bad
// input and when the loss stops being finite (nothing is saved then; the last checkpoint stays).
void run_training(const TrainArgs& args);

}  // namespace dsv3
