// The DeepSeek-V4 training loop (see v4_trainer.h).
#include "train/v4_trainer.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <unistd.h>
#include <fmt/format.h>

#include "core/rng.h"
#include "dist/parallel.h"
#include "dist/runtime.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/muon.h"
#include "train/report.h"
#include "train/stop_signal.h"
#include "train/v4_train_model.h"

namespace dsv3 {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

std::string config_path(const std::string& p) { return fs::is_directory(p) ? (fs::path(p) / "config.json").string() : p; }

std::atomic<bool>& g_stop = training_stop_requested();  // Ctrl-C (train/stop_signal.h) or a stop from inside

double max_vio(const std::vector<int64_t>& load) {
  int64_t sum = 0, mx = 0;
  for (auto v : load) sum += v, mx = std::max(mx, v);
  return sum == 0 ? 0 : double(mx) / (double(sum) / double(load.size())) - 1.0;
}

// A V4 checkpoint's trainer state (see v4_trainer.h): trainer_state.json and the flat f32 arrays of
// trainer_state.safetensors, checked against the model's parameter count and the run's optimizer.
struct V4ResumeState {
  int64_t step = 0, tokens = 0, opt_t = 0;
  uint64_t rng[4] = {};
  std::vector<float> m, v, mom;  // AdamW moments; Muon's momentum (muon only)
};

V4ResumeState load_v4_state(const std::string& dir, const std::string& optimizer, int64_t n) {
  V4ResumeState st;
  const std::string jp = (fs::path(dir) / "trainer_state.json").string();
  try {
    const json j = json::parse(read_file(jp));
    if (!j.contains("model_type") && j.contains("adam_t"))
      fail("{} is a DeepSeek-V3 trainer state, not a DeepSeek-V4 one: resume it with the model it was trained with", jp);
    if (!j.contains("adam_t"))
      fail("{} has no optimizer state (written before DeepSeek-V4 runs could resume): start a new run from its "
           "weights with --init-from {}", jp, dir);
    if (j.at("model_type").get<std::string>() != "deepseek_v4")
      fail("{} is a {} trainer state, not a DeepSeek-V4 one", jp, j.at("model_type").get<std::string>());
    const std::string was = j.at("optimizer").get<std::string>();
    if (was != optimizer)
      fail("{} was trained with --optimizer {}, not {}: resume with --optimizer {} (or start a new run from its "
           "weights with --init-from)", dir, was, optimizer, was);
    st.step = j.at("step"), st.tokens = j.at("tokens"), st.opt_t = j.at("adam_t");
    for (int i = 0; i < 4; ++i) st.rng[i] = j.at("rng").at(i).get<uint64_t>();
  } catch (const json::exception& e) {
    fail("{}: {}", jp, e.what());
  }
  const std::string sp = (fs::path(dir) / "trainer_state.safetensors").string();
  if (!fs::exists(sp)) fail("{} is missing: the checkpoint has no optimizer state", sp);
  SafetensorsFile f(sp);
  auto get = [&](const char* name, std::vector<float>& out) {
    if (!f.has(name)) fail("{} has no {} (a checkpoint of another optimizer or model?)", sp, name);
    Tensor t = f.get(name);
    if (t.dtype != DType::F32 || t.numel() != n)
      fail("{}: {} must be f32 [{}] (this model's parameter count), got {} values: a checkpoint of another model?", sp,
           name, n, t.numel());
    out.assign(t.ptr<float>(), t.ptr<float>() + n);
  };
  get("adam.m", st.m), get("adam.v", st.v);
  if (optimizer == "muon") get("muon.momentum", st.mom);
  return st;
}

Tensor f32_vector(const char* name, const std::vector<float>& v) {
  Tensor t = Tensor::empty(DType::F32, {int64_t(v.size())}, name);
  std::copy(v.begin(), v.end(), t.ptr<float>());
  return t;
}

}  // namespace

