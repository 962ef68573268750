// gpu_grouped_tiles: tile shapes, clusters and schedules of the sm90 grouped expert GEMMs, timed on the infer-m
// prefill routing (2048 tokens, top-6 of 64 experts, H 2048, I 1408; uniform and skewed 0.85^e routings) against
// the production instantiation in the same run. Each variant's output is compared with the production one
// (max |diff| / max |ref|; the same math in another order, so a few bf16 ulps at most).
// Usage: gpu_grouped_tiles [--json OUT]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench/sm90_tiles/tiles.h"
#include "core/fp8.h"
#include "core/rng.h"
#include "bench/moe_routing.h"
#include "ops/backend.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/device.h"
#include "ops/cuda/fp8.h"
#include "bench/infer_m_experts.h"

using namespace dsv3;
using json = nlohmann::json;

namespace dsv3::bench {
std::vector<TileVariant>& registered_variants() {
  static std::vector<TileVariant> v;
  return v;
}
bool register_variant(TileVariant v) {
  registered_variants().push_back(std::move(v));
  return true;
}
}  // namespace dsv3::bench

namespace {

using bench::route_counts;

std::vector<float> host_bf16(const Tensor& t) {
  std::vector<uint16_t> raw(size_t(t.numel()));
  DSV3_CUDA_CHECK(cudaMemcpy(raw.data(), t.data, raw.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<float> f(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    const uint32_t b = uint32_t(raw[i]) << 16;
    std::memcpy(&f[i], &b, 4);
  }
  return f;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& ref) {
  double mx = 0, mr = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    mx = std::max(mx, double(std::fabs(a[i] - ref[i]))), mr = std::max(mr, double(std::fabs(ref[i])));
  }
  return mr > 0 ? mx / mr : mx;
}

double tflops(double flops, double ms) { return flops / (ms * 1e-3) / 1e12; }

}  // namespace

int main(int argc, char** argv) {
  std::string out_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) out_path = argv[++i];
    else {
      std::fprintf(stderr, "usage: gpu_grouped_tiles [--json OUT]\n");
      return 2;
    }
  }
  if (!cuda_available() || !cuda::sm90::available()) {
    std::printf("gpu_grouped_tiles: no sm90 device or kernels; skipped\n");
    return 0;
  }
  try {
    auto bep = make_cuda_backend(0);
    Backend& be = *bep;
    auto& ctx = cuda::DeviceContext::get(0);
    cudaStream_t s = ctx.stream;
    std::vector<bench::TileVariant> vars;
    bench::TileVariant prod_b{"production bf16 (cooperative 128x256x64 cluster 1x1)", false, cuda::sm90::expert_gemm_bf16,
                              [](int g) { return cuda::sm90::expert_workspace_bytes(g, false); }};
    bench::TileVariant prod_f{"production fp8 (cooperative 128x128x128 cluster 1x1)", true, cuda::sm90::expert_gemm_fp8,
                              [](int g) { return cuda::sm90::expert_workspace_bytes(g, true); }};
    auto reg = bench::registered_variants();
    std::sort(reg.begin(), reg.end(), [](const auto& x, const auto& y) { return x.name < y.name; });
    vars.push_back(prod_b);
    for (auto& v : reg)
      if (!v.fp8) vars.push_back(v);
    vars.push_back(prod_f);
    for (auto& v : reg)
      if (v.fp8) vars.push_back(v);

    bench::InferMExperts op(be, s, true);
    const int64_t T = op.T, E = op.E, H = op.H, I = op.I, P = op.P, kh = op.kh, ki = op.ki;
    const int topk = op.topk;
    Tensor &x = op.x, &a = op.a, &gw = op.gw, &uw = op.uw, &dw = op.dw, &g = op.g, &u = op.u, &y = op.y;
    Tensor &xq = op.xq, &sx = op.sx, &aq = op.aq, &sa = op.sa, &sxg = op.sxg, &sag = op.sag;
    Tensor &gq = op.gq, &gs = op.gs, &uq = op.uq, &us = op.us, &dq = op.dq, &ds = op.ds;
    Tensor &gst = op.gst, &ust = op.ust, &dst = op.dst;
    int* doff = nullptr;
    DSV3_CUDA_CHECK(cudaMalloc(&doff, (E + 1) * sizeof(int)));
    void* ws = nullptr;
    const size_t ws_bytes = size_t(64) << 20;
    DSV3_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
    const double f_gu = 2.0 * 2 * double(P) * I * H, f_dn = 2.0 * double(P) * H * I;

    json rows = json::array();
    std::printf("| variant | routing | gate+up TFLOP/s | down TFLOP/s | both | vs production | max rel diff |\n"
                "| --- | --- | --- | --- | --- | --- | --- |\n");
    for (bool skewed : {false, true}) {
      const std::vector<int> cnt = route_counts(T, topk, int(E), skewed, 5);
      std::vector<int> off(size_t(E) + 1, 0);
      for (int64_t e = 0; e < E; ++e) off[size_t(e) + 1] = off[size_t(e)] + cnt[size_t(e)];
      DSV3_CUDA_CHECK(cudaMemcpy(doff, off.data(), off.size() * sizeof(int), cudaMemcpyHostToDevice));
      cuda::sm90::regroup_act_scales(sxg.f32(), sx.f32(), doff, int(E), P, kh, s);
      cuda::sm90::regroup_act_scales(sag.f32(), sa.f32(), doff, int(E), P, ki, s);
      std::vector<float> ref_g, ref_y;
      double base_ms = 0;
      for (const auto& v : vars) {
        cuda::sm90::ExpertGemm eg;
        eg.A = v.fp8 ? xq.data : x.data, eg.lda = H, eg.W[0] = v.fp8 ? gq.data : gw.data;
        eg.W[1] = v.fp8 ? uq.data : uw.data, eg.w_stride = I * H, eg.D[0] = g.data, eg.D[1] = u.data, eg.ldd = I;
        eg.offsets = doff, eg.E = int(E), eg.N = int(I), eg.K = int(H), eg.sets = 2;
        if (v.fp8) eg.sa = sxg.f32(), eg.sw[0] = gst.f32(), eg.sw[1] = ust.f32();
        cuda::sm90::ExpertGemm ed = eg;
        ed.A = v.fp8 ? aq.data : a.data, ed.lda = I, ed.W[0] = v.fp8 ? dq.data : dw.data, ed.W[1] = nullptr;
        ed.w_stride = H * I, ed.D[0] = y.data, ed.D[1] = nullptr, ed.ldd = H, ed.N = int(H), ed.K = int(I), ed.sets = 1;
        if (v.fp8) ed.sa = sag.f32(), ed.sw[0] = dst.f32(), ed.sw[1] = nullptr;
        double t_gu = 0, t_dn = 0, diff = 0;
        std::string err;
        try {
          DSV3_CHECK(v.workspace(int(2 * E)) <= ws_bytes, "workspace {} bytes", v.workspace(int(2 * E)));
          DSV3_CUDA_CHECK(cudaMemsetAsync(g.data, 0, size_t(P * I) * 2, s));
          DSV3_CUDA_CHECK(cudaMemsetAsync(y.data, 0, size_t(P * H) * 2, s));
          v.run(eg, ws, ws_bytes, s), v.run(ed, ws, ws_bytes, s);
          DSV3_CUDA_CHECK(cudaStreamSynchronize(s));
          const std::vector<float> hg = host_bf16(g), hy = host_bf16(y);
          if (v.name.rfind("production", 0) == 0) ref_g = hg, ref_y = hy;
          diff = std::max(rel_diff(hg, ref_g), rel_diff(hy, ref_y));
          t_gu = cuda::time_ms(be, 3, 20, [&] { v.run(eg, ws, ws_bytes, s); });
          t_dn = cuda::time_ms(be, 3, 20, [&] { v.run(ed, ws, ws_bytes, s); });
        } catch (const std::exception& e) {
          err = e.what();
          cudaGetLastError();
        }
        const char* rname = skewed ? "skewed" : "uniform";
        if (!err.empty()) {
          std::printf("| %s | %s | failed: %s | | | | |\n", v.name.c_str(), rname, err.c_str());
          continue;
        }
        if (v.name.rfind("production", 0) == 0) base_ms = t_gu + t_dn;
        std::printf("| %s | %s | %.0f | %.0f | %.0f | %.2fx | %.1e |\n", v.name.c_str(), rname, tflops(f_gu, t_gu),
                    tflops(f_dn, t_dn), tflops(f_gu + f_dn, t_gu + t_dn), base_ms / (t_gu + t_dn), diff);
        rows.push_back({{"variant", v.name}, {"routing", rname}, {"gate_up_TFLOPs", tflops(f_gu, t_gu)},
                        {"down_TFLOPs", tflops(f_dn, t_dn)}, {"TFLOPs", tflops(f_gu + f_dn, t_gu + t_dn)},
                        {"speedup_vs_production", base_ms / (t_gu + t_dn)}, {"max_rel_diff", diff}});
      }
    }
    if (!out_path.empty()) std::ofstream(out_path) << json{{"tiles", rows}}.dump(2) << "\n";
    cudaFree(ws), cudaFree(doff);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_grouped_tiles: %s\n", e.what());
    return 1;
  }
  return 0;
}
