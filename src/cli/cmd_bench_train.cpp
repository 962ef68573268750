// dsv3 bench-train: training throughput on one device. Random weights made in memory (as `dsv3 init` makes
// them) and random token ids; each step is the full forward + backward (MTP and the balance loss when the
// config has MTP modules / routed experts) + AdamW, the same work as a `dsv3 train` step. Reports tokens/s,
// ms/step and the model FLOP utilisation against a peak:
//   MFU = 6 * active params per token * tokens/s / peak   (see train/flops.h for what is counted)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/rng.h"
#include "dist/expert_shard.h"
#include "dist/parallel.h"
#include "dist/runtime.h"
#include "dist/zero.h"
#include "model/weights.h"
#include "train/flops.h"
#include "train/optimizer.h"
#include "train/param_memory.h"
#include "train/train_model.h"

#include <omp.h>

namespace dsv3::cli {

using json = nlohmann::json;

void add_bench_train(CLI::App& app) {
  auto* c = app.add_subcommand("bench-train", "Training tokens/s and model FLOP utilisation (forward + backward + "
                                              "AdamW on random weights and tokens)");
  struct Args {
    std::string config, device = "cpu", precision = "default";
    int64_t batch = 8, seq = 1024, steps = 10, warmup = 2;
    double peak_tflops = -1;
    uint64_t seed = 0;
    bool json = false;
    int ep = 0, dp = 0;
  };
  auto a = std::make_shared<Args>();
  c->add_option("--config", a->config, "Model config.json (random weights made in memory)")->required();
  c->add_option("--device", a->device, "cpu | cuda | cuda:N")->capture_default_str();
  c->add_option("--precision", a->precision, "default | fp8 (FP8 products for every linear layer and expert)")
      ->capture_default_str();
  c->add_option("--batch", a->batch, "Sequences per step")->capture_default_str();
  c->add_option("--seq", a->seq, "Tokens per sequence")->capture_default_str();
  c->add_option("--steps", a->steps, "Steps measured")->capture_default_str();
  c->add_option("--warmup", a->warmup, "Steps run before measuring")->capture_default_str();
  c->add_option("--peak-tflops", a->peak_tflops,
                "Peak TFLOP/s for the utilisation (default 989, dense bf16 of an H100/H200, on cuda; none on cpu)");
  c->add_option("--seed", a->seed, "Seed for weights and tokens")->capture_default_str();
  c->add_flag("--json", a->json, "Print one JSON object");
  c->add_option("--ep", a->ep, "Under mpirun: expert-parallel ranks (each owns E/ep routed experts)");
  c->add_option("--dp", a->dp, "Under mpirun: data-parallel degree (ep x dp = ranks); --batch is the global batch");
  c->footer("Model FLOPs per token = 6 x active parameters: every matrix and norm except the embedding, lm_head\n"
            "included, routed experts only for the top-k chosen plus the shared experts; with MTP each module adds\n"
            "its own active parameters and lm_head again. Attention scores are not counted.");
  c->callback([=] {
    if (a->batch < 1 || a->seq < 2 || a->steps < 1 || a->warmup < 0)
      fail("--batch >= 1, --seq >= 2, --steps >= 1 and --warmup >= 0 are required");
    const TrainBackend::Precision precision = parse_precision(a->precision);
    const std::string device = dist::rank_device(a->device);  // under mpirun, one GPU per rank by local rank
    std::unique_ptr<TrainBackend> be = make_train_backend(device);
    be->set_precision(precision);
    const ModelConfig cfg = ModelConfig::load(a->config);
    if (a->seq > cfg.max_position_embeddings)
      fail("--seq {} exceeds the model's max_position_embeddings {}", a->seq, cfg.max_position_embeddings);
    const double peak = a->peak_tflops >= 0 ? a->peak_tflops : (be->is_host() ? 0.0 : 989.0);

    ModelWeights params = init_weights(cfg, a->seed, DType::F32);
    const ParamLayout full_layout = params.layout;
    // Under mpirun: the layout of `dsv3 train` (each rank its slice of the batch and of the experts, ZeRO-1).
    Communicator& world = dist::world();
    Parallel par = make_parallel(world, a->ep, a->dp, cfg);
    if (par.distributed()) {
      check_same_on_all_ranks(world, cfg.to_json().dump() + fmt::format("{} {} {} {} {}", a->batch, a->seq, a->steps,
                                                                        a->warmup, a->seed), "config or options");
      if (a->batch % par.size() != 0) fail("--batch {} must be a multiple of the {} ranks", a->batch, par.size());
      if (!be->is_host()) attach_device_comms(par, dist::device_index(device));  // NCCL for the GPU's memory
    }
    if (par.ep > 1) params = slice_experts(params, par.expert_lo, par.expert_n);
    ModelWeights grads = alloc_weights(cfg, DType::F32, true, params.layout.expert_lo,
                                       par.ep > 1 ? params.layout.expert_n : -1);
    ParamMemory mem(*be, params, grads);
    std::unique_ptr<AdamW> adam;
    std::unique_ptr<ShardedAdamW> zero;
    if (par.distributed()) zero = std::make_unique<ShardedAdamW>(*be, params.layout, par, AdamWConfig{});
    else adam = std::make_unique<AdamW>(*be, params.layout, AdamWConfig{});
    TrainModel tm(*be, cfg, params, grads, mem.view());
    std::unique_ptr<ExpertParallel> ep;
    if (par.ep > 1) {
      ep = std::make_unique<ExpertParallel>(*par.ep_group, par.bulk_ep_group(), cfg.n_routed_experts);
      tm.set_expert_parallel(ep.get());
    }
    const double ranks = double(par.size());
    LossOptions opt;  // as `dsv3 train` by default
    opt.mtp = cfg.num_nextn_predict_layers > 0;
    opt.mtp_lambda = 0.3;
    opt.balance_alpha = cfg.n_routed_experts > 0 ? 1e-4 : 0.0;

    Rng rng(a->seed + 1);
    std::vector<int32_t> ids(a->batch * a->seq);
    using clk = std::chrono::steady_clock;
    double measured = 0, loss = 0;
    for (int64_t s = 0; s < a->warmup + a->steps; ++s) {
      for (auto& x : ids) x = int32_t(rng.below(uint64_t(cfg.vocab_size)));
      if (s == a->warmup) be->reset_profile();
      const auto t0 = clk::now();
      mem.zero_grads();
      loss = tm.run(ids.data() + par.batch_first(a->batch) * a->seq, par.batch_count(a->batch), a->seq, opt,
                    1.0 / ranks, true).total;
      if (zero) zero->step(mem.params(), mem.grads(), 1e-4);
      else adam->step(mem.params(), mem.grads(), 1e-4);
      be->synchronize();
      if (par.distributed()) loss = world.sum(loss) / ranks;  // also the step's end on every rank
      if (s >= a->warmup) measured += std::chrono::duration<double>(clk::now() - t0).count();
    }
    const double tokens = double(a->batch * a->seq), tok_s = tokens * double(a->steps) / measured;
    const int64_t active = train_active_params(cfg, full_layout, opt.mtp);
    if (!par.is_root()) return;
    const double tflops = 6.0 * double(active) * tok_s / 1e12;
    json j = {{"device", be->name()},
              {"precision", a->precision},
              {"batch", a->batch},
              {"seq", a->seq},
              {"steps", a->steps},
              {"total_params", full_layout.num_params},
              {"ranks", par.size()},
              {"ep", par.ep},
              {"dp", par.dp},
              {"active_params_per_token", active},
              {"mtp", opt.mtp},
              {"tokens_per_s", tok_s},
              {"ms_per_step", 1e3 * measured / double(a->steps)},
              {"achieved_tflops", tflops},
              {"last_loss", loss},
              {"threads", omp_get_max_threads()}};
    if (peak > 0) {
      j["peak_tflops"] = peak;
      j["mfu"] = tflops / peak;
    }
    if (a->json) {
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    std::printf("model     %s params, %s active per token%s, device %s\n", human(full_layout.num_params).c_str(),
                human(active).c_str(), opt.mtp ? " (MTP included)" : "", be->name().c_str());
    std::printf("train     batch %lld x seq %lld: %.0f tokens/s, %.1f ms/step (%lld steps after %lld warmup)\n",
                (long long)a->batch, (long long)a->seq, tok_s, 1e3 * measured / double(a->steps),
                (long long)a->steps, (long long)a->warmup);
    if (peak > 0)
      std::printf("flops     %.2f TFLOP/s of model FLOPs = %.1f%% of %.0f TFLOP/s peak (MFU)\n", tflops,
                  100.0 * tflops / peak, peak);
    else
      std::printf("flops     %.3f TFLOP/s of model FLOPs\n", tflops);
  });
}

}  // namespace dsv3::cli
