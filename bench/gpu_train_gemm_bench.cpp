// The dense products of a train-s training step on one GPU, each timed in isolation through the training backend's
// own gemm (fp32 operands and results, bf16 tensor cores with fp32 accumulation: what `dsv3 train --device cuda`
// runs) in its three modes (fp32 operands to cuBLAS, bf16 copies first, the default choosing per shape), next to
// cuBLAS on operands already in bf16 (what bf16 activations would cost) and TF32. A step's per-op profile times products in the context of a step; this bench says what each shape
// costs on its own, so a product that is slow only inside the step points at the step, not at cuBLAS.
//   forward  Y[M, N]  = X[M, K] W[N, K]^T        (NT)
//   dgrad    dX[M, K] = dY[M, N] W[N, K]         (NN)
//   wgrad    dW[N, K] += dY[M, N]^T X[M, K]      (TN, beta 1)
// M = 8 x 1024 tokens; N x K are train-s' linear layers. Usage: gpu_train_gemm_bench [--json OUT]
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "ops/backend.h"
#include "ops/train_backend.h"
#if DSV3_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#endif

using namespace dsv3;
using json = nlohmann::json;

#if DSV3_HAVE_CUDA
namespace {

#define CK(x)                                                                              \
  do {                                                                                     \
    if ((x) != 0) throw std::runtime_error(std::string(#x) + " failed at line " + std::to_string(__LINE__)); \
  } while (0)

// Mean time per call (ms) of `reps` back-to-back calls after `warm` calls: the products are enqueued without host
// waits, so the mean is the GPU's throughput time for the shape. The device-wide wait covers the backend's stream
// and the default stream the direct cuBLAS calls run on.
double mean_ms(int warm, int reps, const std::function<void()>& fn) {
  for (int i = 0; i < warm; ++i) fn();
  CK(cudaDeviceSynchronize());
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) fn();
  CK(cudaDeviceSynchronize());
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
}

// Row-major C[M, N] = op(A) op(B) (+ beta C) with cuBLAS (column-major: operands swap places, as the backend does).
void gemm_ex(cublasHandle_t h, bool ta, bool tb, int M, int N, int K, const void* A, int lda, const void* B, int ldb,
             cudaDataType_t ab, float beta, float* C, int ldc, cublasComputeType_t ct) {
  const float one = 1.f;
  CK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &one, B, ab, ldb, A, ab,
                  lda, &beta, C, CUDA_R_32F, ldc, ct, CUBLAS_GEMM_DEFAULT));
}

}  // namespace
#endif

int main(int argc, char** argv) {
  std::string out_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) out_path = argv[++i];
    else {
      std::fprintf(stderr, "usage: gpu_train_gemm_bench [--json OUT]\n");
      return 2;
    }
  }