V4Weights init_v4_weights(const V4Config& c, uint64_t seed) {
  V4Weights w;
  w.cfg = c;
  w.layout = make_v4_param_layout(c, &w.store);
  w.flat = Tensor::zeros(DType::F32, {w.layout.num_params}, "v4_params");
  w.bias_flat = Tensor::zeros(DType::F32, {std::max<int64_t>(w.layout.num_bias, 1)}, "v4_biases");
  Rng rng(seed);
  const double std_ = c.initializer_range;
  for (const auto& s : w.layout.specs) {
    if (s.is_bias) continue;  // selection biases start at 0
    float* p = w.flat.f32() + s.offset;
    const int64_t n = shape_numel(s.shape);
    if (s.is_norm || ends_with(s.name, "_scale")) std::fill(p, p + n, 1.f);
    else if (ends_with(s.name, "_base") || ends_with(s.name, "attn_sink") || ends_with(s.name, ".ape")) std::fill(p, p + n, 0.f);
    else for (int64_t i = 0; i < n; ++i) p[i] = float(rng.normal() * std_);
  }
  w.tid2eid.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (c.mlp_layer_types[size_t(l)] != V4Mlp::Hash) continue;
    Rng r(seed * 1000003 + uint64_t(l) + 1);
    auto& t = w.tid2eid[size_t(l)];
    const int64_t E = c.n_routed_experts, K = c.num_experts_per_tok;
    t.resize(size_t(c.vocab_size * K));
    std::vector<int32_t> perm(static_cast<size_t>(E));
    for (int64_t v = 0; v < c.vocab_size; ++v) {
      for (int64_t e = 0; e < E; ++e) perm[size_t(e)] = int32_t(e);
      for (int64_t k = 0; k < K; ++k) std::swap(perm[size_t(k)], perm[size_t(k + int64_t(r.below(uint64_t(E - k))))]);
      std::copy_n(perm.begin(), K, t.begin() + v * K);
    }
  }
  return w;
}

void save_v4_model(const std::string& dir, const V4Weights& w, const std::string& config_json) {
  fs::create_directories(dir);
  std::vector<Tensor> ts;
  for (const auto& s : w.layout.specs) ts.push_back(w.view(s.name));
  std::vector<Tensor> tables;
  for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l) {
    if (w.tid2eid[size_t(l)].empty()) continue;
    const auto& src = w.tid2eid[size_t(l)];
    Tensor t = Tensor::empty(DType::I64, {w.cfg.vocab_size, w.cfg.num_experts_per_tok},
                             "layers." + std::to_string(l) + ".ffn.gate.tid2eid");
    for (size_t i = 0; i < src.size(); ++i) t.ptr<int64_t>()[i] = src[i];
    ts.push_back(t);
  }
  write_safetensors((fs::path(dir) / "model.safetensors").string(), ts, {{"format", "pt"}});
  write_file_atomic((fs::path(dir) / "config.json").string(), config_json);
}

