// GPU benchmarks of the dsv3 CUDA backend on one device, with random weights made on the GPU (no checkpoint):
//   ceilings   device-to-device copy bandwidth and a large bf16 cuBLAS GEMM, measured in the same run;
//   model      prefill of one 2048-token prompt, decode at batch 1 and batch 32 (Model::forward, logits to host),
//              decode both with whole-step graphs (the default) and eagerly (graphs off);
//   per op     GPU time of every backend op in one profiled pass of each workload, against its byte floor;
//   kernels    attention prefill and MLA decode alone, skinny linear against cuBLAS.
//   --long-context  decode at 4K / 32K / 128K cached tokens (batch 1 and 8; the absorbed MLA kernel alone, also
//              with DeepSeek-V3's 128 heads, and the whole model after a chunked prefill of each sequence),
//              against the bytes of the latent cache (kernel) or of the cache plus the weights (model).
// Each number is printed with its floor: the larger of FLOPs / GEMM ceiling and bytes / copy bandwidth.
// --dtype fp8: the same random model with every matrix the FP8 recipe quantizes (attention projections except
// kv_b_proj, dense and expert MLPs) replaced by an fp8 copy in 128x128 blocks (the model part only; floors and
// roofline fractions stay those of bf16 weights, so compare tok/s with a bf16 run).
// Usage: gpu_bench --config bench/configs/infer-m.json [--json out.json] [--steps 64] [--dtype bf16|fp8]
//                  [--long-context]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/model.h"
#include "ops/backend.h"
#if DSV3_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#endif

using namespace dsv3;
using json = nlohmann::json;

