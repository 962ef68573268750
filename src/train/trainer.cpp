#include "train/trainer.h"

#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <tuple>

#include "dist/expert_shard.h"
#include "dist/parallel.h"
#include "dist/runtime.h"
#include "dist/zero.h"
#include "io/atomic_file.h"
#include "model/weights.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/param_memory.h"
#include "train/profile.h"
#include "train/report.h"
#include "train/stop_signal.h"
#include "train/train_model.h"
#include "train/v4_trainer.h"
#include "model/v4_config.h"

namespace dsv3 {

namespace fs = std::filesystem;
using json = nlohmann::json;

json TrainArgs::to_json() const {
  return {{"config", config}, {"init-from", init_from}, {"out", out}, {"data", data}, {"save-dtype", save_dtype},
          {"batch", batch}, {"seq", seq}, {"grad-accum", grad_accum}, {"steps", steps}, {"tokens", tokens},
          {"lr", sched.lr}, {"min-lr", sched.min_lr}, {"warmup", sched.warmup}, {"lr-schedule", sched.kind},
          {"wsd-decay", sched.decay_frac}, {"beta1", adam.beta1}, {"beta2", adam.beta2}, {"eps", adam.eps},
          {"weight-decay", adam.weight_decay}, {"clip", adam.clip}, {"bias-gamma", bias_gamma},
          {"balance-alpha", balance_alpha}, {"mtp-lambda", mtp_lambda}, {"eval-every", eval_every},
          {"eval-batches", eval_batches}, {"save-every", save_every}, {"log-every", log_every}, {"seed", seed},
          {"device", device}, {"ep", ep}, {"dp", dp}, {"precision", precision}, {"optimizer", optimizer}};
}

TrainArgs TrainArgs::from_json(const json& j) {
  TrainArgs a;
  auto get = [&](const char* k, auto& v) {
    if (j.contains(k)) v = j.at(k).get<std::decay_t<decltype(v)>>();
  };
  get("config", a.config), get("init-from", a.init_from), get("out", a.out), get("data", a.data);
  get("save-dtype", a.save_dtype), get("batch", a.batch), get("seq", a.seq), get("grad-accum", a.grad_accum);
  get("steps", a.steps), get("tokens", a.tokens), get("lr", a.sched.lr), get("min-lr", a.sched.min_lr);
  get("warmup", a.sched.warmup), get("lr-schedule", a.sched.kind), get("wsd-decay", a.sched.decay_frac);
  get("beta1", a.adam.beta1), get("beta2", a.adam.beta2), get("eps", a.adam.eps);
  get("weight-decay", a.adam.weight_decay), get("clip", a.adam.clip), get("bias-gamma", a.bias_gamma);
  get("balance-alpha", a.balance_alpha), get("mtp-lambda", a.mtp_lambda), get("eval-every", a.eval_every);
  get("eval-batches", a.eval_batches), get("save-every", a.save_every), get("log-every", a.log_every);
  get("seed", a.seed), get("device", a.device), get("ep", a.ep), get("dp", a.dp), get("precision", a.precision);
  get("optimizer", a.optimizer);
  return a;
}

namespace {

std::atomic<bool>& g_stop = training_stop_requested();  // Ctrl-C (train/stop_signal.h) or a stop from inside

std::string fmt_eta(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = int64_t(s);
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, (t / 60) % 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

double max_vio(const std::vector<int64_t>& load) {
  int64_t sum = 0, mx = 0;
  for (auto v : load) sum += v, mx = std::max(mx, v);
  if (sum == 0) return 0;
  const double mean = double(sum) / double(load.size());
  return double(mx) / mean - 1.0;
}

}  // namespace

// Keeps the metrics lines of steps <= `step` (a resumed run rewrites what came after its checkpoint).
void truncate_metrics(const std::string& path, int64_t step) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    try {
      if (json::parse(line).value("step", int64_t(0)) <= step) kept += line + "\n";
    } catch (...) {
    }
  }
  write_file_atomic(path, kept);
}