TrainResult run_v4_training(const TrainArgs& a_in, const TrainCallback& on_step, bool handle_sigint) {
  TrainArgs a = a_in;
  if (!a.resume.empty() && !is_checkpoint(a.resume) && is_checkpoint((fs::path(a.resume) / "checkpoint").string()))
    a.resume = (fs::path(a.resume) / "checkpoint").string();
  if (!a.resume.empty() && !is_checkpoint(a.resume))
    fail("{} is not a training checkpoint (no trainer_state.json)", a.resume);
  if (a.data.empty()) fail("--data is required (a directory made by dsv3 prepare-data)");
  if (a.batch < 1 || a.seq < 2 || a.grad_accum < 1) fail("--batch >= 1, --seq >= 2 and --grad-accum >= 1 are required");
  if (a.device != "cpu") fail("DeepSeek-V4 training runs on the CPU for now (--device cpu), got --device {}", a.device);
  if (a.precision != "default") fail("DeepSeek-V4 training is fp32 only for now, got --precision {}", a.precision);
  if (a.save_dtype != "f32") fail("DeepSeek-V4 checkpoints are written in f32 for now, got --save-dtype {}", a.save_dtype);
  // Under mpirun: data parallelism only (every rank holds the whole model and trains its slice of the global batch;
  // gradients are summed over the ranks, then every rank takes the same optimizer step).
  Communicator& world = dist::world();
  const int P = world.size();
  const bool distributed = P > 1;
  if (a.ep > 1) fail("expert parallelism (--ep) is not implemented for DeepSeek-V4 training: use data parallelism (--dp)");
  if (a.dp > 0 && a.dp != P) fail("--dp {} must equal the {} ranks (DeepSeek-V4 training is data-parallel only)", a.dp, P);
  if (a.batch % P != 0) fail("--batch {} (the global batch) must be a multiple of the {} ranks", a.batch, P);
  const int rank = world.rank();
  const bool root = rank == 0;
  const int64_t local_batch = a.batch / P, first_seq = local_batch * rank;
  if (a.optimizer != "adamw" && a.optimizer != "muon") fail("unknown --optimizer '{}' (adamw or muon)", a.optimizer);
  if (!(a.balance_alpha >= 0)) fail("--balance-alpha must be >= 0, got {}", a.balance_alpha);
  const int64_t tokens_per_step = a.batch * a.seq * a.grad_accum;
  int64_t total = a.steps;
  if (total <= 0 && a.tokens > 0) total = (a.tokens + tokens_per_step - 1) / tokens_per_step;
  if (total <= 0) fail("give --steps or --tokens");
  a.sched.total = total;
  a.sched.validate();

  // ---- model
  std::string cfg_src;
  V4Weights w;
  V4ResumeState rs;
  if (!a.resume.empty()) {
    cfg_src = config_path(a.resume);
    w = load_v4_weights(V4Config::load(a.resume), a.resume);  // parameters and selection biases, f32
    rs = load_v4_state(a.resume, a.optimizer, w.layout.num_params);
  } else if (!a.init_from.empty()) {
    cfg_src = config_path(a.init_from);
    w = load_v4_weights(V4Config::load(a.init_from), a.init_from);
  } else if (!a.config.empty()) {
    cfg_src = config_path(a.config);
    w = init_v4_weights(V4Config::load(a.config), a.seed);
  } else {
    fail("give --config (random init), --init-from DIR or --resume CHECKPOINT");
  }
  const V4Config& cfg = w.cfg;
  const std::string cfg_text = read_file(cfg_src);
  // The MTP blocks train with --mtp-lambda (as V3: when the model has them); validation measures them either way.
  if (w.mtp_absent && a.mtp_lambda > 0)
    std::fprintf(stderr, "note: %s has no mtp.* tensors: training without MTP\n", a.init_from.c_str());
  if (distributed)
    check_same_on_all_ranks(world, cfg_text + a.to_json().dump() + a.resume + std::to_string(a.stop_after),
                            "model config or training options");
  const double mtp_lambda = cfg.num_nextn_predict_layers > 0 ? a.mtp_lambda : 0.0;
  const double mtp_eval = cfg.num_nextn_predict_layers > 0 ? (a.mtp_lambda > 0 ? a.mtp_lambda : 0.3) : 0.0;
  if (a.seq > cfg.max_position_embeddings)
    fail("--seq {} exceeds the model's max_position_embeddings {}", a.seq, cfg.max_position_embeddings);
  const int64_t n = w.layout.num_params;
  std::vector<float> grads(static_cast<size_t>(n), 0.f);
  V4TrainModel<float> tm(w, w.flat.f32(), grads.data());
  tm.set_balance_alpha(a.balance_alpha);
  std::unique_ptr<Muon> muon;
  std::unique_ptr<HostAdamW> adam;
  if (a.optimizer == "muon") {
    MuonConfig mc;
    mc.weight_decay = a.adam.weight_decay;
    muon = std::make_unique<Muon>(v4_muon_partition(cfg, w.layout), n, mc, a.adam);
  } else {
    adam = std::make_unique<HostAdamW>(v4_adamw_segments(w.layout), n, a.adam);
  }
  if (!a.resume.empty()) {
    if (muon) muon->adam_m().swap(rs.m), muon->adam_v().swap(rs.v), muon->momentum().swap(rs.mom), muon->t = rs.opt_t;
    else adam->adam_m().swap(rs.m), adam->adam_v().swap(rs.v), adam->t = rs.opt_t;
  }

  // ---- data and output
  DataLoader data(a.data, a.seed);
  data.check_vocab(cfg.vocab_size);
  if (!a.resume.empty()) data.rng().set_state(rs.rng);  // the data position: the window sampler's RNG
  const std::string ckpt = fs::absolute(fs::path(a.out) / "checkpoint").string();
  const std::string metrics_path = (fs::path(a.out) / "metrics.jsonl").string();
  std::ofstream metrics;
  if (root) {  // only rank 0 writes (metrics, checkpoints, the report)
    fs::create_directories(a.out);
    if (!a.resume.empty()) truncate_metrics(metrics_path, rs.step);
    else std::remove(metrics_path.c_str());
    metrics.open(metrics_path, std::ios::app);
    if (!metrics) fail("cannot write {}", metrics_path);
  }
  int64_t step = rs.step, tokens = rs.tokens;
  const int64_t first_step = step;
  // The checkpoint as the V3 trainer writes it (train/checkpoint.h): the hub directory, trainer_state.safetensors
  // (adam.m, adam.v and for Muon muon.momentum, f32 [num_params]) and trainer_state.json (step, tokens, the
  // optimizer's step count adam_t, the data RNG, the run's options); built in a sibling and swapped in.
  auto save = [&](const char* why) {
    if (!root) {  // every rank holds the same parameters and optimizer state: rank 0 writes, the others wait
      world.barrier();
      return;
    }
    const fs::path fin(ckpt);
    const std::string tmp = (fin.parent_path() / ("." + fin.filename().string() + ".tmp." + std::to_string(getpid()))).string();
    try {
      fs::remove_all(tmp);
      save_v4_model(tmp, w, cfg_text);
      const std::string td = data.meta().tokenizer;
      if (!td.empty()) {
        const fs::path d = fs::is_directory(td) ? fs::path(td) : fs::path(td).parent_path();
        for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
          if (fs::exists(d / f)) fs::copy_file(d / f, fs::path(tmp) / f, fs::copy_options::overwrite_existing);
      }
      std::vector<Tensor> ts;
      if (muon) ts = {f32_vector("adam.m", muon->adam_m()), f32_vector("adam.v", muon->adam_v()),
                      f32_vector("muon.momentum", muon->momentum())};
      else ts = {f32_vector("adam.m", adam->adam_m()), f32_vector("adam.v", adam->adam_v())};
      write_safetensors((fs::path(tmp) / "trainer_state.safetensors").string(), ts);
      uint64_t r[4];
      data.rng().get_state(r);
      json st = {{"step", step}, {"tokens", tokens}, {"adam_t", muon ? muon->t : adam->t},
                 {"rng", {r[0], r[1], r[2], r[3]}}, {"model_dtype", "f32"}, {"model_type", "deepseek_v4"},
                 {"optimizer", a.optimizer}, {"args", a.to_json()}};
      write_file_atomic((fs::path(tmp) / "trainer_state.json").string(), st.dump(2) + "\n");
      swap_in_directory(tmp, ckpt);
    } catch (const std::exception& e) {
      std::error_code ec;
      fs::remove_all(tmp, ec);
      fail("saving checkpoint {} failed (the previous checkpoint is untouched): {}", ckpt, e.what());
    }
    if (distributed) world.barrier();  // a failed write ends the job through abort instead
    std::fprintf(stderr, "saved %s (%s, step %lld)\n", ckpt.c_str(), why, (long long)step);
  };
  auto evaluate = [&] {
    const int64_t nb = std::min(a.eval_batches, data.val_batches(a.batch, a.seq));
    if (nb <= 0) return;
    std::vector<int32_t> ids(static_cast<size_t>(a.batch * a.seq));
    double loss = 0;
    int64_t correct = 0, count = 0;
    const size_t D = size_t(mtp_eval > 0 ? cfg.num_nextn_predict_layers : 0);
    std::vector<double> ml(D, 0.0);
    std::vector<int64_t> mc(D, 0), mn(D, 0);
    for (int64_t i = 0; i < nb; ++i) {  // each rank its slice of every batch; a batch's loss is the ranks' mean
      data.val_batch(i, a.batch, a.seq, ids.data());
      V4StepStats s = tm.run(ids.data() + first_seq * a.seq, local_batch, a.seq, 1.0, false, mtp_eval);
      loss += s.loss / double(P), correct += s.correct, count += s.count;
      if (s.mtp_loss.size() != D) fail("internal: {} MTP losses, expected {}", s.mtp_loss.size(), D);
      for (size_t k = 0; k < D; ++k)
        ml[k] += s.mtp_loss[k] / double(nb) / double(P), mc[k] += s.mtp_correct[k], mn[k] += s.mtp_count[k];
    }
    if (distributed) {
      world.all_reduce_sum(&loss, 1, CommType::F64);
      world.all_reduce_sum(ml), world.all_reduce_sum(mc), world.all_reduce_sum(mn);
      world.all_reduce_sum(&correct, 1, CommType::I64), world.all_reduce_sum(&count, 1, CommType::I64);
    }
    if (!root) return;
    json vml = json::array(), vma = json::array();
    std::string mtp_s;
    for (size_t k = 0; k < ml.size(); ++k) {
      vml.push_back(ml[k]), vma.push_back(mn[k] ? double(mc[k]) / double(mn[k]) : 0.0);
      mtp_s += fmt::format(" | mtp{} loss {:.4f} acc {:.3f}", k + 1, ml[k], vma.back().get<double>());
    }
    json j = {{"type", "val"}, {"step", step}, {"val_loss", loss / double(nb)},
              {"val_acc", count ? double(correct) / double(count) : 0.0}, {"val_mtp_loss", vml},
              {"val_mtp_acc", vma}};
    metrics << j.dump() << "\n", metrics.flush();
    if (on_step) on_step(j);
    std::fprintf(stderr, "validation step %lld: loss %.4f acc %.3f%s\n", (long long)step, loss / double(nb),
                 j["val_acc"].get<double>(), mtp_s.c_str());
  };

  const auto& moe_layers = tm.moe_layers();
  const int64_t E = cfg.n_routed_experts;
  const std::string origin = !a.resume.empty() ? "resumed at step " + std::to_string(step) + " from " + a.resume
                             : a.init_from.empty() ? "from scratch" : "from " + a.init_from;
  if (root)
  std::fprintf(stderr, "training DeepSeek-V4 %s on cpu with %s: %lld params (%zu moe + %lld hash layers), %lld steps of "
               "%lld tokens (batch %lld x seq %lld x accum %lld), data %s (%lld tokens)%s\n",
               origin.c_str(),
               a.optimizer.c_str(), (long long)n, moe_layers.size(), (long long)cfg.num_hash_layers(), (long long)total,
               (long long)tokens_per_step, (long long)a.batch, (long long)a.seq, (long long)a.grad_accum, a.data.c_str(),
               (long long)data.train_tokens(),
               distributed ? fmt::format(", data-parallel over {} ranks ({} sequences each)", P, local_batch).c_str()
                           : "");
  if (root && mtp_lambda > 0)
    std::fprintf(stderr, "MTP: %lld block(s) (%lld params), loss = main + %g * mean MTP cross-entropy\n",
                 (long long)cfg.num_nextn_predict_layers, (long long)v4_mtp_params(cfg), mtp_lambda);
  const SigintStop sigint_stop(handle_sigint);  // clears g_stop
  std::vector<int32_t> ids(static_cast<size_t>(a.batch * a.seq));
  const auto t_start = std::chrono::steady_clock::now();
  double tok_s = 0;
  while (step < total) {
    const auto t0 = std::chrono::steady_clock::now();
    const double lr = a.sched.at(step);
    std::fill(grads.begin(), grads.end(), 0.f);
    tm.reset_load();
    double loss = 0, bal = 0;
    std::vector<double> mtp;
    for (int64_t micro = 0; micro < a.grad_accum; ++micro) {
      data.next_batch(a.batch, a.seq, ids.data());
      V4StepStats s =
          tm.run(ids.data() + first_seq * a.seq, local_batch, a.seq, 1.0 / double(a.grad_accum * P), true, mtp_lambda);
      if (!std::isfinite(s.total))
        fail("the loss is not finite ({}) at step {}: stopping without saving; lower --lr or check the data",
             std::isnan(s.total) ? "NaN" : "Inf", step + 1);
      loss += s.loss / double(a.grad_accum);
      bal += s.balance_loss / double(a.grad_accum);
      mtp.resize(s.mtp_loss.size());
      for (size_t k = 0; k < s.mtp_loss.size(); ++k) mtp[k] += s.mtp_loss[k] / double(a.grad_accum);
    }
    if (distributed) {
      // The global batch's gradient: reduce-scatter then all-gather (rather than one all-reduce), so every rank
      // ends with the same bits by construction and the optimizer keeps the replicas identical.
      const std::vector<int64_t> counts = even_counts(n, P);
      std::vector<float> shard(static_cast<size_t>(counts[size_t(rank)]));
      world.reduce_scatter_sum(shard.data(), grads.data(), counts, CommType::F32);
      world.all_gather(grads.data(), shard.data(), counts, CommType::F32);
      // The reported losses are the ranks' mean; the expert loads are summed, so the bias update sees the
      // global counts.
      loss = world.sum(loss) / double(P), bal = world.sum(bal) / double(P);
      world.all_reduce_sum(mtp);
      for (double& v : mtp) v /= double(P);
    }
    std::vector<std::vector<int64_t>> step_load = tm.load();
    if (distributed)
      for (auto& ld : step_load) world.all_reduce_sum(ld);
    const double gnorm = muon ? muon->step(w.flat.f32(), grads.data(), lr) : adam->step(w.flat.f32(), grads.data(), lr);
    if (!std::isfinite(gnorm)) fail("the gradient norm is not finite at step {}: stopping without saving", step + 1);
    // Auxiliary-loss-free balancing of the moe layers: b_e += gamma sign(mean load - load_e).
    json maxvio = json::array(), loads = json::array();
    double worst = 0;
    for (size_t r = 0; r < moe_layers.size(); ++r) {
      const auto& ld = step_load[r];
      const double vio = max_vio(ld);
      worst = std::max(worst, vio);
      maxvio.push_back(vio), loads.push_back(ld);
      if (a.bias_gamma <= 0) continue;
      float* b = w.bias_flat.f32() + w.layout.at(cfg.block_prefix(moe_layers[r]) + "ffn.gate.bias").offset;
      int64_t sum = 0;
      for (auto v : ld) sum += v;
      const double mean = double(sum) / double(E);
      for (int64_t e = 0; e < E; ++e) {
        const double d = mean - double(ld[size_t(e)]);
        b[e] += float(a.bias_gamma * double((d > 0) - (d < 0)));
      }
    }
    ++step, tokens += tokens_per_step;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tok_s = double(tokens_per_step) / dt;
    json mj = {{"type", "train"}, {"step", step}, {"loss", loss}, {"lr", lr}, {"grad_norm", gnorm},
               {"balance_loss", bal}, {"tokens", tokens}, {"tok_per_s", tok_s}, {"step_s", dt}, {"maxvio", maxvio},
               {"load", loads}, {"moe_layers", moe_layers}, {"mtp_loss", mtp}, {"optimizer", a.optimizer}};
    if (root) metrics << mj.dump() << "\n", metrics.flush();
    bool stop = (on_step && !on_step(mj)) || g_stop;
    if (distributed) stop = world.sum<int32_t>(stop ? 1 : 0) > 0;  // a stop on any rank stops all
    if (root && (step % std::max<int64_t>(a.log_every, 1) == 0 || step == total || step == first_step + 1))
      std::fprintf(stderr, "step %lld/%lld | loss %.4f%s | lr %.2e | gnorm %.3f | %.0f tok/s | maxvio %.3f\n",
                   (long long)step, (long long)total, loss, mtp.empty() ? "" : fmt::format(" | mtp {:.4f}", mtp[0]).c_str(),
                   lr, gnorm, tok_s, worst);
    if (a.eval_every > 0 && (step % a.eval_every == 0 || step == total)) evaluate();
    if (stop || (a.stop_after > 0 && step - first_step >= a.stop_after && step < total)) {
      save(stop ? "interrupted" : "--stop-after");
      if (stop && root) std::fprintf(stderr, "interrupted at step %lld; resume with --resume %s\n", (long long)step, ckpt.c_str());
      return {step, stop, ckpt};
    }
    if (a.save_every > 0 && step % a.save_every == 0 && step < total) save("periodic");
  }
  save("final");
  if (!root) return {step, false, ckpt};
  metrics.close();
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::fprintf(stderr, "done: %lld steps, %lld tokens in %.1f s, last %.0f tok/s\n", (long long)step, (long long)tokens,
               el, tok_s);
  if (a.report) {
    const std::string rp = (fs::path(a.out) / "report.html").string();
    write_report(metrics_path, rp);
    std::fprintf(stderr, "report: %s\n", rp.c_str());
  }
  return {step, false, ckpt};
}

}  // namespace dsv3