#if DSV3_HAVE_CUDA
namespace {

using clk = std::chrono::steady_clock;
double secs(clk::time_point a, clk::time_point b) { return std::chrono::duration<double>(b - a).count(); }
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Random bf16 weights on the device: normal(0, initializer_range) for matrices, ones for norms, zero biases.
ModelWeights random_weights(Backend& be, const ModelConfig& cfg, uint64_t seed) {
  ModelWeights w;
  w.cfg = cfg;
  w.layout = make_param_layout(cfg);
  w.flat = be.alloc(DType::BF16, {w.layout.num_params}, "params");
  be.fill_normal(w.flat, 0.f, float(cfg.initializer_range), seed);
  w.bias_flat = be.alloc(DType::F32, {std::max<int64_t>(w.layout.num_bias, 1)}, "biases");
  be.zero(w.bias_flat);
  for (auto& s : w.layout.specs)
    if (s.is_norm) {
      Tensor v = w.view(s.name);
      be.fill_normal(v, 1.f, 0.f, 0);
    }
  w.bind();
  be.synchronize();
  return w;
}

// Replaces the matrices the FP8 recipe quantizes with fp8 copies (quantized on the GPU); returns the scale tensors,
// which must stay alive with the model.
std::vector<Tensor> to_fp8(Backend& be, ModelWeights& w) {
  std::vector<Tensor> keep;
  auto q = [&](Tensor& t) {
    if (!t) return;
    auto [codes, scales] = cuda::quantize_weight_fp8(be, t);
    keep.push_back(scales);
    t = codes;
  };
  for (auto& L : w.layers) {
    auto& a = L.attn;
    for (Tensor* t : {&a.q_proj, &a.q_a_proj, &a.q_b_proj, &a.kv_a_proj, &a.o_proj}) q(*t);
    if (L.is_moe) {
      for (Tensor* t : {&L.moe.gate, &L.moe.up, &L.moe.down}) q(*t);
      if (L.moe.has_shared)
        for (Tensor* t : {&L.moe.shared.gate, &L.moe.shared.up, &L.moe.shared.down}) q(*t);
    } else {
      for (Tensor* t : {&L.mlp.gate, &L.mlp.up, &L.mlp.down}) q(*t);
    }
  }
  be.synchronize();
  return keep;
}

// Bytes and FLOPs of the work, from the config (bf16 weights: 2 bytes a parameter).
struct Work {
  double attn = 0, dense = 0, shared = 0, router = 0, expert = 0, head = 0;  // parameters per layer kind / model
  int64_t moe_layers = 0, dense_layers = 0, layers = 0;
};
Work count(const ModelConfig& c) {
  Work w;
  const double H = double(c.hidden_size), nh = double(c.num_attention_heads), dn = double(c.qk_nope_head_dim),
               dr = double(c.qk_rope_head_dim), dv = double(c.v_head_dim), r = double(c.kv_lora_rank);
  const double q = c.q_lora_rank > 0 ? c.q_lora_rank * H + c.q_lora_rank * nh * (dn + dr) : H * nh * (dn + dr);
  w.attn = q + H * (r + dr) + nh * (dn + dv) * r + nh * dv * H;
  w.dense = 3.0 * H * double(c.intermediate_size);
  w.shared = 3.0 * H * double(c.moe_intermediate_size) * double(c.n_shared_experts);
  w.router = H * double(c.n_routed_experts);
  w.expert = 3.0 * H * double(c.moe_intermediate_size);
  w.head = double(c.vocab_size) * H;
  w.layers = c.num_hidden_layers;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) (c.is_moe_layer(l) ? w.moe_layers : w.dense_layers)++;
  return w;
}
// Weight bytes one decode step reads with B sequences: expected distinct experts E (1 - (1 - K/E)^B) per layer.
double decode_bytes(const ModelConfig& c, const Work& w, int B, int64_t ctx) {
  const double E = double(c.n_routed_experts), K = double(c.num_experts_per_tok);
  const double experts = E * (1.0 - std::pow(1.0 - K / E, double(B)));
  const double params = w.layers * w.attn + w.dense_layers * w.dense +
                        w.moe_layers * (w.shared + w.router + experts * w.expert) + w.head;
  const double cache = double(B) * double(ctx) * w.layers * double(c.kv_lora_rank + c.qk_rope_head_dim);
  return 2.0 * (params + cache);
}
double prefill_flops(const ModelConfig& c, const Work& w, int64_t T) {
  const double K = double(c.num_experts_per_tok);
  const double per_tok = w.layers * w.attn + w.dense_layers * w.dense + w.moe_layers * (w.shared + w.router + K * w.expert);
  const double attn = 2.0 * double(c.num_attention_heads) * double(c.qk_head_dim() + c.v_head_dim) * double(T) *
                      double(T + 1) / 2.0 * w.layers;
  return 2.0 * per_tok * double(T) + attn + 2.0 * w.head;
}
void print_profile(const char* title, Backend& be, double steps, double copy_bw) {
  auto prof = cuda::take_profile(be);
  double total = 0;
  std::vector<cuda::OpStat> notes;
  for (auto& s : prof) (s.name[0] == '(' ? notes.push_back(s) : (void)(total += s.ms));
  std::printf("\n  per-op GPU time, %s (per step; bytes floor at the measured copy bandwidth)\n", title);
  std::printf("  %-34s %8s %9s %9s %9s %8s\n", "op", "calls", "ms/step", "share", "GB/s", "of BW");
  for (auto& s : prof) {
    if (s.name[0] == '(') continue;
    const double ms = s.ms / steps, gbs = s.bytes > 0 ? s.bytes / (s.ms * 1e-3) / 1e9 : 0;
    std::printf("  %-34s %8lld %9.3f %8.1f%% %9.0f %7.0f%%\n", s.name.c_str(), (long long)(s.calls / steps), ms,
                100 * s.ms / total, gbs, s.bytes > 0 ? 100 * gbs * 1e9 / copy_bw : 0.0);
  }
  std::printf("  %-34s %8s %9.3f\n", "total GPU time", "", total / steps);
  for (auto& s : notes)
    if (s.ms > 0) std::printf("  %s: %.3f ms per wait (profiling on)\n", s.name.c_str(), s.ms / double(s.calls));
    else std::printf("  %s\n", s.name.c_str());
}

