// dsv3 bench: prefill and decode throughput of a model (a directory, or a config with random weights made in
// memory), with decode reported against the memory roofline measured in the same run:
//   roofline steps/s = bandwidth / weight bytes touched per decode step (batch 1: every dense weight, the
//   top-k experts of each MoE layer, the head; the embedding is one row).
// Two bandwidths are measured: memcpy (bytes copied per second) and a pure read stream. Streaming weights
// is a read stream, so the read figure is the tighter ceiling; on the 2-core machines here it is below the
// copy figure (measured: ~12.5 vs ~15 GB/s), so the fraction against the copy bandwidth is the stricter one.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/bandwidth.h"
#include "core/rng.h"
#include "model/loader.h"

#include <omp.h>

namespace dsv3::cli {

using json = nlohmann::json;

namespace {

// Weight bytes one decode step reads: active parameters at their in-memory width (fp8 layout: 1 byte per
// quantized weight plus its share of a 128x128 block's fp32 scale; routed experts at top-k / E).
double active_weight_bytes(const Model& m) {
  const ModelWeights& w = m.weights();
  const double base = double(dtype_size(w.flat.dtype));
  if (!w.layout.fp8) return double(m.active_params()) * base;
  const ModelConfig& c = m.config();
  double fp8_active = 0;
  for (const ParamSpec& s : w.layout.specs) {
    if (!s.fp8 || s.name.rfind("model.layers.", 0) != 0 || std::stoll(s.name.substr(13)) >= c.num_hidden_layers) continue;
    double n = double(shape_numel(s.shape));
    if (s.name.find(".mlp.experts.") != std::string::npos) n *= double(c.num_experts_per_tok) / double(c.n_routed_experts);
    fp8_active += n;
  }
  return fp8_active * (1.0 + 4.0 / 16384.0) + (double(m.active_params()) - fp8_active) * base;
}

std::string weights_label(const Model& m) {
  const ModelWeights& w = m.weights();
  return w.layout.fp8 ? std::string("fp8 (e4m3 + 128x128 scales; others ") + dtype_name(w.flat.dtype) + ")"
                      : std::string(dtype_name(w.flat.dtype));
}

}  // namespace

void add_bench(CLI::App& app) {
  auto* c = app.add_subcommand("bench", "Prefill and decode tokens/s, decode against the memory roofline");
  struct Args {
    std::string dir, config, device = "cpu", dtype = "bf16";
    int64_t prompt = 128, gen = 32, batch = 1, prefill = 512;
    uint64_t seed = 0;
    bool json = false;
  };
  auto a = std::make_shared<Args>();
  c->add_option("--model", a->dir, "Model directory");
  c->add_option("--config", a->config, "Or: a config.json, random weights made in memory");
  c->add_option("--dtype", a->dtype, "weights for --config: bf16 | f32 | fp8; for --model: auto | bf16 | f32 | fp8");
  c->add_option("--device", a->device, "cpu | cuda");
  c->add_option("--prefill-tokens", a->prefill, "Prompt length of the prefill measurement");
  c->add_option("--prompt", a->prompt, "Prompt length before the decode measurement");
  c->add_option("--gen", a->gen, "Decode steps measured");
  c->add_option("--batch", a->batch, "Sequences decoded together");
  c->add_option("--seed", a->seed, "Seed for weights and prompt tokens");
  c->add_flag("--json", a->json, "Print one JSON object");
  c->callback([=] {
    if (a->dir.empty() == a->config.empty()) fail("give exactly one of --model or --config");
    if (a->prompt < 1 || a->gen < 1 || a->batch < 1 || a->prefill < 1) fail("lengths and batch must be >= 1");
    LoadedModel lm;
    if (!a->dir.empty()) {
      lm = open_model(a->dir, a->device, a->dtype == "bf16" && a->config.empty() ? "auto" : a->dtype);
    } else {
      ModelConfig cfg = ModelConfig::load(a->config);
      lm.backend = make_backend(a->device);
      if (a->dtype != "f32" && a->dtype != "bf16" && a->dtype != "fp8") fail("--dtype for --config: bf16, f32 or fp8");
      DType dt = a->dtype == "f32" ? DType::F32 : DType::BF16;
      ModelWeights w = init_weights(cfg, a->seed, dt);
      w = a->dtype == "fp8" ? quantize_weights_fp8(w, lm.backend.get()) : upload_weights(std::move(w), *lm.backend);
      lm.model = std::make_unique<Model>(cfg, std::move(w), *lm.backend);
    }
    Model& m = *lm.model;
    const ModelConfig& cfg = m.config();
    if (std::max(a->prefill, a->prompt + a->gen) > cfg.max_position_embeddings) fail("lengths exceed max_position_embeddings");
    Rng rng(a->seed + 1);
    auto tokens = [&](int64_t n) {
      std::vector<int32_t> t(n);
      for (auto& x : t) x = int32_t(2 + rng.below(uint64_t(cfg.vocab_size - 2)));
      return t;
    };
    using clk = std::chrono::steady_clock;
    auto secs = [](clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); };
    // Prefill: one sequence of `prefill` tokens (best of 2).
    double prefill_s = 1e30;
    for (int rep = 0; rep < 2; ++rep) {
      KvCache cache(*lm.backend, cfg, a->prefill);
      SeqCache sc;
      std::vector<BatchSeq> b(1);
      b[0].cache = &sc;
      b[0].tokens = tokens(a->prefill);
      auto t0 = clk::now();
      m.forward(b, cache);
      lm.backend->synchronize();
      prefill_s = std::min(prefill_s, secs(t0));
    }
    // Decode: `batch` sequences after a `prompt`-token prefill, `gen` steps; median step time.
    KvCache cache(*lm.backend, cfg, a->batch * (a->prompt + a->gen + 64));
    std::vector<SeqCache> sc(a->batch);
    std::vector<BatchSeq> b(a->batch);
    for (int64_t i = 0; i < a->batch; ++i) {
      b[i].cache = &sc[i];
      b[i].tokens = tokens(a->prompt);
    }
    m.forward(b, cache);
    std::vector<double> steps;
    for (int64_t s = 0; s < a->gen; ++s) {
      for (auto& x : b) x.tokens = tokens(1);
      auto t0 = clk::now();
      m.forward(b, cache);
      lm.backend->synchronize();
      steps.push_back(secs(t0));
    }
    std::sort(steps.begin(), steps.end());
    const double step = steps[steps.size() / 2];
    const double wbytes = active_weight_bytes(m);
    const bool cpu = lm.backend->device() == Device::CPU;
    const double bw = cpu ? measure_copy_bandwidth() : 0, rbw = cpu ? measure_read_bandwidth() : 0;
    const double roof = bw > 0 ? bw / wbytes : 0;
    const double dec = double(a->batch) / step;
    json j = {{"device", lm.backend->name()},
              {"weights_dtype", weights_label(m)},
              {"total_params", m.total_params()},
              {"active_params", m.active_params()},
              {"prefill_tokens", a->prefill},
              {"prefill_tokens_per_s", double(a->prefill) / prefill_s},
              {"decode_batch", a->batch},
              {"decode_context", a->prompt},
              {"decode_tokens_per_s", dec},
              {"decode_ms_per_step", step * 1e3},
              {"weight_bytes_per_step", wbytes},
              {"copy_bandwidth_GBps", bw / 1e9},
              {"read_bandwidth_GBps", rbw / 1e9},
              {"decode_roofline_steps_per_s", roof},
              {"decode_roofline_fraction", roof > 0 ? (1.0 / step) / roof : 0.0},
              {"decode_read_roofline_fraction", rbw > 0 ? (1.0 / step) / (rbw / wbytes) : 0.0},
              {"threads", omp_get_max_threads()}};
    if (a->json) {
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    std::printf("model        %s params, %s active per token, weights %s, device %s\n", human(m.total_params()).c_str(),
                human(m.active_params()).c_str(), weights_label(m).c_str(), lm.backend->name().c_str());
    std::printf("prefill      %lld tokens: %.1f tokens/s\n", (long long)a->prefill, double(a->prefill) / prefill_s);
    std::printf("decode       batch %lld at context %lld: %.2f tokens/s (%.2f ms/step)\n", (long long)a->batch,
                (long long)a->prompt, dec, step * 1e3);
    if (bw > 0)
      std::printf("roofline     %.1f MB of weights per step; copy bandwidth %.2f GB/s -> %.1f steps/s, achieved %.0f%%;"
                  " read bandwidth %.2f GB/s -> %.1f steps/s, achieved %.0f%%\n",
                  wbytes / 1e6, bw / 1e9, roof, 100.0 * (1.0 / step) / roof, rbw / 1e9, rbw / wbytes,
                  100.0 * (1.0 / step) / (rbw / wbytes));
  });
}

}  // namespace dsv3::cli