TrainArgs resume_args(const std::string& resume, const json& given) {
  std::string dir = resume;
  if (!is_checkpoint(dir) && is_checkpoint(dir + "/checkpoint")) dir += "/checkpoint";
  json saved = load_checkpoint_args(dir);
  saved["ep"] = 0, saved["dp"] = 0;  // the saved layout does not bind: a checkpoint resumes on any world size
  for (auto it = given.begin(); it != given.end(); ++it) saved[it.key()] = it.value();
  TrainArgs args = TrainArgs::from_json(saved);
  args.resume = dir;
  if (!given.contains("out")) args.out = fs::path(dir).parent_path().string();
  return args;
}

TrainResult run_training(const TrainArgs& a_in, const TrainCallback& on_step, bool handle_sigint) {
  // DeepSeek-V4 has its own trainer (train/v4_trainer.h), chosen by the model_type of the model to train.
  const std::string& src = !a_in.resume.empty() ? a_in.resume : !a_in.init_from.empty() ? a_in.init_from : a_in.config;
  std::string model_type;
  if (!src.empty() && (fs::exists(src) || fs::exists(fs::path(src) / "config.json"))) {
    const std::string cp = !a_in.resume.empty() && !is_checkpoint(src) && is_checkpoint(src + "/checkpoint")
                               ? src + "/checkpoint" : src;
    model_type = config_model_type(cp);
  }
  if (model_type == "deepseek_v4") return run_v4_training(a_in, on_step, handle_sigint);
  if (a_in.optimizer == "muon")
    fail("--optimizer muon is implemented for DeepSeek-V4 models only (this model is {})",
         model_type.empty() ? "not deepseek_v4" : model_type);
  if (a_in.optimizer != "adamw") fail("unknown --optimizer '{}' (adamw or muon)", a_in.optimizer);
  TrainArgs a = a_in;
  TrainResult result;
  if (a.data.empty()) fail("--data is required (a directory made by dsv3 prepare-data)");
  if (a.batch < 1 || a.seq < 2 || a.grad_accum < 1) fail("--batch >= 1, --seq >= 2 and --grad-accum >= 1 are required");
  if (a.save_dtype != "f32" && a.save_dtype != "bf16") fail("--save-dtype must be f32 or bf16, got {}", a.save_dtype);
  const int64_t tokens_per_step = a.batch * a.seq * a.grad_accum;
  int64_t total_steps = a.steps;
  if (total_steps <= 0 && a.tokens > 0) total_steps = (a.tokens + tokens_per_step - 1) / tokens_per_step;
  if (total_steps <= 0) fail("give --steps or --tokens");
  a.sched.total = total_steps;
  a.sched.validate();

  // ---- backend, model, optimizer state
  const TrainBackend::Precision precision = parse_precision(a.precision);
  const std::string device = dist::rank_device(a.device);  // under mpirun, one GPU per rank by local rank
  std::unique_ptr<TrainBackend> be = make_train_backend(device);
  be->set_precision(precision);
  ModelConfig cfg;
  ModelWeights params;
  TrainerState state;
  std::vector<float> adam_m, adam_v;
  // Under mpirun with --ep, each rank reads only its slice of the experts (the parameters, the moments).
  Communicator& world = dist::world();
  auto slice_of = [&](const ModelConfig& c) {
    Parallel p = make_parallel(world, a.ep, a.dp, c);
    return std::make_pair(p.expert_lo, p.expert_n);
  };
  if (!a.resume.empty()) {
    const auto [elo, en] = slice_of(ModelConfig::load(a.resume));
    Checkpoint ck = load_checkpoint(a.resume, elo, en);
    cfg = ck.cfg;
    params = std::move(ck.params);
    adam_m = std::move(ck.adam_m);
    adam_v = std::move(ck.adam_v);
    state = ck.state;
  } else if (!a.init_from.empty()) {
    cfg = ModelConfig::load(a.init_from);
    LoadOptions lo;
    lo.dtype = "f32";
    std::tie(lo.expert_lo, lo.expert_n) = slice_of(cfg);
    params = load_weights(cfg, a.init_from, lo);
  } else if (!a.config.empty()) {
    cfg = ModelConfig::load(a.config);
    params = init_weights(cfg, a.seed, DType::F32);
  } else {
    fail("give --config (random init), --init-from DIR or --resume CHECKPOINT");
  }
  if (a.seq > cfg.max_position_embeddings)
    fail("--seq {} exceeds the model's max_position_embeddings {}", a.seq, cfg.max_position_embeddings);

  // ---- distribution: one rank (as before) or ep x dp ranks under mpirun
  Parallel par = make_parallel(world, a.ep, a.dp, cfg);
  const bool distributed = par.distributed();
  if (distributed) {
    check_same_on_all_ranks(world, cfg.to_json().dump() + a.to_json().dump() + a.resume + std::to_string(a.stop_after),
                            "model config or training options");
    if (a.batch % par.size() != 0)
      fail("--batch {} (the global batch) must be a multiple of the {} ranks", a.batch, par.size());
    if (!be->is_host()) attach_device_comms(par, dist::device_index(device));  // NCCL for the GPU's memory
  }
  // Random init makes the whole model (the same on every rank); keep this rank's slice. A loaded model or
  // checkpoint is already the slice (the checkpoint has every expert: resharding on load).
  if (par.ep > 1 && params.layout.expert_n != par.expert_n) params = slice_experts(params, par.expert_lo, par.expert_n);
  // The host params keep the layout and the checkpoint copy; mem holds what the backend trains.
  ModelWeights grads = alloc_weights(cfg, DType::F32, true, params.layout.expert_lo,
                                     par.ep > 1 ? params.layout.expert_n : -1);
  ParamMemory mem(*be, params, grads);
  std::unique_ptr<AdamW> adam;
  std::unique_ptr<ShardedAdamW> zero;
  if (distributed) zero = std::make_unique<ShardedAdamW>(*be, params.layout, par, a.adam);
  else adam = std::make_unique<AdamW>(*be, params.layout, a.adam);
  if (!adam_m.empty()) {
    if (zero) zero->set_moments(adam_m, adam_v), zero->t = state.adam_t;
    else adam->set_moments(adam_m, adam_v), adam->t = state.adam_t;
    std::vector<float>().swap(adam_m), std::vector<float>().swap(adam_v);
  }
  auto adam_t = [&] { return zero ? zero->t : adam->t; };
  TrainModel tm(*be, cfg, params, grads, mem.view());
  std::unique_ptr<ExpertParallel> ep;
  if (par.ep > 1) {
    ep = std::make_unique<ExpertParallel>(*par.ep_group, par.bulk_ep_group(), cfg.n_routed_experts);
    tm.set_expert_parallel(ep.get());
  }
  const bool root = par.is_root();
  const int64_t local_batch = par.batch_count(a.batch), first_seq = par.batch_first(a.batch);
  const double world_n = double(par.size());

  // ---- data
  DataLoader data(a.data, a.seed);
  data.check_vocab(cfg.vocab_size);
  if (!a.resume.empty()) data.rng().set_state(state.rng.data());
  const std::string tokenizer_dir = data.meta().tokenizer;

  // ---- output
  const std::string ckpt_dir = (fs::path(a.out) / "checkpoint").string();
  const std::string metrics_path = (fs::path(a.out) / "metrics.jsonl").string();
  std::ofstream metrics;
  if (root) {  // only rank 0 writes (metrics, checkpoints, the report)
    fs::create_directories(a.out);
    if (!a.resume.empty()) truncate_metrics(metrics_path, state.step);
    else std::remove(metrics_path.c_str());
    metrics.open(metrics_path, std::ios::app);
    if (!metrics) fail("cannot write {}", metrics_path);
  }
  const bool tty = root && isatty(2);

  LossOptions lopt;
  lopt.mtp = a.mtp_lambda > 0;
  lopt.mtp_lambda = a.mtp_lambda;
  lopt.balance_alpha = a.balance_alpha;
  const auto& moe_layers = tm.moe_layers();
  const int64_t E = cfg.n_routed_experts;

  auto save = [&](const char* why) {
    state.adam_t = adam_t();
    data.rng().get_state(state.rng.data());
    state.args = a.to_json();
    mem.download_params();
    std::vector<float> m, v;
    if (zero) zero->get_moments(m, v);  // collective: every rank's shards
    else adam->get_moments(m, v);
    const DType sd = a.save_dtype == "bf16" ? DType::BF16 : DType::F32;
    if (par.ep > 1) {  // one hub directory with every expert: gather the slices (collective over each group)
      ModelWeights full = alloc_weights(cfg, DType::F32);
      gather_flat(*par.ep_group, params.layout, params.flat.ptr<float>(), full.layout, full.flat.ptr<float>());
      std::copy_n(params.bias_flat.ptr<float>(), params.bias_flat.numel(), full.bias_flat.ptr<float>());
      std::vector<float> fm(full.layout.num_params), fv(full.layout.num_params);
      gather_flat(*par.ep_group, params.layout, m.data(), full.layout, fm.data());
      gather_flat(*par.ep_group, params.layout, v.data(), full.layout, fv.data());
      if (root) save_checkpoint(ckpt_dir, cfg, full, sd, fm, fv, state, tokenizer_dir);
    } else if (root) {
      save_checkpoint(ckpt_dir, cfg, params, sd, m, v, state, tokenizer_dir);
    }
    if (distributed) {  // the others wait for rank 0's write; a failed write ends the job through abort
      world.barrier();
    }
    if (!root) return;
    if (tty) std::fprintf(stderr, "\n");
    std::fprintf(stderr, "saved %s (%s, step %lld)\n", ckpt_dir.c_str(), why, (long long)state.step);
  };

  auto evaluate = [&]() {
    const int64_t nb = std::min(a.eval_batches, data.val_batches(a.batch, a.seq));
    if (nb <= 0) return;
    std::vector<int32_t> ids(a.batch * a.seq);
    const int64_t D = cfg.num_nextn_predict_layers;
    double loss = 0;
    std::vector<double> mloss(D, 0.0);
    std::vector<int64_t> mc(D, 0), mn(D, 0);
    int64_t correct = 0, count = 0;
    for (int64_t i = 0; i < nb; ++i) {
      data.val_batch(i, a.batch, a.seq, ids.data());
      LossOptions eo = lopt;
      eo.mtp = D > 0;
      eo.mtp_lambda = a.mtp_lambda > 0 ? a.mtp_lambda : 0.3;  // the MTP heads are measured even when not trained
      StepStats s = tm.run(ids.data() + first_seq * a.seq, local_batch, a.seq, eo, 1.0, false);
      loss += s.loss / world_n;
      correct += s.main_correct, count += s.main_count;
      for (int64_t k = 0; k < D; ++k)
        mloss[k] += s.mtp_loss[k] / world_n, mc[k] += s.mtp_correct[k], mn[k] += s.mtp_count[k];
    }
    if (distributed) {  // every rank evaluated its slice of each batch: sum the means / world and the counts
      world.all_reduce_sum(&loss, 1, CommType::F64);
      world.all_reduce_sum(mloss);
      world.all_reduce_sum(&correct, 1, CommType::I64);
      world.all_reduce_sum(&count, 1, CommType::I64);
      world.all_reduce_sum(mc), world.all_reduce_sum(mn);
    }
    if (!root) return;
    json j = {{"type", "val"}, {"step", state.step}, {"val_loss", loss / double(nb)},
              {"val_acc", count ? double(correct) / double(count) : 0.0}};
    json ml = json::array(), ma = json::array();
    for (int64_t k = 0; k < D; ++k) {
      ml.push_back(mloss[k] / double(nb));
      ma.push_back(mn[k] ? double(mc[k]) / double(mn[k]) : 0.0);
    }
    j["val_mtp_loss"] = ml;
    j["val_mtp_acc"] = ma;
    metrics << j.dump() << "\n";
    metrics.flush();
    if (on_step && !on_step(j)) g_stop = true;
    if (tty) std::fprintf(stderr, "\n");
    std::string mtp;
    for (int64_t k = 0; k < D; ++k) mtp += fmt::format(" | mtp{} loss {:.4f} acc {:.3f}", k + 1, mloss[k] / double(nb), ma[k].get<double>());
    std::fprintf(stderr, "validation step %lld: loss %.4f acc %.3f%s\n", (long long)state.step, loss / double(nb),
                 j["val_acc"].get<double>(), mtp.c_str());
  };

  int64_t mtp_params = 0;
  for (auto& s : params.layout.specs)
    if (!s.is_bias && s.name.rfind("model.layers.", 0) == 0 && std::stoll(s.name.substr(13)) >= cfg.num_hidden_layers)
      mtp_params += shape_numel(s.shape);
  if (root)
  std::fprintf(stderr, "training %s on %s: %lld params (%lld in MTP modules), %lld steps of %lld tokens (batch %lld x seq %lld x accum %lld), data %s (%lld tokens)\n",
               a.resume.empty() ? "from scratch" : "resumed", be->name().c_str(), (long long)params.layout.num_params, (long long)mtp_params,
               (long long)total_steps, (long long)tokens_per_step, (long long)a.batch, (long long)a.seq,
               (long long)a.grad_accum, a.data.c_str(), (long long)data.train_tokens());
  if (root && distributed)
    std::fprintf(stderr, "distributed over %s: %lld sequences per rank, %lld of %lld experts per MoE layer, %lld "
                 "optimizer values per rank (ZeRO-1)\n", par.describe().c_str(), (long long)local_batch,
                 (long long)params.layout.expert_n, (long long)cfg.n_routed_experts, (long long)zero->state_elements());
  const SigintStop sigint_stop(handle_sigint);  // clears g_stop
  result.checkpoint = ckpt_dir;

  std::vector<int32_t> ids(a.batch * a.seq);
  const auto t_start = std::chrono::steady_clock::now();
  const int64_t first_step = state.step;
  double tok_s = 0;
  while (state.step < total_steps) {
    const auto t0 = std::chrono::steady_clock::now();
    const double lr = a.sched.at(state.step);
    mem.zero_grads();
    tm.reset_load();
    double loss = 0, bal = 0;
    const int64_t D = cfg.num_nextn_predict_layers;
    std::vector<double> mtp(D, 0.0);
    for (int64_t micro = 0; micro < a.grad_accum; ++micro) {
      // Every rank draws the same global batch (same seed, same RNG state) and trains its slice of it.
      data.next_batch(a.batch, a.seq, ids.data());
      StepStats s = tm.run(ids.data() + first_seq * a.seq, local_batch, a.seq, lopt,
                           1.0 / double(a.grad_accum) / world_n, true);
      if (distributed) {  // the global means: each rank's mean over an equal share of the rows
        std::vector<double> r = {s.total, s.loss, s.balance_loss};
        r.insert(r.end(), s.mtp_loss.begin(), s.mtp_loss.end());
        world.all_reduce_sum(r);
        s.total = r[0] / world_n, s.loss = r[1] / world_n, s.balance_loss = r[2] / world_n;
        for (size_t k = 0; k < s.mtp_loss.size(); ++k) s.mtp_loss[k] = r[3 + k] / world_n;
      }
      if (!std::isfinite(s.total))
        fail("the loss is not finite ({}) at step {}: stopping without saving{}; lower --lr or check the data",
             std::isnan(s.total) ? "NaN" : "Inf",
             state.step + 1, fs::exists(ckpt_dir) ? fmt::format(" (the last good checkpoint is {})", ckpt_dir) : "");
      loss += s.loss / double(a.grad_accum);
      bal += s.balance_loss / double(a.grad_accum);
      for (int64_t k = 0; k < D; ++k) mtp[k] += s.mtp_loss[k] / double(a.grad_accum);
    }
    double gnorm;
    {
      ProfileScope prof("adamw");
      gnorm = zero ? zero->step(mem.params(), mem.grads(), lr) : adam->step(mem.params(), mem.grads(), lr);
    }
    if (distributed) tm.all_reduce_load(world);  // the balancing bias sees the global expert counts
    if (!std::isfinite(gnorm))
      fail("the gradient norm is not finite ({}) at step {}: stopping without saving{}", std::isnan(gnorm) ? "NaN" : "Inf", state.step + 1,
           fs::exists(ckpt_dir) ? fmt::format(" (the last good checkpoint is {})", ckpt_dir) : "");
    // Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i), per MoE layer. The host biases
    // are the master copy (only this loop changes them); a device backend gets the updated slice.
    json maxvio = json::array(), loads = json::array();
    double worst = 0;
    for (size_t r = 0; r < moe_layers.size(); ++r) {
      const auto& ld = tm.load()[r];
      const double vio = max_vio(ld);
      worst = std::max(worst, vio);
      maxvio.push_back(vio);
      loads.push_back(ld);
      if (a.bias_gamma > 0 && cfg.topk_method == "noaux_tc") {  // other routers have no selection bias
        const std::string bname = "model.layers." + std::to_string(moe_layers[r]) + ".mlp.gate.e_score_correction_bias";
        Tensor b = params.view(bname);
        int64_t sum = 0;
        for (auto v : ld) sum += v;
        const double mean = double(sum) / double(E);
        for (int64_t e = 0; e < E; ++e) {
          const double d = mean - double(ld[e]);
          b.ptr<float>()[e] += float(a.bias_gamma * double((d > 0) - (d < 0)));
        }
        mem.upload_biases(params.layout.at(bname).offset, E);
      }
    }
    state.step++;
    state.tokens += tokens_per_step;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tok_s = double(tokens_per_step) / dt;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    const double eta = elapsed / double(state.step - first_step) * double(total_steps - state.step);
    json mj = {{"type", "train"}, {"step", state.step}, {"loss", loss}, {"lr", lr}, {"grad_norm", gnorm},
               {"balance_loss", bal}, {"tokens", state.tokens}, {"tok_per_s", tok_s}, {"step_s", dt},
               {"maxvio", maxvio}, {"load", loads}, {"moe_layers", moe_layers}};
    mj["mtp_loss"] = mtp;
    if (root) metrics << mj.dump() << "\n", metrics.flush();
    if (on_step && !on_step(mj)) g_stop = true;  // (the Python package; one process)
    std::string mtp_s = D > 0 ? fmt::format(" | mtp {:.4f}", mtp[0]) : "";
    const std::string line =
        fmt::format("step {}/{} | loss {:.4f}{} | lr {:.2e} | gnorm {:.3f} | {:.0f} tok/s | maxvio {:.3f} | ETA {}",
                    state.step, total_steps, loss, mtp_s, lr, gnorm, tok_s, worst, fmt_eta(eta));
    if (tty) std::fprintf(stderr, "\r%s\033[K", line.c_str());
    else if (root && (state.step % std::max<int64_t>(a.log_every, 1) == 0 || state.step == total_steps ||
                      state.step == first_step + 1))
      std::fprintf(stderr, "%s\n", line.c_str());
    if (a.eval_every > 0 && (state.step % a.eval_every == 0 || state.step == total_steps)) evaluate();
    if (distributed) g_stop = world.sum<int32_t>(g_stop ? 1 : 0) > 0;  // Ctrl-C on any rank stops all
    if (const char* f = std::getenv("DSV3_FAULT_INJECT"); f && distributed && state.step == first_step + 1) {
      // Fault tests: "hang:R" stops rank R from taking part (the others must time out), "exit:R" ends it.
      const std::string v = f;
      if (v == "hang:" + std::to_string(par.rank)) for (;;) pause();
      if (v == "exit:" + std::to_string(par.rank)) _exit(3);
    }
    if (g_stop) {
      save("interrupted");
      if (root) std::fprintf(stderr, "interrupted at step %lld; resume with --resume %s\n", (long long)state.step, ckpt_dir.c_str());
      result.step = state.step;
      result.interrupted = state.step < total_steps;
      return result;
    }
    if (a.stop_after > 0 && state.step - first_step >= a.stop_after && state.step < total_steps) {
      save("--stop-after");
      result.step = state.step;
      return result;
    }
    if (a.save_every > 0 && state.step % a.save_every == 0 && state.step < total_steps) save("periodic");
  }
  if (tty) std::fprintf(stderr, "\n");
  save("final");
  result.step = state.step;
  if (!root) return result;
  metrics.close();
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  const double rss = double(ru.ru_maxrss) * 1024.0;
  std::fprintf(stderr, "done: %lld steps, %lld tokens, last %.0f tok/s, peak RSS %.1f MiB (%.1f bytes/param)\n",
               (long long)state.step, (long long)state.tokens, tok_s, rss / 1048576.0,
               rss / double(params.layout.num_params));
  if (a.report) {
    const std::string rp = (fs::path(a.out) / "report.html").string();
    write_report(metrics_path, rp);
    std::fprintf(stderr, "report: %s\n", rp.c_str());
  }
  result.step = state.step;
  return result;
}

}  // namespace dsv3