// Host time per wait (ms) measured since the last take_profile.
double host_issue_ms(Backend& be) {
  for (auto& s : cuda::take_profile(be))
    if (s.name.rfind("(host", 0) == 0 && s.calls) return s.ms / double(s.calls);
  return 0;
}

std::vector<int32_t> random_ids(Rng& rng, int64_t n, int64_t V) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = int32_t(rng.below(uint64_t(V)));
  return v;
}

}  // namespace
#endif

int main(int argc, char** argv) {
#if !DSV3_HAVE_CUDA
  (void)argc;
  (void)argv;
  std::printf("gpu_bench: dsv3 was built without CUDA; nothing to measure\n");
  return 0;
#else
  std::string cfg_path = "bench/configs/infer-m.json", out_path, wdtype = "bf16";
  int steps = 64;
  bool long_context = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--config" && i + 1 < argc) cfg_path = argv[++i];
    else if (a == "--json" && i + 1 < argc) out_path = argv[++i];
    else if (a == "--steps" && i + 1 < argc) steps = std::atoi(argv[++i]);
    else if (a == "--dtype" && i + 1 < argc) wdtype = argv[++i];
    else if (a == "--long-context") long_context = true;
    else {
      std::fprintf(stderr, "usage: gpu_bench [--config PATH] [--json OUT] [--steps N] [--dtype bf16|fp8] [--long-context]\n");
      return 2;
    }
  }
  if (!cuda_available()) {
    std::printf("gpu_bench: no CUDA device; skipped\n");
    return 0;
  }
  try {
    auto bep = make_cuda_backend(0);
    Backend& be = *bep;
    json res;
    auto info = cuda::device_info(be);
    std::printf("device: %s, %d SMs, %.0f GiB, %d MHz\n", info.name.c_str(), info.sms, info.mem_gib, info.clock_mhz);
    res["device"] = info.name;

    // ---- ceilings
    const double copy_bw = cuda::measure_copy_bandwidth(be, size_t(4) << 30, 10);
    const double gemm = cuda::measure_gemm_flops(be, 8192, 8192, 8192, 10);
    std::printf("ceilings: device copy %.2f TB/s (read + write), bf16 GEMM 8192^3 %.0f TFLOP/s\n", copy_bw / 1e12,
                gemm / 1e12);
    res["copy_TBps"] = copy_bw / 1e12;
    res["gemm_TFLOPs"] = gemm / 1e12;

    // ---- model
    ModelConfig cfg = ModelConfig::load(cfg_path);
    // The long-context runs go past infer-m's 8K positions: rope tables for 128K + the decode steps (random weights
    // do not care that the positions are beyond the trained range).
    if (long_context) cfg.max_position_embeddings = std::max<int64_t>(cfg.max_position_embeddings, 131072 + 1024);
    auto t0 = clk::now();
    if (wdtype != "bf16" && wdtype != "fp8") {
      std::fprintf(stderr, "gpu_bench: --dtype must be bf16 or fp8\n");
      return 2;
    }
    ModelWeights weights = random_weights(be, cfg, 1234);
    std::vector<Tensor> fp8_scales;
    if (wdtype == "fp8") fp8_scales = to_fp8(be, weights);
    res["weights"] = wdtype;
    Model m(cfg, std::move(weights), be);
    const Work wk = count(cfg);
    std::printf("model %s: %.2f B parameters (%.1f GB bf16), made on the GPU in %.1f s\n", cfg_path.c_str(),
                m.total_params() / 1e9, m.total_params() * 2 / 1e9, secs(t0, clk::now()));
    const int64_t V = cfg.vocab_size;
    Rng rng(7);

    // Prefill: one sequence of 2048 tokens, logits of the last row.
    const int64_t TP = 2048;
    auto prefill_once = [&]() {
      KvCache cache(be, cfg, TP);
      SeqCache sc;
      std::vector<BatchSeq> batch(1);
      batch[0].cache = &sc;
      batch[0].tokens = random_ids(rng, TP, V);
      be.synchronize();
      auto a = clk::now();
      m.forward(batch, cache);
      return secs(a, clk::now());
    };
    prefill_once();
    std::vector<double> pt;
    for (int i = 0; i < 5; ++i) pt.push_back(prefill_once());
    const double t_prefill = median(pt);
    const double pf_flops = prefill_flops(cfg, wk, TP), pf_bytes = 2.0 * double(m.total_params());
    const double pf_floor = std::max(pf_flops / gemm, pf_bytes / copy_bw);

    // Decode: B sequences with a 128-token prompt (prefilled together), then timed single-token steps.
    auto decode = [&](int B, int nsteps, bool profile, bool graphs) {
      cuda::set_graphs(be, graphs);
      const int64_t prompt = 128;
      KvCache cache(be, cfg, B * (prompt + nsteps + 16) + 64 * B);
      std::vector<SeqCache> sc(static_cast<size_t>(B));
      std::vector<BatchSeq> batch(static_cast<size_t>(B));
      for (int b = 0; b < B; ++b) {
        batch[size_t(b)].cache = &sc[size_t(b)];
        batch[size_t(b)].tokens = random_ids(rng, prompt, V);
      }
      m.forward(batch, cache);
      for (auto& b : batch) b.tokens = random_ids(rng, 1, V);
      for (int i = 0; i < 3; ++i) m.forward(batch, cache);  // warm-up
      if (profile) cuda::set_profiling(be, true);
      be.synchronize();
      if (!profile) cuda::take_profile(be);  // reset the host-time counter
      std::vector<double> st;
      for (int i = 0; i < nsteps; ++i) {
        auto a = clk::now();
        ForwardResult r = m.forward(batch, cache);  // ends with the logits on the host
        st.push_back(secs(a, clk::now()));
        for (auto& b : batch) b.tokens = {int32_t(rng.below(uint64_t(V)))};
      }
      if (profile) cuda::set_profiling(be, false);
      else
        std::printf("decode batch %d (%s): host issues a step's ops in %.3f ms\n", B, graphs ? "graphs" : "eager",
                    host_issue_ms(be));
      cuda::set_graphs(be, true);
      double sum = 0;
      for (double s : st) sum += s;
      return sum / nsteps;  // mean seconds per step
    };
    const double t_d1e = decode(1, steps, false, false), t_d32e = decode(32, std::max(16, steps / 2), false, false);
    const cuda::GraphStats g0 = cuda::graph_stats(be);
    double t_d1 = 0, t_d32 = 0;
    try {
      t_d1 = decode(1, steps, false, true);
      t_d32 = decode(32, std::max(16, steps / 2), false, true);
    } catch (const std::exception& e) {
      std::printf("decode with graphs failed: %s\n", e.what());
    }
    const cuda::GraphStats g1 = cuda::graph_stats(be);
    std::printf("graph steps: %lld recorded, %lld replayed, %lld eager (first use), %lld failed recordings\n",
                (long long)(g1.captures - g0.captures), (long long)(g1.replays - g0.replays),
                (long long)(g1.eager - g0.eager), (long long)(g1.failed - g0.failed));
    const int64_t ctx1 = 128 + steps / 2, ctx32 = 128 + steps / 4;
    const double d1_bytes = decode_bytes(cfg, wk, 1, ctx1), d32_bytes = decode_bytes(cfg, wk, 32, ctx32);
    const double d1_floor = d1_bytes / copy_bw, d32_floor = d32_bytes / copy_bw;

    std::printf("\n| workload | dsv3 | floor | fraction of roofline |\n| --- | --- | --- | --- |\n");
    std::printf("| prefill 2048 tokens | %.1f ms, %.0f tok/s | %.1f ms (%.1f TFLOP at %.0f TFLOP/s; %.1f GB at %.2f TB/s) | %.2f |\n",
                t_prefill * 1e3, TP / t_prefill, pf_floor * 1e3, pf_flops / 1e12, gemm / 1e12, pf_bytes / 1e9,
                copy_bw / 1e12, pf_floor / t_prefill);
    std::printf("| decode batch 1 | %.2f ms/step, %.0f tok/s | %.2f ms (%.2f GB at %.2f TB/s) | %.2f |\n", t_d1 * 1e3,
                1 / t_d1, d1_floor * 1e3, d1_bytes / 1e9, copy_bw / 1e12, d1_floor / t_d1);
    std::printf("| decode batch 32 | %.2f ms/step, %.0f tok/s | %.2f ms (%.2f GB at %.2f TB/s) | %.2f |\n", t_d32 * 1e3,
                32 / t_d32, d32_floor * 1e3, d32_bytes / 1e9, copy_bw / 1e12, d32_floor / t_d32);
    std::printf("| decode batch 1, eager (no graphs) | %.2f ms/step, %.0f tok/s | | %.2f |\n", t_d1e * 1e3, 1 / t_d1e,
                d1_floor / t_d1e);
    std::printf("| decode batch 32, eager (no graphs) | %.2f ms/step, %.0f tok/s | | %.2f |\n", t_d32e * 1e3, 32 / t_d32e,
                d32_floor / t_d32e);
    res["prefill_2048"] = {{"s", t_prefill}, {"tok_s", TP / t_prefill}, {"floor_s", pf_floor}, {"roofline", pf_floor / t_prefill}};
    res["decode_b1"] = {{"s_per_step", t_d1}, {"tok_s", 1 / t_d1}, {"floor_s", d1_floor}, {"roofline", d1_floor / t_d1}};
    res["decode_b32"] = {{"s_per_step", t_d32}, {"tok_s", 32 / t_d32}, {"floor_s", d32_floor}, {"roofline", d32_floor / t_d32}};
    res["decode_b1_eager"] = {{"s_per_step", t_d1e}, {"tok_s", 1 / t_d1e}, {"roofline", d1_floor / t_d1e}};
    res["decode_b32_eager"] = {{"s_per_step", t_d32e}, {"tok_s", 32 / t_d32e}, {"roofline", d32_floor / t_d32e}};

    // ---- per-op profile of each workload
    cuda::set_profiling(be, true);
    prefill_once();
    cuda::set_profiling(be, false);
    print_profile("prefill 2048 tokens", be, 1, copy_bw);
    decode(1, 16, true, false);
    print_profile("decode batch 1", be, 16, copy_bw);
    decode(32, 8, true, false);
    print_profile("decode batch 32", be, 8, copy_bw);

    // ---- kernels alone
    std::printf("\n  kernels alone (median of 20 after warm-up)\n");
    {
      const int64_t nh = cfg.num_attention_heads, dn = cfg.qk_nope_head_dim, dr = cfg.qk_rope_head_dim,
                    dv = cfg.v_head_dim;
      Tensor q = be.alloc(DType::BF16, {TP, nh * (dn + dr)}, "q"), kv = be.alloc(DType::BF16, {TP, nh * (dn + dv)}, "kv"),
             kpe = be.alloc(DType::BF16, {TP, dr}, "kpe"), o = be.alloc(DType::BF16, {TP, nh * dv}, "o");
      be.fill_normal(q, 0, 1, 1);
      be.fill_normal(kv, 0, 1, 2);
      be.fill_normal(kpe, 0, 1, 3);
      const double ms = cuda::time_ms(be, 3, 20, [&] {
        be.mla_attention(o, q, kv, kpe, 0, nh, dn, dr, dv, float(cfg.softmax_scale()));
      });
      const double fl = 2.0 * nh * double(dn + dr + dv) * double(TP) * double(TP + 1) / 2.0;
      std::printf("  %-44s %8.3f ms  %6.0f TFLOP/s  %.2f of the GEMM ceiling\n", "mla_attention prefill 2048 (causal)", ms,
                  fl / (ms * 1e-3) / 1e12, fl / (ms * 1e-3) / gemm);
      res["kernel_attention_prefill_ms"] = ms;
    }
    // Absorbed decode alone: B sequences of ctx cached tokens each (one layer, random cache and queries), nh heads;
    // returns the median ms. Its floor: the latent cache rows (r + dr bf16 each) read once.
    const int64_t r_lat = cfg.kv_lora_rank, dr_lat = cfg.qk_rope_head_dim;
    auto time_mla_decode = [&](int64_t nh, int B, int64_t ctx) {
      KvPoolSpec spec{1, B * ctx / 64, 64, r_lat, dr_lat};
      Tensor pool = be.alloc_kv_pool(spec);
      be.fill_normal(pool, 0, 1, 4);
      std::vector<std::vector<int32_t>> tables(static_cast<size_t>(B));
      std::vector<SeqSlice> seqs(static_cast<size_t>(B));
      for (int b = 0; b < B; ++b) {
        for (int64_t i = 0; i < ctx / 64; ++i) tables[size_t(b)].push_back(int32_t(b * (ctx / 64) + i));
        seqs[size_t(b)] = SeqSlice{b, 1, ctx - 1, tables[size_t(b)].data(), ctx / 64};
      }
      Tensor ql = be.alloc(DType::BF16, {B, nh, r_lat}, "q_lat"), qp = be.alloc(DType::BF16, {B, nh, dr_lat}, "q_pe"),
             ol = be.alloc(DType::BF16, {B, nh, r_lat}, "o_lat");
      be.fill_normal(ql, 0, 0.1f, 5);
      be.fill_normal(qp, 0, 0.1f, 6);
      return cuda::time_ms(be, 3, 20, [&] { be.mla_decode(ol, ql, qp, pool, spec, 0, seqs, 0.07f); });
    };
    auto cache_bytes = [&](int B, int64_t ctx) { return double(B) * double(ctx) * double(r_lat + dr_lat) * 2; };
    {
      const double ms = time_mla_decode(cfg.num_attention_heads, 32, 4096), bytes = cache_bytes(32, 4096);
      std::printf("  %-44s %8.3f ms  %6.0f GB/s      %.2f of the copy bandwidth\n", "mla_decode B 32 x 4096 tokens", ms,
                  bytes / (ms * 1e-3) / 1e9, bytes / (ms * 1e-3) / copy_bw);
      res["kernel_mla_decode_ms"] = ms;
    }
    if (long_context) {
      // Absorbed decode alone over long contexts, with this model's heads and with DeepSeek-V3's 128.
      std::printf("\n  MLA decode over long contexts, kernel alone (median of 20; floor: the latent cache bytes)\n");
      std::printf("  | heads | batch | cached tokens | ms | GB/s | of the copy bandwidth |\n  | --- | --- | --- | --- | --- | --- |\n");
      json rows = json::array();
      for (int64_t nh : {cfg.num_attention_heads, int64_t(128)})
        for (int B : {1, 8})
          for (int64_t ctx : {int64_t(4096), int64_t(32768), int64_t(131072)}) {
            const double ms = time_mla_decode(nh, B, ctx), bw = cache_bytes(B, ctx) / (ms * 1e-3);
            std::printf("  | %lld | %d | %lld | %.3f | %.0f | %.2f |\n", (long long)nh, B, (long long)ctx, ms, bw / 1e9,
                        bw / copy_bw);
            rows.push_back({{"heads", nh}, {"batch", B}, {"ctx", ctx}, {"ms", ms}, {"of_bw", bw / copy_bw}});
          }
      res["mla_decode_long"] = rows;

      // The whole model decoding over long contexts: each sequence prefilled in 8K-token chunks (the cache after a
      // cached prefix, as a long prompt runs), then timed single-token steps with graphs. Floor: the cache of
      // every layer plus the weights a step reads (decode_bytes).
      std::printf("\n  whole-model decode over long contexts (mean of the timed steps; floor: cache + weights)\n");
      std::printf("  | batch | cached tokens | ms/step | tok/s | floor ms | of the floor |\n  | --- | --- | --- | --- | --- | --- |\n");
      json mrows = json::array();
      struct LongRun {
        int B;
        int64_t ctx;
      };
      for (LongRun lr : {LongRun{1, 32768}, LongRun{8, 32768}, LongRun{1, 131072}}) {
        const int nsteps = 16;
        KvCache cache(be, cfg, lr.B * (lr.ctx + nsteps + 64) + 64 * lr.B);
        std::vector<SeqCache> sc(static_cast<size_t>(lr.B));
        std::vector<BatchSeq> batch(static_cast<size_t>(lr.B));
        for (int b = 0; b < lr.B; ++b) {
          batch[size_t(b)].cache = &sc[size_t(b)];
          for (int64_t done = 0; done < lr.ctx; done += 8192) {
            std::vector<BatchSeq> one(1);
            one[0].cache = &sc[size_t(b)];
            one[0].tokens = random_ids(rng, std::min<int64_t>(8192, lr.ctx - done), V);
            m.forward(one, cache);
          }
        }
        for (auto& b : batch) b.tokens = random_ids(rng, 1, V);
        for (int i = 0; i < 3; ++i) m.forward(batch, cache);  // warm-up (records the graph)
        be.synchronize();
        const auto a = clk::now();
        for (int i = 0; i < nsteps; ++i) {
          m.forward(batch, cache);
          for (auto& b : batch) b.tokens = {int32_t(rng.below(uint64_t(V)))};
        }
        const double st = secs(a, clk::now()) / nsteps;
        const double floor = decode_bytes(cfg, wk, lr.B, lr.ctx + 3 + nsteps / 2) / copy_bw;
        std::printf("  | %d | %lld | %.2f | %.0f | %.2f | %.2f |\n", lr.B, (long long)lr.ctx, st * 1e3, lr.B / st,
                    floor * 1e3, floor / st);
        mrows.push_back({{"batch", lr.B}, {"ctx", lr.ctx}, {"s_per_step", st}, {"tok_s", lr.B / st},
                         {"floor_s", floor}, {"of_floor", floor / st}});
        for (auto& s : sc) cache.release(s);
      }
      res["decode_long"] = mrows;
    }
    {
      // Skinny linear (decode) against cuBLAS on the largest decode matrices.
      const ModelWeights& w = m.weights();
      struct L { const char* name; const Tensor* w; };
      const Tensor* qw = cfg.q_lora_rank > 0 ? &w.layers[0].attn.q_b_proj : &w.layers[0].attn.q_proj;
      for (L l : {L{"lm_head", &w.lm_head}, L{"q_proj", qw}, L{"o_proj", &w.layers[0].attn.o_proj}})
        for (int M : {1, 8, 32})
          for (bool sk : {true, false}) {
            const int64_t N = l.w->dim(0), K = l.w->dim(1);
            Tensor x = be.alloc(DType::BF16, {M, K}, "x"), y = be.alloc(DType::F32, {M, N}, "y");
            be.fill_normal(x, 0, 1, 8);
            cuda::set_skinny(be, sk);
            const double ms = cuda::time_ms(be, 3, 20, [&] { be.linear(y, x, *l.w); });
            const double bytes = double(N * K * 2);
            std::printf("  linear %-10s M %-3d %-8s %8.3f ms  %6.0f GB/s      %.2f of the copy bandwidth\n", l.name, M,
                        sk ? "skinny" : "cuBLAS", ms, bytes / (ms * 1e-3) / 1e9, bytes / (ms * 1e-3) / copy_bw);
          }
      cuda::set_skinny(be, true);
    }
    if (!out_path.empty()) {
      std::ofstream f(out_path);
      f << res.dump(2) << "\n";
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
#endif
}
