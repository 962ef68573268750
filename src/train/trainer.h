#pragma once
// The training loop behind `dsv3 train`: data windows -> forward/backward (with gradient accumulation) ->
// AdamW -> auxiliary-loss-free bias update -> metrics, validation, checkpoints, on one TrainBackend (--device). Deterministic given the seed:
// the same arguments give the same losses bit for bit, and --resume continues a run exactly.
#include <cstdint>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "train/optimizer.h"

namespace dsv3 {

struct TrainArgs {
  std::string config, init_from, resume, out = "out", data, save_dtype = "f32";
  std::string device = "cpu";                // cpu | cuda | cuda:N (make_train_backend)
  std::string precision = "default";         // default | fp8 (the FP8 recipe's products, TrainBackend::Precision)
  std::string optimizer = "adamw";           // adamw | muon (DeepSeek-V4 models only: train/muon.h)
  int64_t batch = 8, seq = 256, grad_accum = 1, steps = 0, tokens = 0, stop_after = 0;
  LrSchedule sched;                          // lr, min_lr, warmup, kind, decay_frac (total set from steps)
  AdamWConfig adam;
  double bias_gamma = 0.001;                 // aux-loss-free bias step (0: off)
  double balance_alpha = 1e-4;               // sequence-wise balance loss weight (0: off)
  double mtp_lambda = 0.3;                   // MTP loss weight (0: off)
  int64_t eval_every = 0, eval_batches = 8, save_every = 0, log_every = 10;
  int ep = 0, dp = 0;                        // expert / data parallel degrees under mpirun (0: derive, dist/parallel.h)
  uint64_t seed = 0;
  bool report = true;

  nlohmann::json to_json() const;
  static TrainArgs from_json(const nlohmann::json& j);
};

// The arguments of `--resume DIR` (DIR or DIR/checkpoint): the run's saved options, with `given` (options set
// now, keyed by their long names as in to_json) overriding them; out defaults to the checkpoint's parent.
TrainArgs resume_args(const std::string& resume, const nlohmann::json& given);
// Keeps the metrics.jsonl lines of steps <= step (a resumed run rewrites what came after its checkpoint).
void truncate_metrics(const std::string& path, int64_t step);

// Called after every optimizer step with that step's metrics.jsonl record ({"type": "train", "step", "loss",
// "lr", "grad_norm", "maxvio", ...}) and after every validation with its record ({"type": "val", ...}).
// Returning false stops the run like Ctrl-C: the checkpoint is saved and run_training returns. An exception
// thrown by it propagates (nothing is saved).
using TrainCallback = std::function<bool(const nlohmann::json& record)>;

struct TrainResult {
  int64_t step = 0;            // steps done in total (a resumed run counts its earlier steps)
  bool interrupted = false;    // stopped by SIGINT or by the callback before the last step
  std::string checkpoint;      // OUT/checkpoint
};

// Under mpirun every rank calls it with the same arguments: --batch is the global batch (each rank trains
// batch / world sequences of it), gradients and optimizer state are sharded ZeRO-1 style over the ranks
// (dist/zero.h), the routed experts over --ep ranks (dist/expert_parallel.h); rank 0 writes the metrics and
// the one checkpoint, which any world size resumes.
// Runs training; returns after the last step, at --stop-after, or on SIGINT / a callback returning false (after
// saving). Throws InputError on bad input and when the loss stops being finite (nothing is saved then; the last
// checkpoint stays). handle_sigint: install the SIGINT handler that saves and stops (the CLI); a caller that
// watches for interrupts itself (the Python package, through on_step) passes false.
TrainResult run_training(const TrainArgs& args, const TrainCallback& on_step = nullptr, bool handle_sigint = true);

}  // namespace dsv3
