// The sm90 wgmma/TMA grouped GEMMs (src/ops/cuda/sm90/grouped.h) against fp64 references on the host, over the
// same rounded operands:
//   expert form, bf16   uneven routings (empty experts, one expert taking every row, rows not a multiple of
//                       the tile, N and K not multiples of the tile), gate and up as two weight sets in one launch;
//                       bf16 output, so the tolerance is bf16's rounding: ||d - ref|| / ||ref|| <= 5e-3.
//   expert form, fp8    codes and scales from core/fp8.h's CPU quantizers (the emulation every FP8 kernel is held
//                       to); the reference is the fp64 product of the dequantized operands; bf16 output, 5e-3.
//   list form           training's problems (fp32 C, beta 0 and 1, leading dimensions past the rows): 1e-5.
//   scale layouts       regroup_act_scales and transpose_block_scales, exactly.
// Skips without a GPU or when the build has no CUTLASS (sm90::available() false).
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "core/dtype.h"
#include "core/fp8.h"
#include "core/rng.h"
#include "ops/backend.h"

#if DSV3_HAVE_CUDA
#include <cuda_runtime.h>

#include "cuda_memory_helpers.h"
#include "ops/cuda/sm90/grouped.h"

using namespace dsv3;
using test::dev_copy;
using test::host_copy;

namespace {

float bf16_value(uint16_t b) {
  float y;
  convert_to_f32(DType::BF16, &b, &y, 1);
  return y;
}
std::vector<uint16_t> random_bf16(size_t n, Rng& rng, float sd) {
  std::vector<uint16_t> r(n);
  for (auto& x : r) x = f32_to_bf16(float(rng.normal()) * sd);
  return r;
}
std::vector<int> offsets_of(const std::vector<int>& counts) {
  std::vector<int> off(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), off.begin() + 1);
  return off;
}
double rel_err(const std::vector<double>& ref, const std::vector<float>& got) {
  double d = 0, s = 0;
  for (size_t i = 0; i < ref.size(); ++i) d += (got[i] - ref[i]) * (got[i] - ref[i]), s += ref[i] * ref[i];
  return std::sqrt(d / std::max(s, 1e-30));
}
std::vector<float> bf16_to_f32(const std::vector<uint16_t>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = bf16_value(v[i]);
  return r;
}
// ref[r, n] = sum_k a[r, k] w[e(r)][n, k] for rows of expert e, in fp64.
std::vector<double> expert_ref(const std::vector<float>& a, const std::vector<float>& w, const std::vector<int>& off,
                               int N, int K) {
  const int E = int(off.size()) - 1, P = off.back();
  std::vector<double> ref(size_t(P) * N);
  for (int e = 0; e < E; ++e)
    for (int r = off[e]; r < off[e + 1]; ++r)
      for (int n = 0; n < N; ++n) {
        double acc = 0;
        for (int k = 0; k < K; ++k) acc += double(a[size_t(r) * K + k]) * w[(size_t(e) * N + n) * K + k];
        ref[size_t(r) * N + n] = acc;
      }
  return ref;
}

const std::vector<std::vector<int>> kRoutings = {
    {0, 1, 300, 0, 17, 128, 129, 0},  // empty experts, 1 row, edge tiles
    {0, 0, 0, 517, 0, 0, 0, 0},       // one expert takes every row
    {64, 64, 64, 64, 64, 64, 64, 64}, // balanced
};

}  // namespace

