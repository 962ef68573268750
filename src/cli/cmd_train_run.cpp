// `dsv3 train` and `dsv3 plot`.
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "train/checkpoint.h"
#include "train/report.h"
#include "train/trainer.h"

namespace dsv3::cli {

void add_train_run(CLI::App& app) {
  auto* c = app.add_subcommand("train", "Train a DeepSeek-V3-architecture model on the CPU or a GPU (AdamW, MTP, "
                                        "aux-loss-free balancing), or a DeepSeek-V4 model on the CPU (AdamW or Muon), "
                                        "writing hub checkpoints");
  auto a = std::make_shared<TrainArgs>();
  auto no_report = std::make_shared<bool>(false);
  c->add_option("--config", a->config, "Model config.json: start from random weights (std = initializer_range)");
  c->add_option("--init-from", a->init_from, "Start from the weights of this hub directory");
  c->add_option("--resume", a->resume, "Continue a run from its checkpoint directory (OUT/checkpoint) exactly");
  c->add_option("--data", a->data, "Data directory made by dsv3 prepare-data");
  c->add_option("--device", a->device, "cpu | cuda | cuda:N (GPU index): where the model trains")->capture_default_str();
  c->add_option("--precision", a->precision, "default (fp32 on the CPU, bf16 tensor cores on cuda) | fp8 (the "
                "DeepSeek-V3 FP8 recipe for every linear layer and expert; kept in a resumed run)")->capture_default_str();
  c->add_option("--optimizer", a->optimizer, "adamw | muon (DeepSeek-V4 models: Newton-Schulz orthogonalized momentum "
                "for the matrices, AdamW for embedding, head, norms, mHC base/scale, sinks)")->capture_default_str();
  c->add_option("--out", a->out, "Output directory: checkpoint/, metrics.jsonl, report.html")->capture_default_str();
  c->add_option("--batch", a->batch, "Sequences per micro-batch")->capture_default_str();
  c->add_option("--seq", a->seq, "Tokens per sequence")->capture_default_str();
  c->add_option("--grad-accum", a->grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  c->add_option("--steps", a->steps, "Optimizer steps (or give --tokens)");
  c->add_option("--tokens", a->tokens, "Training budget in tokens (steps = ceil(tokens / tokens per step))");
  c->add_option("--lr", a->sched.lr, "Peak learning rate")->capture_default_str();
  c->add_option("--min-lr", a->sched.min_lr, "Final learning rate of cosine / wsd decay")->capture_default_str();
  c->add_option("--warmup", a->sched.warmup, "Linear warmup steps")->capture_default_str();
  c->add_option("--lr-schedule", a->sched.kind, "cosine | constant | wsd (warmup-stable-decay)")->capture_default_str();
  c->add_option("--wsd-decay", a->sched.decay_frac, "Fraction of steps in the final decay of wsd")->capture_default_str();
  c->add_option("--beta1", a->adam.beta1, "AdamW beta1")->capture_default_str();
  c->add_option("--beta2", a->adam.beta2, "AdamW beta2")->capture_default_str();
  c->add_option("--eps", a->adam.eps, "AdamW epsilon")->capture_default_str();
  c->add_option("--weight-decay", a->adam.weight_decay, "Decoupled weight decay on matrices")->capture_default_str();
  c->add_option("--clip", a->adam.clip, "Global gradient-norm clip (0: off)")->capture_default_str();
  c->add_option("--bias-gamma", a->bias_gamma, "Aux-loss-free bias update speed gamma (0: off)")->capture_default_str();
  c->add_option("--balance-alpha", a->balance_alpha, "Sequence-wise balance loss weight alpha (0: off)")->capture_default_str();
  c->add_option("--mtp-lambda", a->mtp_lambda, "MTP loss weight lambda (0: main loss only)")->capture_default_str();
  c->add_option("--eval-every", a->eval_every, "Validation every N steps (0: only at the end if val data exists)");
  c->add_option("--eval-batches", a->eval_batches, "Validation batches per evaluation")->capture_default_str();
  c->add_option("--save-every", a->save_every, "Checkpoint every N steps (always at the end and on Ctrl-C)");
  c->add_option("--log-every", a->log_every, "Progress line every N steps when stderr is not a terminal")->capture_default_str();
  c->add_option("--seed", a->seed, "Seed for initialization and data sampling")->capture_default_str();
  c->add_option("--save-dtype", a->save_dtype, "model.safetensors dtype: f32 | bf16")->capture_default_str();
  c->add_option("--stop-after", a->stop_after, "Stop (and save) after this many steps of this invocation, keeping the schedule of --steps");
  c->add_flag("--no-report", *no_report, "Do not write report.html at the end");
  c->add_option("--ep", a->ep, "Under mpirun: expert-parallel ranks, each owning E/ep routed experts of every MoE "
                               "layer (default 1)");
  c->add_option("--dp", a->dp, "Under mpirun: data-parallel degree, ep x dp = ranks (default ranks / ep)");
  c->callback([=] {
    TrainArgs args = *a;
    if (!a->resume.empty()) {
      // A resumed run keeps the saved options; options given now override them.
      nlohmann::json now = a->to_json(), given = nlohmann::json::object();
      for (auto* o : c->get_options()) {
        if (o->count() == 0 || o->get_lnames().empty()) continue;
        const std::string k = o->get_lnames()[0];
        if (now.contains(k)) given[k] = now[k];
      }
      args = resume_args(a->resume, given);
      args.stop_after = a->stop_after;
    }
    args.report = !*no_report;
    run_training(args);
  });

  auto* p = app.add_subcommand("plot", "Draw a training run's metrics.jsonl as a self-contained HTML report "
                                       "(several files: the runs side by side)");
  auto metrics = std::make_shared<std::vector<std::string>>();
  auto labels = std::make_shared<std::vector<std::string>>();
  auto out = std::make_shared<std::string>();
  p->add_option("--metrics", *metrics, "metrics.jsonl written by dsv3 train (two or more: a comparison)")->required();
  p->add_option("--labels", *labels, "Names of the compared runs, one per metrics file");
  p->add_option("--output", *out, "HTML file to write")->required();
  p->callback([=] {
    if (metrics->size() == 1) {
      if (!labels->empty()) fail("--labels names compared runs: give two or more --metrics files");
      write_report(metrics->front(), *out);
    } else {
      write_comparison(*metrics, *labels, *out);
    }
    std::fprintf(stderr, "wrote %s\n", out->c_str());
  });
}

}  // namespace dsv3::cli
