// Grouped GEMM benchmarks for the routed experts on one GPU, every kernel against its peers in the same run:
//   infer-m prefill   2048 tokens, top-6 of 64 experts, H 2048, I 1408, two routings: uniform (every expert
//                     about 192 rows) and skewed (expert e drawn with weight 0.85^e, so a few experts take most
//                     rows, as random-weight routers do); gate+up in one launch and down in another.
//                     bf16: the sm90 wgmma/TMA kernel vs cuBLAS' grouped GEMM (what prefill used before);
//                     fp8: the sm90 blockwise-scaled kernel vs the mma.sync fp8 kernel.
//   train-s           8 x 1024 tokens, top-4 of 32 experts, H 1024, I 512, uniform routing; the forward
//                     (gate/up, down), dgrad and wgrad products of training in the list form (bf16 operands,
//                     fp32 results): the sm90 kernel vs the mma.sync kernel, and cuBLAS grouped on the same
//                     shapes with bf16 results.
// TFLOP/s = 2 * sum(M N K) / time. The bf16 dense peak is measured in the same run (cuBLAS 8192^3).
// Usage: gpu_grouped_bench [--json out.json]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/fp8.h"
#include "core/rng.h"
#include "moe_routing.h"
#include "ops/backend.h"
#if DSV3_HAVE_CUDA
#include <cublas_v2.h>

#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/device.h"
#include "ops/cuda/fp8.h"
#include "ops/cuda/grouped_gemm.h"
#include "ops/cuda/sm90/grouped.h"
#include "infer_m_experts.h"
#endif

using namespace dsv3;
using json = nlohmann::json;

#if DSV3_HAVE_CUDA
namespace {

using bench::route_counts;

// cuBLAS' grouped GEMM over a list of problems D[M, N] = A[M, K] B[N, K]^T (bf16, column-major view).
struct CublasGroups {
  std::vector<int> m, n, k, lda, ldb, ldc, gsz;
  std::vector<cublasOperation_t> ta, tb;
  std::vector<float> al, be;
  std::vector<const void*> ptrs_a, ptrs_b;
  std::vector<void*> ptrs_c;
  void** dev = nullptr;
  void add(int M, int N, int K, const void* A, int lda_, const void* B, int ldb_, void* D, int ldd) {
    m.push_back(N), n.push_back(M), k.push_back(K), lda.push_back(ldb_), ldb.push_back(lda_), ldc.push_back(ldd);
    gsz.push_back(1), ta.push_back(CUBLAS_OP_T), tb.push_back(CUBLAS_OP_N), al.push_back(1.f), be.push_back(0.f);
    ptrs_a.push_back(B), ptrs_b.push_back(A), ptrs_c.push_back(D);
  }
  void upload() {
    std::vector<const void*> all(ptrs_a.begin(), ptrs_a.end());
    all.insert(all.end(), ptrs_b.begin(), ptrs_b.end());
    all.insert(all.end(), ptrs_c.begin(), ptrs_c.end());
    DSV3_CUDA_CHECK(cudaMalloc(&dev, all.size() * sizeof(void*)));
    DSV3_CUDA_CHECK(cudaMemcpy(dev, all.data(), all.size() * sizeof(void*), cudaMemcpyHostToDevice));
  }
  void run(cublasHandle_t h) {
    const int g = int(m.size());
    DSV3_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        h, ta.data(), tb.data(), m.data(), n.data(), k.data(), al.data(), reinterpret_cast<const void* const*>(dev),
        CUDA_R_16BF, lda.data(), reinterpret_cast<const void* const*>(dev + g), CUDA_R_16BF, ldb.data(), be.data(),
        dev + 2 * g, CUDA_R_16BF, ldc.data(), g, gsz.data(), CUBLAS_COMPUTE_32F));
  }
  ~CublasGroups() { cudaFree(dev); }
};

double tflops(double flops, double ms) { return flops / (ms * 1e-3) / 1e12; }

}  // namespace