TEST(CudaSm90Grouped, ExpertFormBf16UnevenRoutings) {
  if (!cuda_available() || !cuda::sm90::available()) GTEST_SKIP() << "no sm90 device or no CUTLASS in this build";
  const int E = 8, N = 200, K = 264;  // N, K not multiples of the 128 x 256 x 64 tile
  Rng rng(21);
  for (const auto& counts : kRoutings) {
    const std::vector<int> off = offsets_of(counts);
    const int P = off.back();
    auto a = random_bf16(size_t(P) * K, rng, 1.f);
    auto w0 = random_bf16(size_t(E) * N * K, rng, 0.05f), w1 = random_bf16(size_t(E) * N * K, rng, 0.05f);
    uint16_t *da = dev_copy(a), *dw0 = dev_copy(w0), *dw1 = dev_copy(w1);
    int* doff = dev_copy(off);
    std::vector<uint16_t> sentinel(size_t(P) * N, 0x7fc0);  // NaN: every row must be written
    uint16_t *dd0 = dev_copy(sentinel), *dd1 = dev_copy(sentinel);
    cuda::sm90::ExpertGemm g;
    g.A = da, g.lda = K, g.W[0] = dw0, g.W[1] = dw1, g.w_stride = int64_t(N) * K, g.D[0] = dd0, g.D[1] = dd1;
    g.ldd = N, g.offsets = doff, g.E = E, g.N = N, g.K = K, g.sets = 2;
    const size_t wsb = cuda::sm90::expert_workspace_bytes(2 * E, false);
    void* ws = nullptr;
    ASSERT_EQ(cudaMalloc(&ws, wsb), cudaSuccess);
    cuda::sm90::expert_gemm_bf16(g, ws, wsb, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto af = bf16_to_f32(a);
    const double e0 = rel_err(expert_ref(af, bf16_to_f32(w0), off, N, K), bf16_to_f32(host_copy(dd0, size_t(P) * N)));
    const double e1 = rel_err(expert_ref(af, bf16_to_f32(w1), off, N, K), bf16_to_f32(host_copy(dd1, size_t(P) * N)));
    std::printf("[ sm90 bf16 ] %d rows over %d experts: rel err %.2e / %.2e\n", P, E, e0, e1);
    EXPECT_LT(e0, 5e-3);
    EXPECT_LT(e1, 5e-3);
    for (void* p : {(void*)da, (void*)dw0, (void*)dw1, (void*)doff, (void*)dd0, (void*)dd1, ws}) cudaFree(p);
  }
}

TEST(CudaSm90Grouped, ExpertFormFp8AgainstCpuEmulation) {
  if (!cuda_available() || !cuda::sm90::available()) GTEST_SKIP() << "no sm90 device or no CUTLASS in this build";
  const int E = 8, N = 272, K = 400;  // partial 128-blocks in N and K
  const int64_t kt = fp8::tiles(K), nt = fp8::tiles(N);
  Rng rng(22);
  for (const auto& counts : kRoutings) {
    const std::vector<int> off = offsets_of(counts);
    const int P = off.back();
    std::vector<float> a(size_t(P) * K), w(size_t(E) * N * K);
    for (auto& x : a) x = float(rng.normal()) * (1.f + float(rng.below(4)));  // rows of different ranges
    for (auto& x : w) x = float(rng.normal()) * 0.05f;
    std::vector<uint8_t> aq(a.size()), wq(w.size());
    std::vector<float> sa(size_t(P) * kt), sw(size_t(E) * nt * kt);
    fp8::quantize_1x128(aq.data(), sa.data(), a.data(), P, K, K);
    for (int e = 0; e < E; ++e)
      fp8::quantize_128x128(wq.data() + size_t(e) * N * K, sw.data() + size_t(e) * nt * kt, w.data() + size_t(e) * N * K,
                            N, K);
    std::vector<float> ad(a.size()), wd(w.size());
    fp8::dequantize_1x128(ad.data(), aq.data(), sa.data(), P, K);
    for (int e = 0; e < E; ++e)
      fp8::dequantize_128x128(wd.data() + size_t(e) * N * K, wq.data() + size_t(e) * N * K, sw.data() + size_t(e) * nt * kt,
                              N, K);
    uint8_t *daq = dev_copy(aq), *dwq = dev_copy(wq);
    float *dsa = dev_copy(sa), *dsw = dev_copy(sw);
    int* doff = dev_copy(off);
    float *dsag = nullptr, *dswt = nullptr;
    ASSERT_EQ(cudaMalloc(&dsag, std::max<size_t>(sa.size(), 1) * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dswt, sw.size() * 4), cudaSuccess);
    cuda::sm90::regroup_act_scales(dsag, dsa, doff, E, P, kt, nullptr);
    cuda::sm90::transpose_block_scales(dswt, dsw, E, nt, kt, nullptr);
    std::vector<uint16_t> sentinel(size_t(P) * N, 0x7fc0);
    uint16_t* dd = dev_copy(sentinel);
    cuda::sm90::ExpertGemm g;
    g.A = daq, g.lda = K, g.W[0] = dwq, g.w_stride = int64_t(N) * K, g.D[0] = dd, g.ldd = N, g.offsets = doff;
    g.E = E, g.N = N, g.K = K, g.sets = 1, g.sa = dsag, g.sw[0] = dswt;
    const size_t wsb = cuda::sm90::expert_workspace_bytes(E, true);
    void* ws = nullptr;
    ASSERT_EQ(cudaMalloc(&ws, wsb), cudaSuccess);
    cuda::sm90::expert_gemm_fp8(g, ws, wsb, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const double err = rel_err(expert_ref(ad, wd, off, N, K), bf16_to_f32(host_copy(dd, size_t(P) * N)));
    std::printf("[ sm90 fp8  ] %d rows over %d experts: rel err %.2e\n", P, E, err);
    EXPECT_LT(err, 5e-3);
    // The regrouped scales, exactly: expert e's [kt][n_e] block at off[e] * kt.
    const auto sag = host_copy(dsag, sa.size());
    int bad = 0;
    for (int e = 0; e < E; ++e)
      for (int r = off[e]; r < off[e + 1]; ++r)
        for (int64_t t = 0; t < kt; ++t)
          bad += sag[size_t(off[e]) * kt + t * (off[e + 1] - off[e]) + (r - off[e])] != sa[size_t(r) * kt + t];
    const auto swt = host_copy(dswt, sw.size());
    for (int e = 0; e < E; ++e)
      for (int64_t n = 0; n < nt; ++n)
        for (int64_t t = 0; t < kt; ++t) bad += swt[(e * kt + t) * nt + n] != sw[(e * nt + n) * kt + t];
    EXPECT_EQ(bad, 0);
    for (void* p : {(void*)daq, (void*)dwq, (void*)dsa, (void*)dsw, (void*)doff, (void*)dsag, (void*)dswt, (void*)dd, ws})
      cudaFree(p);
  }
}

TEST(CudaSm90Grouped, ListFormFp32WithAccumulation) {
  if (!cuda_available() || !cuda::sm90::available()) GTEST_SKIP() << "no sm90 device or no CUDA in this build";
  struct Case {
    int M, N, K, lda, ldb, ldc;
    float beta;
  };
  const std::vector<Case> cases = {{1, 4, 8, 8, 8, 4, 0.f},         {130, 200, 40, 40, 48, 204, 0.f},
                                   {128, 128, 32, 32, 32, 128, 1.f}, {7, 300, 1000, 1000, 1008, 300, 1.f},
                                   {257, 64, 72, 80, 72, 64, 1.f},   {1024, 512, 1024, 1024, 1024, 512, 0.f}};
  Rng rng(23);
  std::vector<std::vector<float>> A, B, C0;
  std::vector<void*> owned;
  std::vector<float*> dC;
  std::vector<cuda::GroupedProblem> probs;
  for (const Case& c : cases) {
    auto a = random_bf16(size_t(c.M) * c.lda, rng, 1.f), b = random_bf16(size_t(c.N) * c.ldb, rng, 1.f);
    std::vector<float> c0(size_t(c.M) * c.ldc);
    for (auto& x : c0) x = float(rng.normal());
    auto* da = reinterpret_cast<cuda::bf16*>(dev_copy(a));
    auto* db = reinterpret_cast<cuda::bf16*>(dev_copy(b));
    dC.push_back(dev_copy(c0));
    owned.push_back(da), owned.push_back(db), owned.push_back(dC.back());
    probs.push_back({da, db, dC.back(), c.M, c.N, c.K, c.lda, c.ldb, c.ldc, c.beta, 0});
    ASSERT_TRUE(cuda::sm90::list_gemm_ok(probs.back()));
    A.push_back(bf16_to_f32(a)), B.push_back(bf16_to_f32(b)), C0.push_back(c0);
  }
  const size_t wsb = cuda::sm90::list_workspace_bytes(int(probs.size()));
  void* ws = nullptr;
  ASSERT_EQ(cudaMalloc(&ws, wsb), cudaSuccess);
  cuda::sm90::list_gemm(probs, ws, wsb, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    const std::vector<float> got = host_copy(dC[i], size_t(c.M) * c.ldc);
    std::vector<double> ref(got.size());
    for (int m = 0; m < c.M; ++m)
      for (int n = 0; n < c.ldc; ++n) {
        double r = C0[i][size_t(m) * c.ldc + n];  // columns past N stay untouched
        if (n < c.N) {
          double acc = 0;
          for (int k = 0; k < c.K; ++k) acc += double(A[i][size_t(m) * c.lda + k]) * B[i][size_t(n) * c.ldb + k];
          r = acc + (c.beta != 0.f ? r : 0.0);
        }
        ref[size_t(m) * c.ldc + n] = r;
      }
    const double err = rel_err(ref, got);
    std::printf("[ sm90 list ] M %d N %d K %d beta %g: rel err %.2e\n", c.M, c.N, c.K, c.beta, err);
    EXPECT_LT(err, 1e-5) << "case " << i;
  }
  for (void* p : owned) cudaFree(p);
  cudaFree(ws);
}

TEST(CudaSm90Grouped, BadArgumentsAreRefused) {
  if (!cuda_available() || !cuda::sm90::available()) GTEST_SKIP() << "no sm90 device or no CUTLASS in this build";
  cuda::sm90::ExpertGemm g;
  g.E = 4, g.N = 64, g.K = 60, g.lda = 60, g.ldd = 64;  // K not a multiple of 8
  EXPECT_THROW(cuda::sm90::expert_gemm_bf16(g, nullptr, 0, nullptr), std::exception);
  cuda::GroupedProblem p{nullptr, nullptr, nullptr, 4, 4, 8, 8, 8, 3, 1.f, 0};  // ldc not a multiple of 4
  EXPECT_FALSE(cuda::sm90::list_gemm_ok(p));
}

#endif  // DSV3_HAVE_CUDA
