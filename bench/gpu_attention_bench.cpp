// Causal MLA prefill attention on one GPU (infer-m: 16 heads, d_qk 128 + 64, d_v 128; DeepSeek-V3: 128 heads):
// cuDNN's fused attention vs the hand-written mma.sync kernel, in the same run, with the bf16 dense GEMM peak
// measured by cuBLAS. FLOPs count the causal half: 2 * nh * (d_qk + d_v) * sum over queries of visible keys.
// The cuDNN time includes building the dense keys (mla_concat_k), as prefill runs it.
// Usage: gpu_attention_bench [--json OUT]
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "ops/backend.h"
#if DSV3_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/cudnn/attention.h"
#include "ops/cuda/device.h"
#endif

using namespace dsv3;
using json = nlohmann::json;

int main(int argc, char** argv) {
  std::string out_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) out_path = argv[++i];
    else {
      std::fprintf(stderr, "usage: gpu_attention_bench [--json OUT]\n");
      return 2;
    }
  }
#if DSV3_HAVE_CUDA
  if (!cuda_available()) {
    std::printf("gpu_attention_bench: no CUDA device; skipped\n");
    return 0;
  }
  try {
    auto bep = make_cuda_backend(0);
    Backend& be = *bep;
    auto& ctx = cuda::DeviceContext::get(0);
    const double peak = cuda::measure_gemm_flops(be, 8192, 8192, 8192, 10) / 1e12;
    const bool cd = cuda::cudnn::available();
    std::printf("bf16 dense GEMM 8192^3 (cuBLAS): %.0f TFLOP/s; cuDNN attention %s\n", peak, cd ? "built" : "NOT built");
    std::printf("| heads | new tokens | cached | cuDNN TFLOP/s | built-in TFLOP/s | cuDNN / built-in | cuDNN of peak |\n"
                "| --- | --- | --- | --- | --- | --- | --- |\n");
    json rows = json::array();
    const int dn = 128, dr = 64, dv = 128;
    struct AttnShape {
      int nh, len, pos0;
    };
    for (const AttnShape sh : {AttnShape{16, 2048, 0}, AttnShape{16, 4096, 0}, AttnShape{16, 8192, 0}, AttnShape{16, 1024, 7168},
                           AttnShape{128, 4096, 0}}) {
      const int n = sh.pos0 + sh.len;
      Tensor q = be.alloc(DType::BF16, {int64_t(sh.len), sh.nh, dn + dr}, "q");
      Tensor kv = be.alloc(DType::BF16, {int64_t(n), sh.nh, dn + dv}, "kv"), kpe = be.alloc(DType::BF16, {n, dr}, "kpe");
      Tensor kd = be.alloc(DType::BF16, {int64_t(n), sh.nh, dn + dr}, "k");
      Tensor o = be.alloc(DType::BF16, {int64_t(sh.len), sh.nh, dv}, "o");
      for (Tensor* t : {&q, &kv, &kpe}) be.fill_normal(*t, 0.f, 1.f, 3);
      const float scale = 1.f / std::sqrt(float(dn + dr));
      double visible = 0;
      for (int i = 0; i < sh.len; ++i) visible += sh.pos0 + i + 1;
      const double flops = 2.0 * sh.nh * (dn + dr + dv) * visible;
      auto B = [](Tensor& t) { return static_cast<cuda::bf16*>(t.data); };
      const double t_n = cuda::time_ms(be, 2, 10, [&] {
        cuda::mla_prefill(B(o), B(q), B(kv), B(kpe), sh.len, sh.pos0, sh.nh, dn, dr, dv, scale, ctx.stream);
      });
      double t_c = 0;
      if (cd) {
        cuda::cudnn::CausalAttention a;
        a.out = B(o), a.q = B(q), a.k = B(kd), a.v = B(kv) + dn, a.v_row = int64_t(sh.nh) * (dn + dv), a.v_head = dn + dv;
        a.len = sh.len, a.n = n, a.nh = sh.nh, a.dqk = dn + dr, a.dv = dv, a.scale = scale;
        const char* why = nullptr;
        if (cuda::cudnn::causal_attention(a, ctx.stream, &why))
          t_c = cuda::time_ms(be, 2, 10, [&] {
            cuda::mla_concat_k(B(kd), B(kv), B(kpe), n, sh.nh, dn, dr, dv, ctx.stream);
            cuda::cudnn::causal_attention(a, ctx.stream);
          });
        else
          std::printf("cuDNN refused: %s\n", why);
      }
      const double tc = t_c > 0 ? flops / (t_c * 1e-3) / 1e12 : 0, tn = flops / (t_n * 1e-3) / 1e12;
      std::printf("| %d | %d | %d | %.0f | %.0f | %.2fx | %.2f |\n", sh.nh, sh.len, sh.pos0, tc, tn, t_c > 0 ? t_n / t_c : 0,
                  tc / peak);
      rows.push_back({{"heads", sh.nh}, {"len", sh.len}, {"pos0", sh.pos0}, {"cudnn_TFLOPs", tc}, {"builtin_TFLOPs", tn},
                      {"peak_TFLOPs", peak}});
    }
    if (!out_path.empty()) std::ofstream(out_path) << json{{"attention", rows}, {"bf16_dense_TFLOPs", peak}}.dump(2) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_attention_bench: %s\n", e.what());
    return 1;
  }
#else
  std::printf("gpu_attention_bench: built without CUDA; skipped\n");
#endif
  return 0;
}
