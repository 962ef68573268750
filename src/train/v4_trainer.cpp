// The DeepSeek-V4 training loop (see v4_trainer.h).
#include "train/v4_trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "core/rng.h"
#include "dist/runtime.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "train/data.h"
#include "train/muon.h"
#include "train/report.h"
#include "train/v4_train_model.h"

namespace dsv3 {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

std::string config_path(const std::string& p) { return fs::is_directory(p) ? (fs::path(p) / "config.json").string() : p; }

double max_vio(const std::vector<int64_t>& load) {
  int64_t sum = 0, mx = 0;
  for (auto v : load) sum += v, mx = std::max(mx, v);
  return sum == 0 ? 0 : double(mx) / (double(sum) / double(load.size())) - 1.0;
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

TrainResult run_v4_training(const TrainArgs& a_in, const TrainCallback& on_step, bool /*handle_sigint*/) {
  TrainArgs a = a_in;
  if (!a.resume.empty()) fail("--resume is not implemented for DeepSeek-V4 training yet: start with --init-from {}", a.resume);
  if (a.data.empty()) fail("--data is required (a directory made by dsv3 prepare-data)");
  if (a.batch < 1 || a.seq < 2 || a.grad_accum < 1) fail("--batch >= 1, --seq >= 2 and --grad-accum >= 1 are required");
  if (a.device != "cpu") fail("DeepSeek-V4 training runs on the CPU for now (--device cpu), got --device {}", a.device);
  if (a.precision != "default") fail("DeepSeek-V4 training is fp32 only for now, got --precision {}", a.precision);
  if (a.save_dtype != "f32") fail("DeepSeek-V4 checkpoints are written in f32 for now, got --save-dtype {}", a.save_dtype);
  if (dist::world().size() > 1 || a.ep > 1 || a.dp > 1)
    fail("DeepSeek-V4 training runs in one process for now (no mpirun, --ep or --dp)");
  if (a.optimizer != "adamw" && a.optimizer != "muon") fail("unknown --optimizer '{}' (adamw or muon)", a.optimizer);
  const int64_t tokens_per_step = a.batch * a.seq * a.grad_accum;
  int64_t total = a.steps;
  if (total <= 0 && a.tokens > 0) total = (a.tokens + tokens_per_step - 1) / tokens_per_step;
  if (total <= 0) fail("give --steps or --tokens");
  a.sched.total = total;
  a.sched.validate();

  // ---- model
  std::string cfg_src;
  V4Weights w;
  if (!a.init_from.empty()) {
    cfg_src = config_path(a.init_from);
    w = load_v4_weights(V4Config::load(a.init_from), a.init_from);
  } else if (!a.config.empty()) {
    cfg_src = config_path(a.config);
    w = init_v4_weights(V4Config::load(a.config), a.seed);
  } else {
    fail("give --config (random init) or --init-from DIR");
  }
  const V4Config& cfg = w.cfg;
  const std::string cfg_text = read_file(cfg_src);
  // The MTP blocks train with --mtp-lambda (as V3: when the model has them); validation measures them either way.
  if (w.mtp_absent && a.mtp_lambda > 0)
    std::fprintf(stderr, "note: %s has no mtp.* tensors: training without MTP\n", a.init_from.c_str());
  const double mtp_lambda = cfg.num_nextn_predict_layers > 0 ? a.mtp_lambda : 0.0;
  const double mtp_eval = cfg.num_nextn_predict_layers > 0 ? (a.mtp_lambda > 0 ? a.mtp_lambda : 0.3) : 0.0;
  if (a.seq > cfg.max_position_embeddings)
    fail("--seq {} exceeds the model's max_position_embeddings {}", a.seq, cfg.max_position_embeddings);
  const int64_t n = w.layout.num_params;
  std::vector<float> grads(static_cast<size_t>(n), 0.f);
  V4TrainModel<float> tm(w, w.flat.f32(), grads.data());
  std::unique_ptr<Muon> muon;
  std::unique_ptr<HostAdamW> adam;
  if (a.optimizer == "muon") {
    MuonConfig mc;
    mc.weight_decay = a.adam.weight_decay;
    muon = std::make_unique<Muon>(v4_muon_partition(cfg, w.layout), n, mc, a.adam);
  } else {
    adam = std::make_unique<HostAdamW>(v4_adamw_segments(w.layout), n, a.adam);
  }

  // ---- data and output
  DataLoader data(a.data, a.seed);
  data.check_vocab(cfg.vocab_size);
  fs::create_directories(a.out);
  const std::string ckpt = (fs::path(a.out) / "checkpoint").string();
  const std::string metrics_path = (fs::path(a.out) / "metrics.jsonl").string();
  std::remove(metrics_path.c_str());
  std::ofstream metrics(metrics_path);
  if (!metrics) fail("cannot write {}", metrics_path);
  int64_t step = 0, tokens = 0;
  auto save = [&](const char* why) {
    const std::string tmp = ckpt + ".tmp";
    fs::remove_all(tmp);
    save_v4_model(tmp, w, cfg_text);
    const std::string td = data.meta().tokenizer;
    if (!td.empty()) {
      const fs::path d = fs::is_directory(td) ? fs::path(td) : fs::path(td).parent_path();
      for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
        if (fs::exists(d / f)) fs::copy_file(d / f, fs::path(tmp) / f, fs::copy_options::overwrite_existing);
    }
    json st = {{"step", step}, {"tokens", tokens}, {"optimizer", a.optimizer}, {"args", a.to_json()}};
    write_file_atomic((fs::path(tmp) / "trainer_state.json").string(), st.dump(2) + "\n");
    fs::remove_all(ckpt);
    fs::rename(tmp, ckpt);
    std::fprintf(stderr, "saved %s (%s, step %lld)\n", ckpt.c_str(), why, (long long)step);
  };
  auto evaluate = [&] {
    const int64_t nb = std::min(a.eval_batches, data.val_batches(a.batch, a.seq));
    if (nb <= 0) return;
    std::vector<int32_t> ids(static_cast<size_t>(a.batch * a.seq));
    double loss = 0;
    int64_t correct = 0, count = 0;
    std::vector<double> ml;
    std::vector<int64_t> mc, mn;
    for (int64_t i = 0; i < nb; ++i) {
      data.val_batch(i, a.batch, a.seq, ids.data());
      V4StepStats s = tm.run(ids.data(), a.batch, a.seq, 1.0, false, mtp_eval);
      loss += s.loss, correct += s.correct, count += s.count;
      ml.resize(s.mtp_loss.size()), mc.resize(s.mtp_loss.size()), mn.resize(s.mtp_loss.size());
      for (size_t k = 0; k < s.mtp_loss.size(); ++k)
        ml[k] += s.mtp_loss[k] / double(nb), mc[k] += s.mtp_correct[k], mn[k] += s.mtp_count[k];
    }
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
  const std::string origin = a.init_from.empty() ? "from scratch" : "from " + a.init_from;
  std::fprintf(stderr, "training DeepSeek-V4 %s on cpu with %s: %lld params (%zu moe + %lld hash layers), %lld steps of "
               "%lld tokens (batch %lld x seq %lld x accum %lld), data %s (%lld tokens)%s\n",
               origin.c_str(),
               a.optimizer.c_str(), (long long)n, moe_layers.size(), (long long)cfg.num_hash_layers(), (long long)total,
               (long long)tokens_per_step, (long long)a.batch, (long long)a.seq, (long long)a.grad_accum, a.data.c_str(),
               (long long)data.train_tokens(),
               a.balance_alpha > 0 ? " (no balance loss for V4: --balance-alpha is ignored)" : "");
  if (mtp_lambda > 0)
    std::fprintf(stderr, "MTP: %lld block(s) (%lld params), loss = main + %g * mean MTP cross-entropy\n",
                 (long long)cfg.num_nextn_predict_layers, (long long)v4_mtp_params(cfg), mtp_lambda);
  std::vector<int32_t> ids(static_cast<size_t>(a.batch * a.seq));
  const auto t_start = std::chrono::steady_clock::now();
  double tok_s = 0;
  while (step < total) {
    const auto t0 = std::chrono::steady_clock::now();
    const double lr = a.sched.at(step);
    std::fill(grads.begin(), grads.end(), 0.f);
    tm.reset_load();
    double loss = 0;
    std::vector<double> mtp;
    for (int64_t micro = 0; micro < a.grad_accum; ++micro) {
      data.next_batch(a.batch, a.seq, ids.data());
      V4StepStats s = tm.run(ids.data(), a.batch, a.seq, 1.0 / double(a.grad_accum), true, mtp_lambda);
      if (!std::isfinite(s.total))
        fail("the loss is not finite ({}) at step {}: stopping without saving; lower --lr or check the data",
             std::isnan(s.total) ? "NaN" : "Inf", step + 1);
      loss += s.loss / double(a.grad_accum);
      mtp.resize(s.mtp_loss.size());
      for (size_t k = 0; k < s.mtp_loss.size(); ++k) mtp[k] += s.mtp_loss[k] / double(a.grad_accum);
    }
    const double gnorm = muon ? muon->step(w.flat.f32(), grads.data(), lr) : adam->step(w.flat.f32(), grads.data(), lr);
    if (!std::isfinite(gnorm)) fail("the gradient norm is not finite at step {}: stopping without saving", step + 1);
    // Auxiliary-loss-free balancing of the moe layers: b_e += gamma sign(mean load - load_e).
    json maxvio = json::array(), loads = json::array();
    double worst = 0;
    for (size_t r = 0; r < moe_layers.size(); ++r) {
      const auto& ld = tm.load()[r];
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
               {"balance_loss", 0.0}, {"tokens", tokens}, {"tok_per_s", tok_s}, {"step_s", dt}, {"maxvio", maxvio},
               {"load", loads}, {"moe_layers", moe_layers}, {"mtp_loss", mtp}, {"optimizer", a.optimizer}};
    metrics << mj.dump() << "\n", metrics.flush();
    bool stop = on_step && !on_step(mj);
    if (step % std::max<int64_t>(a.log_every, 1) == 0 || step == total || step == 1)
      std::fprintf(stderr, "step %lld/%lld | loss %.4f%s | lr %.2e | gnorm %.3f | %.0f tok/s | maxvio %.3f\n",
                   (long long)step, (long long)total, loss, mtp.empty() ? "" : fmt::format(" | mtp {:.4f}", mtp[0]).c_str(),
                   lr, gnorm, tok_s, worst);
    if (a.eval_every > 0 && (step % a.eval_every == 0 || step == total)) evaluate();
    if (stop || (a.stop_after > 0 && step >= a.stop_after && step < total)) {
      save(stop ? "interrupted" : "--stop-after");
      return {step, stop, ckpt};
    }
    if (a.save_every > 0 && step % a.save_every == 0 && step < total) save("periodic");
  }
  save("final");
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
