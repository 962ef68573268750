// FP8 GEMM benchmarks on one GPU, each against a peer measured in the same run:
//   dense      y = x W^T on DeepSeek-V3 shapes (M in {64, 128, 4096}; N x K in {7168x2048, 2048x7168, 4096x7168,
//              7168x18432}): cuBLASLt block-scaled FP8 (1x128 x 128x128), the sm90 wgmma blockwise-scaled kernel
//              (sm90/grouped.h, one expert), the grouped mma.sync FP8 kernel with one problem, and bf16 cuBLAS on the
//              same shape; TFLOP/s (2 M N K / time; activation quantization timed
//              separately);
//   grouped    the routed experts of infer-m prefill (2048 tokens, top-6 of 64 experts, H 2048, I 1408, uniform
//              random routing): gate+up and down over all active experts in one launch each, FP8 kernel vs bf16
//              cuBLAS grouped GEMM on the same groups;
//   quantize   the 1x128 activation quantizer against the copy bandwidth floor of its bytes.
// Usage: gpu_fp8_bench [--json out.json]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/fp8.h"
#include "core/rng.h"
#include "ops/backend.h"
#if DSV3_HAVE_CUDA
#include <cublas_v2.h>

#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/device.h"
#include "ops/cuda/fp8.h"
#include "ops/cuda/sm90/grouped.h"
#endif

using namespace dsv3;
using json = nlohmann::json;