int main(int argc, char** argv) {
  std::string out_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) out_path = argv[++i];
    else {
      std::fprintf(stderr, "usage: gpu_grouped_bench [--json OUT]\n");
      return 2;
    }
  }
  if (!cuda_available()) {
    std::printf("gpu_grouped_bench: no CUDA device; skipped\n");
    return 0;
  }
  try {
    auto bep = make_cuda_backend(0);
    Backend& be = *bep;
    auto& ctx = cuda::DeviceContext::get(0);
    cudaStream_t s = ctx.stream;
    const bool sm90 = cuda::sm90::available();
    json res;
    const double peak = cuda::measure_gemm_flops(be, 8192, 8192, 8192, 10) / 1e12;
    std::printf("bf16 dense GEMM 8192^3 (cuBLAS): %.0f TFLOP/s; sm90 kernels %s\n", peak, sm90 ? "built" : "NOT built");
    res["bf16_dense_TFLOPs"] = peak;
    res["sm90"] = sm90;
    void* ws = nullptr;
    const size_t ws_bytes = size_t(64) << 20;
    DSV3_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));

    // ---- infer-m prefill experts
    bench::InferMExperts op(be, s, sm90);
    const int64_t T = op.T, E = op.E, H = op.H, I = op.I, P = op.P, kh = op.kh, ki = op.ki;
    const int topk = op.topk;
    Tensor &x = op.x, &a = op.a, &gw = op.gw, &uw = op.uw, &dw = op.dw, &g = op.g, &u = op.u, &y = op.y;
    Tensor &xq = op.xq, &sx = op.sx, &aq = op.aq, &sa = op.sa, &sxg = op.sxg, &sag = op.sag;
    Tensor &gq = op.gq, &gs = op.gs, &uq = op.uq, &us = op.us, &dq = op.dq, &ds = op.ds;
    Tensor &gst = op.gst, &ust = op.ust, &dst = op.dst;
    cuda::Fp8Problem* dprob = nullptr;
    DSV3_CUDA_CHECK(cudaMalloc(&dprob, 1024 * sizeof(cuda::Fp8Problem)));
    int* doff = nullptr;
    DSV3_CUDA_CHECK(cudaMalloc(&doff, (E + 1) * sizeof(int)));
    const double f_gu = 2.0 * 2 * double(P) * I * H, f_dn = 2.0 * double(P) * H * I;
    std::printf("| infer-m prefill experts | routing | sm90 bf16 | cuBLAS grouped bf16 | sm90 / cuBLAS | sm90 fp8 | "
                "mma fp8 | sm90 fp8 / bf16 |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    json inf = json::array();
    for (bool skewed : {false, true}) {
      const std::vector<int> cnt = route_counts(T, topk, int(E), skewed, 5);
      std::vector<int> off(size_t(E) + 1, 0);
      for (int64_t e = 0; e < E; ++e) off[size_t(e) + 1] = off[size_t(e)] + cnt[size_t(e)];
      DSV3_CUDA_CHECK(cudaMemcpy(doff, off.data(), off.size() * sizeof(int), cudaMemcpyHostToDevice));
      const int mx = *std::max_element(cnt.begin(), cnt.end());
      // cuBLAS grouped, bf16
      CublasGroups cgu, cdn;
      for (int64_t e = 0; e < E; ++e) {
        const int c = cnt[size_t(e)];
        if (!c) continue;
        const int64_t o = off[size_t(e)];
        cgu.add(c, int(I), int(H), x.ptr<uint16_t>() + o * H, int(H), gw.ptr<uint16_t>() + e * I * H, int(H),
                g.ptr<uint16_t>() + o * I, int(I));
        cgu.add(c, int(I), int(H), x.ptr<uint16_t>() + o * H, int(H), uw.ptr<uint16_t>() + e * I * H, int(H),
                u.ptr<uint16_t>() + o * I, int(I));
        cdn.add(c, int(H), int(I), a.ptr<uint16_t>() + o * I, int(I), dw.ptr<uint16_t>() + e * H * I, int(I),
                y.ptr<uint16_t>() + o * H, int(H));
      }
      cgu.upload(), cdn.upload();
      const double c_gu = cuda::time_ms(be, 3, 20, [&] { cgu.run(ctx.blas); });
      const double c_dn = cuda::time_ms(be, 3, 20, [&] { cdn.run(ctx.blas); });
      double s_gu = 0, s_dn = 0, s8_gu = 0, s8_dn = 0;
      if (sm90) {
        cuda::sm90::ExpertGemm eg;
        eg.A = x.data, eg.lda = H, eg.W[0] = gw.data, eg.W[1] = uw.data, eg.w_stride = I * H, eg.D[0] = g.data;
        eg.D[1] = u.data, eg.ldd = I, eg.offsets = doff, eg.E = int(E), eg.N = int(I), eg.K = int(H), eg.sets = 2;
        cuda::sm90::ExpertGemm ed = eg;
        ed.A = a.data, ed.lda = I, ed.W[0] = dw.data, ed.W[1] = nullptr, ed.w_stride = H * I, ed.D[0] = y.data;
        ed.D[1] = nullptr, ed.ldd = H, ed.N = int(H), ed.K = int(I), ed.sets = 1;
        s_gu = cuda::time_ms(be, 3, 20, [&] { cuda::sm90::expert_gemm_bf16(eg, ws, ws_bytes, s); });
        s_dn = cuda::time_ms(be, 3, 20, [&] { cuda::sm90::expert_gemm_bf16(ed, ws, ws_bytes, s); });
        cuda::sm90::regroup_act_scales(sxg.f32(), sx.f32(), doff, int(E), P, kh, s);
        cuda::sm90::regroup_act_scales(sag.f32(), sa.f32(), doff, int(E), P, ki, s);
        eg.A = xq.data, eg.W[0] = gq.data, eg.W[1] = uq.data, eg.sa = sxg.f32(), eg.sw[0] = gst.f32(), eg.sw[1] = ust.f32();
        ed.A = aq.data, ed.W[0] = dq.data, ed.sa = sag.f32(), ed.sw[0] = dst.f32();
        s8_gu = cuda::time_ms(be, 3, 20, [&] { cuda::sm90::expert_gemm_fp8(eg, ws, ws_bytes, s); });
        s8_dn = cuda::time_ms(be, 3, 20, [&] { cuda::sm90::expert_gemm_fp8(ed, ws, ws_bytes, s); });
      }
      // mma.sync fp8 peer
      std::vector<cuda::Fp8Problem> pgu, pdn;
      for (int64_t e = 0; e < E; ++e) {
        const int c = cnt[size_t(e)];
        if (!c) continue;
        const int64_t o = off[size_t(e)];
        pgu.push_back({xq.ptr<uint8_t>() + o * H, sx.f32() + o * kh, gq.ptr<uint8_t>() + e * I * H, gs.f32() + e * ki * kh,
                       g.ptr<uint16_t>() + o * I, c, int(I), int(H), int(H), int(H), int(I), int(kh), int(kh), 0, 0, 0});
        pgu.push_back({xq.ptr<uint8_t>() + o * H, sx.f32() + o * kh, uq.ptr<uint8_t>() + e * I * H, us.f32() + e * ki * kh,
                       u.ptr<uint16_t>() + o * I, c, int(I), int(H), int(H), int(H), int(I), int(kh), int(kh), 0, 0, 0});
        pdn.push_back({aq.ptr<uint8_t>() + o * I, sa.f32() + o * ki, dq.ptr<uint8_t>() + e * H * I, ds.f32() + e * kh * ki,
                       y.ptr<uint16_t>() + o * H, c, int(H), int(I), int(I), int(I), int(H), int(ki), int(ki), 0, 0, 0});
      }
      const double m_gu = cuda::time_ms(be, 3, 20, [&] {
        auto p = pgu;
        cuda::fp8_grouped_gemm(p, dprob, s);
      });
      const double m_dn = cuda::time_ms(be, 3, 20, [&] {
        auto p = pdn;
        cuda::fp8_grouped_gemm(p, dprob + 512, s);
      });
      const double f = f_gu + f_dn;
      const double t_s = s_gu + s_dn, t_c = c_gu + c_dn, t_s8 = s8_gu + s8_dn, t_m = m_gu + m_dn;
      const char* rname = skewed ? "skewed" : "uniform";
      std::printf("| gate+up and down | %s (max %d rows) | %.0f TFLOP/s (%.0f / %.0f) | %.0f (%.0f / %.0f) | %.2fx | "
                  "%.0f (%.0f / %.0f) | %.0f | %.2fx |\n",
                  rname, mx, sm90 ? tflops(f, t_s) : 0.0, sm90 ? tflops(f_gu, s_gu) : 0.0,
                  sm90 ? tflops(f_dn, s_dn) : 0.0, tflops(f, t_c), tflops(f_gu, c_gu), tflops(f_dn, c_dn),
                  sm90 ? t_c / t_s : 0.0, sm90 ? tflops(f, t_s8) : 0.0, sm90 ? tflops(f_gu, s8_gu) : 0.0,
                  sm90 ? tflops(f_dn, s8_dn) : 0.0, tflops(f, t_m), sm90 ? t_s / t_s8 : 0.0);
      inf.push_back({{"routing", rname}, {"max_rows", mx}, {"sm90_bf16_TFLOPs", sm90 ? tflops(f, t_s) : 0.0},
                     {"sm90_bf16_gate_up_TFLOPs", sm90 ? tflops(f_gu, s_gu) : 0.0},
                     {"sm90_bf16_down_TFLOPs", sm90 ? tflops(f_dn, s_dn) : 0.0},
                     {"cublas_bf16_TFLOPs", tflops(f, t_c)}, {"sm90_fp8_TFLOPs", sm90 ? tflops(f, t_s8) : 0.0},
                     {"sm90_fp8_gate_up_TFLOPs", sm90 ? tflops(f_gu, s8_gu) : 0.0},
                     {"mma_fp8_TFLOPs", tflops(f, t_m)}});
    }
    res["infer_m_prefill"] = inf;

    // ---- train-s list products (fp32 results) vs the mma.sync kernel and cuBLAS grouped (bf16 results)
    {
      const int64_t TT = 8 * 1024, EE = 32, HH = 1024, II = 512;
      const int tk = 4;
      const int64_t PP = TT * tk;
      const std::vector<int> cnt = route_counts(TT, tk, int(EE), false, 7);
      std::vector<int64_t> off(size_t(EE) + 1, 0), po(size_t(EE) + 1, 0);
      for (int64_t e = 0; e < EE; ++e) {
        off[size_t(e) + 1] = off[size_t(e)] + cnt[size_t(e)];
        po[size_t(e) + 1] = po[size_t(e)] + (cnt[size_t(e)] + 7) / 8 * 8;
      }
      const int64_t PT = po[size_t(EE)];
      Tensor X = be.alloc(DType::BF16, {PP, HH}, "X"), A = be.alloc(DType::BF16, {PP, II}, "A");
      Tensor XT = be.alloc(DType::BF16, {HH, PT}, "XT"), dGT = be.alloc(DType::BF16, {II, PT}, "dGT");
      Tensor W = be.alloc(DType::BF16, {EE, II, HH}, "W"), WT = be.alloc(DType::BF16, {EE, HH, II}, "WT");
      for (Tensor* t : {&X, &A, &XT, &dGT, &W, &WT}) be.fill_normal(*t, 0.f, 0.5f, 13);
      Tensor Cg = be.alloc(DType::F32, {PP, II}, "Cg"), Cx = be.alloc(DType::F32, {PP, HH}, "Cx");
      Tensor dW = be.alloc(DType::F32, {EE, II, HH}, "dW");
      Tensor Bg = be.alloc(DType::BF16, {PP, II}, "Bg"), Bx = be.alloc(DType::BF16, {PP, HH}, "Bx");
      Tensor BdW = be.alloc(DType::BF16, {EE, II, HH}, "BdW");
      auto nt = [](const void* Ap, int64_t lda, const void* Bp, int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N,
                   int64_t K, float beta) {
        return cuda::GroupedProblem{static_cast<const cuda::bf16*>(Ap), static_cast<const cuda::bf16*>(Bp), C, int(M),
                                    int(N), int(K), int(lda), int(ldb), int(ldc), beta, 0};
      };
      struct Shape {
        const char* name;
        std::vector<cuda::GroupedProblem> probs;
        CublasGroups peer;
        double flops = 0;
      };
      std::vector<Shape> shapes(3);
      shapes[0].name = "forward gate (x W^T)", shapes[1].name = "dgrad (dG W)", shapes[2].name = "wgrad (dG^T x, += )";
      for (int64_t e = 0; e < EE; ++e) {
        const int64_t o = off[size_t(e)], n = cnt[size_t(e)], kp = po[size_t(e) + 1] - po[size_t(e)];
        if (!n) continue;
        const auto* Xb = X.ptr<uint16_t>();
        shapes[0].probs.push_back(nt(Xb + o * HH, HH, W.ptr<uint16_t>() + e * II * HH, HH, Cg.f32() + o * II, II, n, II, HH, 0.f));
        shapes[0].peer.add(int(n), int(II), int(HH), Xb + o * HH, int(HH), W.ptr<uint16_t>() + e * II * HH, int(HH),
                           Bg.ptr<uint16_t>() + o * II, int(II));
        shapes[1].probs.push_back(nt(A.ptr<uint16_t>() + o * II, II, WT.ptr<uint16_t>() + e * HH * II, II,
                                     Cx.f32() + o * HH, HH, n, HH, II, 0.f));
        shapes[1].peer.add(int(n), int(HH), int(II), A.ptr<uint16_t>() + o * II, int(II),
                           WT.ptr<uint16_t>() + e * HH * II, int(II), Bx.ptr<uint16_t>() + o * HH, int(HH));
        shapes[2].probs.push_back(nt(dGT.ptr<uint16_t>() + po[size_t(e)], PT, XT.ptr<uint16_t>() + po[size_t(e)], PT,
                                     dW.f32() + e * II * HH, HH, II, HH, kp, 1.f));
        shapes[2].peer.add(int(II), int(HH), int(kp), dGT.ptr<uint16_t>() + po[size_t(e)], int(PT),
                           XT.ptr<uint16_t>() + po[size_t(e)], int(PT), BdW.ptr<uint16_t>() + e * II * HH, int(HH));
      }
      cuda::GroupedProblem* dgp = nullptr;
      DSV3_CUDA_CHECK(cudaMalloc(&dgp, 256 * sizeof(cuda::GroupedProblem)));
      std::printf("\n| train-s expert products | sm90 (fp32 out) | mma.sync (fp32 out) | cuBLAS grouped (bf16 out) | "
                  "sm90 / cuBLAS | sm90 / mma |\n| --- | --- | --- | --- | --- | --- |\n");
      json tr = json::array();
      for (Shape& sh : shapes) {
        for (auto& p : sh.probs) sh.flops += 2.0 * double(p.M) * p.N * p.K;
        sh.peer.upload();
        const double t_c = cuda::time_ms(be, 3, 20, [&] { sh.peer.run(ctx.blas); });
        const double t_m = cuda::time_ms(be, 3, 20, [&] {
          auto p = sh.probs;
          cuda::grouped_gemm(p, dgp, s);
        });
        const double t_s = sm90 ? cuda::time_ms(be, 3, 20, [&] { cuda::sm90::list_gemm(sh.probs, ws, ws_bytes, s); }) : 0;
        std::printf("| %s | %.0f TFLOP/s | %.0f | %.0f | %.2fx | %.2fx |\n", sh.name, sm90 ? tflops(sh.flops, t_s) : 0.0,
                    tflops(sh.flops, t_m), tflops(sh.flops, t_c), sm90 ? t_c / t_s : 0.0, sm90 ? t_m / t_s : 0.0);
        tr.push_back({{"product", sh.name}, {"sm90_TFLOPs", sm90 ? tflops(sh.flops, t_s) : 0.0},
                      {"mma_TFLOPs", tflops(sh.flops, t_m)}, {"cublas_TFLOPs", tflops(sh.flops, t_c)}});
      }
      res["train_s"] = tr;
      cudaFree(dgp);
    }
    cudaFree(ws), cudaFree(dprob), cudaFree(doff);
    if (!out_path.empty()) std::ofstream(out_path) << res.dump(2) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
#else
int main() {
  std::printf("gpu_grouped_bench: built without CUDA\n");
  return 0;
}
#endif