#if DSV3_HAVE_CUDA
  if (!cuda_available()) {
    std::printf("gpu_train_gemm_bench: no CUDA device; skipped\n");
    return 0;
  }
  try {
    // Three backends (the mode is read when one is made): fp32 operands handed to cuBLAS, bf16 copies of the
    // operands first, and the default, which picks one of the two per shape.
    setenv("DSV3_CUDA_TRAIN_MATH", "fp32ops", 1);
    auto bep = make_cuda_train_backend(0);
    setenv("DSV3_CUDA_TRAIN_MATH", "bf16", 1);
    auto bep2 = make_cuda_train_backend(0);
    unsetenv("DSV3_CUDA_TRAIN_MATH");
    auto bep3 = make_cuda_train_backend(0);
    TrainBackend &be = *bep, &be2 = *bep2, &be3 = *bep3;
    cublasHandle_t h = nullptr;
    CK(cublasCreate(&h));
    const int M = 8192;
    struct Shape {
      const char* name;
      int N, K;
    };
    // train-s: H 1024, q_lora 384, kv_lora 256 (+ rope 32), 16 heads x (64 + 32) queries, 16 x (64 + 64) kv,
    // dense MLP 2816, one shared expert of 512, vocab 32768.
    const std::vector<Shape> shapes = {{"q_a_proj", 384, 1024},      {"q_b_proj", 1536, 384},
                                       {"kv_a_proj", 288, 1024},     {"kv_b_proj", 2048, 256},
                                       {"o_proj", 1024, 1024},       {"shared gate/up", 512, 1024},
                                       {"shared down", 1024, 512},   {"dense gate/up", 2816, 1024},
                                       {"dense down", 1024, 2816},   {"lm_head", 32768, 1024}};
    size_t most = 0;
    for (const Shape& s : shapes) most = std::max({most, size_t(M) * s.K, size_t(M) * s.N, size_t(s.N) * s.K});
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> host(most);
    for (float& v : host) v = nd(rng);
    float* X = static_cast<float*>(be.raw_alloc(most * 4));
    float* W = static_cast<float*>(be.raw_alloc(most * 4));
    float* Y = static_cast<float*>(be.raw_alloc(most * 4));
    for (float* p : {X, W, Y}) be.upload(p, host.data(), most * 4);
    std::vector<__nv_bfloat16> host_bf(most);
    for (size_t i = 0; i < most; ++i) host_bf[i] = __float2bfloat16(host[i]);
    __nv_bfloat16 *Xb = nullptr, *Wb = nullptr, *Yb = nullptr;
    for (auto** p : {&Xb, &Wb, &Yb}) {
      CK(cudaMalloc(p, most * 2));
      CK(cudaMemcpy(*p, host_bf.data(), most * 2, cudaMemcpyHostToDevice));
    }

    std::printf("| product | M x N x K | fp32 operands TFLOP/s | bf16 copies (with the conversion) | default (per shape) |"
                " bf16 operands alone | TF32 |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    json rows = json::array();
    double total_backend = 0, total_b2 = 0, total_b3 = 0, total_bf16 = 0;
    for (const Shape& s : shapes) {
      struct Product {
        const char* kind;
        bool ta, tb;
        int m, n, k, lda, ldb, ldc;
        float beta;
      };
      // (a, b) operands: forward (X, W), dgrad (dY, W), wgrad (dY^T, X) with dY stored in Y's buffer.
      const Product ps[3] = {{"forward", false, true, M, s.N, s.K, s.K, s.K, s.N, 0.f},
                             {"dgrad", false, false, M, s.K, s.N, s.N, s.K, s.K, 0.f},
                             {"wgrad", true, false, s.N, s.K, M, s.N, s.K, s.K, 1.f}};
      for (const Product& p : ps) {
        const float* A = p.ta ? Y : (p.tb ? X : Y);
        const float* B = p.ta ? X : W;
        const __nv_bfloat16* Ab = p.ta ? Yb : (p.tb ? Xb : Yb);
        const __nv_bfloat16* Bb = p.ta ? Xb : Wb;
        float* C = p.ta ? W : (p.tb ? Y : X);
        const double flops = 2.0 * p.m * p.n * p.k;
        const double t_be = mean_ms(3, 20, [&] {
          be.gemm(p.ta, p.tb, p.m, p.n, p.k, 1.f, A, p.lda, B, p.ldb, p.beta, C, p.ldc);
        });
        const double t_b2 = mean_ms(3, 20, [&] {
          be2.gemm(p.ta, p.tb, p.m, p.n, p.k, 1.f, A, p.lda, B, p.ldb, p.beta, C, p.ldc);
        });
        const double t_b3 = mean_ms(3, 20, [&] {
          be3.gemm(p.ta, p.tb, p.m, p.n, p.k, 1.f, A, p.lda, B, p.ldb, p.beta, C, p.ldc);
        });
        const double t_bf = mean_ms(3, 20, [&] {
          gemm_ex(h, p.ta, p.tb, p.m, p.n, p.k, Ab, p.lda, Bb, p.ldb, CUDA_R_16BF, p.beta, C, p.ldc,
                  CUBLAS_COMPUTE_32F);
        });
        const double t_tf = mean_ms(3, 20, [&] {
          gemm_ex(h, p.ta, p.tb, p.m, p.n, p.k, A, p.lda, B, p.ldb, CUDA_R_32F, p.beta, C, p.ldc,
                  CUBLAS_COMPUTE_32F_FAST_TF32);
        });
        auto tf = [&](double ms) { return flops / (ms * 1e-3) / 1e12; };
        std::printf("| %s %s | %dx%dx%d | %.0f (%.3f ms) | %.0f (%.3f ms) | %.0f (%.3f ms) | %.0f | %.0f |\n", s.name,
                    p.kind, p.m, p.n, p.k, tf(t_be), t_be, tf(t_b2), t_b2, tf(t_b3), t_b3, tf(t_bf), tf(t_tf));
        total_backend += t_be, total_b2 += t_b2, total_b3 += t_b3, total_bf16 += t_bf;
        rows.push_back({{"product", std::string(s.name) + " " + p.kind}, {"M", p.m}, {"N", p.n}, {"K", p.k},
                        {"fp32_operands_ms", t_be}, {"bf16_copies_ms", t_b2}, {"default_ms", t_b3}, {"bf16_ms", t_bf}, {"tf32_ms", t_tf}});
      }
    }
    std::printf("sum of one of each: fp32 operands %.3f ms, bf16 copies %.3f ms, default %.3f ms, bf16 operands alone "
                "%.3f ms\n", total_backend, total_b2, total_b3, total_bf16);
    if (!out_path.empty()) std::ofstream(out_path) << json{{"train_gemm", rows}}.dump(2) << "\n";
    for (auto* p : {Xb, Wb, Yb}) cudaFree(p);
    for (float* p : {X, W, Y}) be.raw_free(p);
    cublasDestroy(h);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_train_gemm_bench: %s\n", e.what());
    return 1;
  }
#else
  std::printf("gpu_train_gemm_bench: built without CUDA; skipped\n");
#endif
  return 0;
}