#if DSV3_HAVE_CUDA
namespace {

struct Operands {
  Tensor xb, wb;          // bf16 x [M, K], W [N, K]
  Tensor xq, sx, sxl;     // fp8 x codes, scales [M, kt] and cuBLASLt layout [kt, M4]
  Tensor wq, ws, wsl;     // fp8 W codes, scales [nt, kt] and cuBLASLt layout [nt, kt4]
  Tensor y;               // bf16 [M, N]
};

Operands make(Backend& be, int64_t M, int64_t N, int64_t K, uint64_t seed) {
  cudaStream_t s = static_cast<cudaStream_t>(cuda::stream_of(be));
  Operands o;
  const int64_t kt = fp8::tiles(K), nt = fp8::tiles(N);
  o.xb = be.alloc(DType::BF16, {M, K}, "x");
  o.wb = be.alloc(DType::BF16, {N, K}, "w");
  be.fill_normal(o.xb, 0.f, 1.f, seed);
  be.fill_normal(o.wb, 0.f, 0.02f, seed + 1);
  o.xq = be.alloc(DType::U8, {M, K}, "xq");
  o.sx = be.alloc(DType::F32, {M * kt}, "sx");
  o.sxl = be.alloc(DType::F32, {kt * cuda::round_up4(M)}, "sxl");
  cuda::quantize_1x128(o.xq.ptr<uint8_t>(), o.sx.f32(), 0, o.xb.data, DType::BF16, K, M, K, s);
  cuda::quantize_1x128(o.xq.ptr<uint8_t>(), o.sxl.f32(), cuda::round_up4(M), o.xb.data, DType::BF16, K, M, K, s);
  auto [wq, ws] = cuda::quantize_weight_fp8(be, o.wb);
  o.wq = wq, o.ws = ws;
  o.wsl = be.alloc(DType::F32, {nt * cuda::round_up4(kt)}, "wsl");
  cuda::pad_scale_rows(o.wsl.f32(), o.ws.f32(), nt, kt, s);
  o.y = be.alloc(DType::BF16, {M, N}, "y");
  be.synchronize();
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) out_path = argv[++i];
    else {
      std::fprintf(stderr, "usage: gpu_fp8_bench [--json OUT]\n");
      return 2;
    }
  }
  if (!cuda_available()) {
    std::printf("gpu_fp8_bench: no CUDA device; skipped\n");
    return 0;
  }
  try {
    auto bep = make_cuda_backend(0);
    Backend& be = *bep;
    auto& ctx = cuda::DeviceContext::get(0);
    cudaStream_t s = ctx.stream;
    cuda::LtFp8 lt{ctx.lt, ctx.blas_ws, size_t(32) << 20};
    json res;
    const double copy_bw = cuda::measure_copy_bandwidth(be, size_t(2) << 30, 10);
    const double gemm = cuda::measure_gemm_flops(be, 8192, 8192, 8192, 10);
    std::printf("ceilings: copy %.2f TB/s, bf16 GEMM 8192^3 %.0f TFLOP/s\n", copy_bw / 1e12, gemm / 1e12);
    res["copy_TBps"] = copy_bw / 1e12;
    res["bf16_gemm_TFLOPs"] = gemm / 1e12;
    cuda::Fp8Problem* dprob = nullptr;
    DSV3_CUDA_CHECK(cudaMalloc(&dprob, 1024 * sizeof(cuda::Fp8Problem)));

    // ---- dense
    const bool sm90 = cuda::sm90::available();
    void* ws90 = nullptr;
    const size_t ws90_bytes = size_t(8) << 20;
    int* off90 = nullptr;
    DSV3_CUDA_CHECK(cudaMalloc(&ws90, ws90_bytes));
    DSV3_CUDA_CHECK(cudaMalloc(&off90, 2 * sizeof(int)));
    std::printf("| M | N x K | cuBLASLt fp8 | sm90 fp8 | mma fp8 | bf16 cuBLAS | quantize x (GB/s) | best fp8 / bf16 |\n");
    std::printf("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    json dense = json::array();
    const std::vector<std::pair<int64_t, int64_t>> nk = {{7168, 2048}, {2048, 7168}, {4096, 7168}, {7168, 18432}};
    for (int64_t M : {64, 128, 4096})
      for (auto [N, K] : nk) {
        Operands o = make(be, M, N, K, uint64_t(M * 31 + N * 7 + K));
        const double flops = 2.0 * double(M) * double(N) * double(K);
        const double t_lt = cuda::time_ms(be, 3, 20, [&] {
          cuda::fp8_lt_gemm(lt, o.y.data, DType::BF16, o.xq.ptr<uint8_t>(), o.sxl.f32(), o.wq.ptr<uint8_t>(),
                            o.wsl.f32(), M, N, K, s);
        });
        const int kt = int(fp8::tiles(K));
        const double t_mma = cuda::time_ms(be, 3, 20, [&] {
          std::vector<cuda::Fp8Problem> p{{o.xq.ptr<uint8_t>(), o.sx.f32(), o.wq.ptr<uint8_t>(), o.ws.f32(), o.y.data,
                                           int(M), int(N), int(K), int(K), int(K), int(N), kt, kt, 0, 0, 0}};
          cuda::fp8_grouped_gemm(p, dprob, s);
        });
        double t_90 = 0;
        if (sm90) {
          // one expert: rows [0, M); scales in the kernel's MN-major layouts
          const int h_off[2] = {0, int(M)};
          DSV3_CUDA_CHECK(cudaMemcpy(off90, h_off, sizeof(h_off), cudaMemcpyHostToDevice));
          const int64_t nt = fp8::tiles(N);
          Tensor sxg = be.alloc(DType::F32, {M * kt}, "sxg"), wst = be.alloc(DType::F32, {nt * kt}, "wst");
          cuda::sm90::regroup_act_scales(sxg.f32(), o.sx.f32(), off90, 1, M, kt, s);
          cuda::sm90::transpose_block_scales(wst.f32(), o.ws.f32(), 1, nt, kt, s);
          cuda::sm90::ExpertGemm g;
          g.A = o.xq.data, g.lda = K, g.W[0] = o.wq.data, g.w_stride = N * K, g.D[0] = o.y.data, g.ldd = N;
          g.offsets = off90, g.E = 1, g.N = int(N), g.K = int(K), g.sets = 1, g.sa = sxg.f32(), g.sw[0] = wst.f32();
          t_90 = cuda::time_ms(be, 3, 20, [&] { cuda::sm90::expert_gemm_fp8(g, ws90, ws90_bytes, s); });
        }
        const float one = 1.f, zero = 0.f;
        const double t_bf = cuda::time_ms(be, 3, 20, [&] {
          DSV3_CUBLAS_CHECK(cublasGemmEx(ctx.blas, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(M), int(K), &one, o.wb.data,
                                         CUDA_R_16BF, int(K), o.xb.data, CUDA_R_16BF, int(K), &zero, o.y.data, CUDA_R_16BF,
                                         int(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        });
        const double t_q = cuda::time_ms(be, 3, 20, [&] {
          cuda::quantize_1x128(o.xq.ptr<uint8_t>(), o.sxl.f32(), cuda::round_up4(M), o.xb.data, DType::BF16, K, M, K, s);
        });
        const double qbw = double(M * K * 3) / (t_q * 1e-3) / 1e9;
        const double best = std::min(std::min(t_lt, t_mma), t_90 > 0 ? t_90 : 1e30);
        const double tf90 = t_90 > 0 ? flops / (t_90 * 1e-3) / 1e12 : 0.0;
        std::printf("| %lld | %lldx%lld | %.0f TFLOP/s | %.0f | %.0f | %.0f | %.0f | %.2fx |\n", (long long)M, (long long)N,
                    (long long)K, flops / (t_lt * 1e-3) / 1e12, tf90, flops / (t_mma * 1e-3) / 1e12,
                    flops / (t_bf * 1e-3) / 1e12, qbw, t_bf / best);
        dense.push_back({{"M", M}, {"N", N}, {"K", K}, {"lt_TFLOPs", flops / (t_lt * 1e-3) / 1e12}, {"sm90_TFLOPs", tf90},
                         {"mma_TFLOPs", flops / (t_mma * 1e-3) / 1e12}, {"bf16_TFLOPs", flops / (t_bf * 1e-3) / 1e12},
                         {"quant_GBps", qbw}});
      }
    res["dense"] = dense;

    // ---- grouped: infer-m prefill experts
    {
      const int64_t T = 2048, topk = 6, E = 64, H = 2048, I = 1408, P = T * topk;
      Rng rng(5);
      std::vector<int> cnt(size_t(E), 0);
      for (int64_t t = 0; t < T; ++t) {
        std::vector<int> pick;
        while (int64_t(pick.size()) < topk) {
          const int e = int(rng.below(uint64_t(E)));
          if (std::find(pick.begin(), pick.end(), e) == pick.end()) pick.push_back(e);
        }
        for (int e : pick) ++cnt[size_t(e)];
      }
      Tensor x = be.alloc(DType::BF16, {P, H}, "x"), a = be.alloc(DType::BF16, {P, I}, "act");
      Tensor gw = be.alloc(DType::BF16, {E, I, H}, "gate"), uw = be.alloc(DType::BF16, {E, I, H}, "up");
      Tensor dw = be.alloc(DType::BF16, {E, H, I}, "down");
      for (Tensor* t : {&x, &a}) be.fill_normal(*t, 0.f, 1.f, 11);
      for (Tensor* t : {&gw, &uw, &dw}) be.fill_normal(*t, 0.f, 0.02f, 12);
      Tensor g = be.alloc(DType::BF16, {P, I}, "g"), u = be.alloc(DType::BF16, {P, I}, "u"), y = be.alloc(DType::BF16, {P, H}, "y");
      const int64_t kh = fp8::tiles(H), ki = fp8::tiles(I);
      Tensor xq = be.alloc(DType::U8, {P, H}, "xq"), sx = be.alloc(DType::F32, {P * kh}, "sx");
      Tensor aq = be.alloc(DType::U8, {P, I}, "aq"), sa = be.alloc(DType::F32, {P * ki}, "sa");
      cuda::quantize_1x128(xq.ptr<uint8_t>(), sx.f32(), 0, x.data, DType::BF16, H, P, H, s);
      cuda::quantize_1x128(aq.ptr<uint8_t>(), sa.f32(), 0, a.data, DType::BF16, I, P, I, s);
      auto [gq, gs] = cuda::quantize_weight_fp8(be, gw);
      auto [uq, us] = cuda::quantize_weight_fp8(be, uw);
      auto [dq, ds] = cuda::quantize_weight_fp8(be, dw);
      std::vector<cuda::Fp8Problem> gu, dn;
      int64_t o = 0;
      for (int64_t e = 0; e < E; ++e) {
        const int c = cnt[size_t(e)];
        if (!c) continue;
        gu.push_back({xq.ptr<uint8_t>() + o * H, sx.f32() + o * kh, gq.ptr<uint8_t>() + e * I * H, gs.f32() + e * ki * kh,
                      g.ptr<uint16_t>() + o * I, c, int(I), int(H), int(H), int(H), int(I), int(kh), int(kh), 0, 0, 0});
        gu.push_back({xq.ptr<uint8_t>() + o * H, sx.f32() + o * kh, uq.ptr<uint8_t>() + e * I * H, us.f32() + e * ki * kh,
                      u.ptr<uint16_t>() + o * I, c, int(I), int(H), int(H), int(H), int(I), int(kh), int(kh), 0, 0, 0});
        dn.push_back({aq.ptr<uint8_t>() + o * I, sa.f32() + o * ki, dq.ptr<uint8_t>() + e * H * I, ds.f32() + e * kh * ki,
                      y.ptr<uint16_t>() + o * H, c, int(H), int(I), int(I), int(I), int(H), int(ki), int(ki), 0, 0, 0});
        o += c;
      }
      const double flops_gu = 2.0 * 2 * double(P) * I * H, flops_dn = 2.0 * double(P) * H * I;
      double t_gu = 1e30, t_dn = 1e30;
      for (int tm : {64, 128}) {
        const double a_ = cuda::time_ms(be, 3, 20, [&] {
          auto p = gu;
          cuda::fp8_grouped_gemm(p, dprob, s, tm);
        });
        const double b_ = cuda::time_ms(be, 3, 20, [&] {
          auto p = dn;
          cuda::fp8_grouped_gemm(p, dprob + 512, s, tm);
        });
        std::printf("grouped fp8, %d-row tiles: gate+up %.3f ms (%.0f TFLOP/s), down %.3f ms (%.0f TFLOP/s)\n", tm, a_,
                    flops_gu / (a_ * 1e-3) / 1e12, b_, flops_dn / (b_ * 1e-3) / 1e12);
        t_gu = std::min(t_gu, a_), t_dn = std::min(t_dn, b_);
      }
      // bf16 peer: cuBLAS grouped GEMM over the same groups (what the bf16 prefill uses).
      std::vector<int> m, n, k, ld_a, ld_b, ld_c, gsz;
      std::vector<cublasOperation_t> ta, tb;
      std::vector<float> al, be_;
      std::vector<const void*> A, B;
      std::vector<void*> C;
      auto add = [&](int m_, int n_, int k_, const void* a_, const void* b_, void* c_) {
        m.push_back(m_), n.push_back(n_), k.push_back(k_), ld_a.push_back(k_), ld_b.push_back(k_), ld_c.push_back(m_);
        gsz.push_back(1), ta.push_back(CUBLAS_OP_T), tb.push_back(CUBLAS_OP_N), al.push_back(1.f), be_.push_back(0.f);
        A.push_back(a_), B.push_back(b_), C.push_back(c_);
      };
      o = 0;
      for (int64_t e = 0; e < E; ++e) {
        const int c = cnt[size_t(e)];
        if (!c) continue;
        add(int(I), c, int(H), gw.ptr<uint16_t>() + e * I * H, x.ptr<uint16_t>() + o * H, g.ptr<uint16_t>() + o * I);
        add(int(I), c, int(H), uw.ptr<uint16_t>() + e * I * H, x.ptr<uint16_t>() + o * H, u.ptr<uint16_t>() + o * I);
        o += c;
      }
      std::vector<const void*> ptrs(A.begin(), A.end());
      ptrs.insert(ptrs.end(), B.begin(), B.end());
      ptrs.insert(ptrs.end(), C.begin(), C.end());
      void** dptr = nullptr;
      DSV3_CUDA_CHECK(cudaMalloc(&dptr, ptrs.size() * sizeof(void*)));
      DSV3_CUDA_CHECK(cudaMemcpy(dptr, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice));
      const int ng = int(m.size());
      const double t_bf = cuda::time_ms(be, 3, 20, [&] {
        DSV3_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
            ctx.blas, ta.data(), tb.data(), m.data(), n.data(), k.data(), al.data(),
            reinterpret_cast<const void* const*>(dptr), CUDA_R_16BF, ld_a.data(),
            reinterpret_cast<const void* const*>(dptr + ng), CUDA_R_16BF, ld_b.data(), be_.data(), dptr + 2 * ng,
            CUDA_R_16BF, ld_c.data(), ng, gsz.data(), CUBLAS_COMPUTE_32F));
      });
      std::printf("grouped experts (infer-m prefill, %lld pairs over %d groups): fp8 gate+up %.0f TFLOP/s, down %.0f; "
                  "bf16 cuBLAS grouped gate+up %.0f TFLOP/s (fp8 %.2fx)\n",
                  (long long)P, ng / 2, flops_gu / (t_gu * 1e-3) / 1e12, flops_dn / (t_dn * 1e-3) / 1e12,
                  flops_gu / (t_bf * 1e-3) / 1e12, t_bf / t_gu);
      res["grouped"] = {{"fp8_gate_up_TFLOPs", flops_gu / (t_gu * 1e-3) / 1e12},
                        {"fp8_down_TFLOPs", flops_dn / (t_dn * 1e-3) / 1e12},
                        {"bf16_gate_up_TFLOPs", flops_gu / (t_bf * 1e-3) / 1e12}};
      cudaFree(dptr);
    }
    cudaFree(dprob);
    if (!out_path.empty()) std::ofstream(out_path) << res.dump(2) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
#else
int main() {
  std::printf("gpu_fp8_bench: built without CUDA\n");
  return 0;
}
#endif
