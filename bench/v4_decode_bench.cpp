// Decode speed of several DeepSeek-V4 sequences through V4ServingModel (what `dsv3 serve` runs each engine
// step): S sequences prefill a prompt each, then decode greedily one token per sequence per step.
//   batched     one forward per step with all S sequences (the engine's batch)
//   --sequential one forward per sequence per step (S forwards a step)
// Prints the decode tokens/s of the chosen mode and a checksum of the generated tokens (equal in both modes).
//   v4_decode_bench --config configs/demo-v4.json [--model DIR] [--seqs 8] [--prompt 16] [--steps 64]
//                   [--sequential] [--repeat 3]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "model/v4_loader.h"
#include "serve/serving_model.h"
#include "train/v4_trainer.h"

using namespace dsv3;

int main(int argc, char** argv) {
  std::string config, dir;
  int64_t S = 8, P = 16, steps = 64, repeat = 3;
  bool sequential = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--config") config = next();
    else if (a == "--model") dir = next();
    else if (a == "--seqs") S = std::stoll(next());
    else if (a == "--prompt") P = std::stoll(next());
    else if (a == "--steps") steps = std::stoll(next());
    else if (a == "--repeat") repeat = std::stoll(next());
    else if (a == "--sequential") sequential = true;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (config.empty() == dir.empty()) {
    std::fprintf(stderr, "give --config CONFIG.json (random weights, seed 1) or --model DIR\n");
    return 2;
  }
  LoadedV4Model lm;
  if (!dir.empty()) {
    lm = open_v4_model(dir);
  } else {
    lm.backend = make_cpu_backend();
    lm.model = std::make_unique<V4Model>(init_v4_weights(V4Config::load(config), 1), *lm.backend);
  }
  V4Model& model = *lm.model;
  const int64_t V = model.config().vocab_size;
  double best = 0;
  uint64_t checksum = 0;
  for (int64_t rep = 0; rep < repeat; ++rep) {
    V4ServingModel sm(model, S * ((P + steps + 15) / 16) * 16, 16);
    std::vector<SeqCache> caches(static_cast<size_t>(S));
    std::vector<int32_t> last(static_cast<size_t>(S));
    auto step = [&](std::vector<std::vector<int32_t>> toks) {
      std::vector<BatchSeq> all(static_cast<size_t>(S));
      for (int64_t s = 0; s < S; ++s) all[size_t(s)].cache = &caches[size_t(s)], all[size_t(s)].tokens = toks[size_t(s)];
      std::vector<Tensor> rows;
      if (sequential) {
        for (int64_t s = 0; s < S; ++s) {
          std::vector<BatchSeq> one{all[size_t(s)]};
          rows.push_back(sm.forward(one, {}).logits);
        }
      } else {
        Tensor l = sm.forward(all, {}).logits;
        for (int64_t s = 0; s < S; ++s) rows.push_back(l.rows(s, s + 1));
      }
      for (int64_t s = 0; s < S; ++s) {
        const float* r = rows[size_t(s)].f32();
        int32_t best_id = 0;
        for (int64_t v = 1; v < V; ++v)
          if (r[v] > r[best_id]) best_id = int32_t(v);
        last[size_t(s)] = best_id;
      }
    };
    std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(S));
    for (int64_t s = 0; s < S; ++s) {
      if (!sm.reserve(caches[size_t(s)], P + steps)) {
        std::fprintf(stderr, "the cache pool is short\n");
        return 1;
      }
      for (int64_t t = 0; t < P; ++t) prompts[size_t(s)].push_back(int32_t((s * 131 + t * 17 + 3) % V));
    }
    step(prompts);
    uint64_t sum = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t k = 0; k < steps; ++k) {
      std::vector<std::vector<int32_t>> toks(static_cast<size_t>(S));
      for (int64_t s = 0; s < S; ++s) toks[size_t(s)] = {last[size_t(s)]};
      step(toks);
      for (int64_t s = 0; s < S; ++s) sum = sum * 1000003u + uint64_t(last[size_t(s)]);
    }
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tps = double(S * steps) / sec;
    std::printf("run %lld: %lld sequences x %lld decode steps in %.3f s: %.1f tokens/s\n", (long long)rep,
                (long long)S, (long long)steps, sec, tps);
    best = std::max(best, tps);
    checksum = sum;
  }
  std::printf("%s: best %.1f decode tokens/s (%lld sequences, prompt %lld); checksum %016llx\n",
              sequential ? "sequential" : "batched", best, (long long)S, (long long)P, (unsigned long long)checksum);
  return 0;
}
