// The FP8 training products on the GPU (ops/cuda/fp8_train.h, dsv3 train --precision fp8 on cuda) against the CPU:
//  - the transposed quantizations (128x128 blocks of W^T, 128x1 tiles of segments of rows): codes and scales
//    bit-identical to core/fp8.h's, zero padding between segments;
//  - fp8_grouped_gemm with row-scaled B (the Wgrad form) against an fp64 reference of the same block-scaled
//    product: <= 1e-3 (e4m3 products are exact; the tensor cores' partial sums inside a 128-block keep fewer bits);
//  - Fp8TrainProducts' tensor-core path against its dequantize + fp32 cuBLAS path on the same codes: <= 1e-3;
//  - the CUDA training backend's fp8_linear_* and FP8 routed experts against the CPU emulation
//    (ops/cpu/fp8_linear.h) on identical inputs: <= 2e-3 for the linear layers (identical codes, another
//    summation order), <= 1e-2 for the experts (their hidden activations are recomputed on each device, so a
//    value on a rounding boundary may take the neighbouring e4m3 code).
// Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/fp8.h"
#include "core/rng.h"
#include "ops/backend.h"
#include "ops/cpu/fp8_linear.h"
#include "ops/cpu/train_ops.h"
#include "ops/train_backend.h"
#include "test_helpers.h"
#include "train_buf_helpers.h"

#if DSV3_HAVE_CUDA
#include <cuda_runtime.h>

#include "cuda_memory_helpers.h"
#include "ops/cuda/device.h"
#include "ops/cuda/fp8.h"
#include "ops/cuda/fp8_train.h"

using namespace dsv3;
using V = std::vector<float>;

namespace {

using test::dev_copy;
using test::host_copy;

V randn(size_t n, double scale, uint64_t seed) {
  Rng r(seed);
  V v(n);
  for (auto& x : v) x = float(r.normal() * scale);
  return v;
}
double rel(const V& got, const std::vector<double>& ref) {
  double n = 0, d = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    n += (got[i] - ref[i]) * (got[i] - ref[i]);
    d += ref[i] * ref[i];
  }
  return std::sqrt(n / std::max(d, 1e-300));
}
cudaStream_t stream() { return cuda::DeviceContext::get(0).stream; }
bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

}  // namespace

TEST(CudaFp8Train, TransposedWeightBlocksBitExact) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (auto [N, K] : {std::pair<int64_t, int64_t>{200, 300}, {256, 130}}) {  // byte stores, then 16-byte stores
    const int64_t B = 2, nt = fp8::tiles(N), kt = fp8::tiles(K);
    V w = randn(size_t(B * N * K), 0.02, 3 + N);
    for (int64_t n = 0; n < 128; ++n)
      for (int64_t k = 128; k < std::min<int64_t>(K, 256); ++k) w[size_t(n * K + k)] = 0.f;  // a zero block
    uint8_t* dq = dev_copy(std::vector<uint8_t>(size_t(B * N * K), 0xff));
    float* ds = dev_copy(V(size_t(B * nt * kt), -1.f));
    float* dw = dev_copy(w);
    cuda::quantize_128x128_t(dq, ds, dw, N, K, B, stream());
    ASSERT_EQ(cudaStreamSynchronize(stream()), cudaSuccess);
    const auto codes = host_copy(dq, size_t(B * N * K));
    const auto sc = host_copy(ds, size_t(B * nt * kt));
    int64_t bad = 0;
    for (int64_t b = 0; b < B; ++b) {
      std::vector<uint8_t> rc(size_t(N * K));
      V rs(size_t(nt * kt));
      fp8::quantize_128x128(rc.data(), rs.data(), w.data() + b * N * K, N, K);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) bad += codes[size_t(b * N * K + k * N + n)] != rc[size_t(n * K + k)];
      for (int64_t bn = 0; bn < nt; ++bn)
        for (int64_t bk = 0; bk < kt; ++bk) bad += !same_bits(sc[size_t(b * nt * kt + bk * nt + bn)], rs[size_t(bn * kt + bk)]);
    }
    EXPECT_EQ(bad, 0) << "N " << N << " K " << K;
    cudaFree(dq), cudaFree(ds), cudaFree(dw);
  }
}

// Segments of 5, 0, 300 and 16 rows of x [321, 70]: each quantized in 128x1 tiles from its first row.
TEST(CudaFp8Train, ColumnTilesOfSegmentsBitExact) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const std::vector<int64_t> off = {0, 5, 5, 305, 321};
  const int64_t M = off.back(), K = 70, ldx = 72;
  V x = randn(size_t(M * ldx), 2.0, 11);
  for (int64_t r = 5; r < 133; ++r) x[size_t(r * ldx + 3)] = 0.f;  // an all-zero column tile: scale 1
  for (int64_t r = 5; r < 133; ++r) x[size_t(r * ldx + 4)] = r % 3 ? 1e-45f : 0.f;  // denormal: scale 2^-126
  std::vector<cuda::ColTile> tiles;
  std::vector<int64_t> po{0}, ts{0};
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    const int64_t n = off[e + 1] - off[e];
    for (int64_t j = 0; j * 128 < n; ++j)
      tiles.push_back({int(off[e] + 128 * j), int(std::min<int64_t>(128, n - 128 * j)), int(po.back() + 128 * j),
                       int(ts.back() + j)});
    po.push_back(po.back() + (n + 15) / 16 * 16);
    ts.push_back(ts.back() + fp8::tiles(n));
  }
  const int64_t P = po.back(), T = ts.back();
  uint8_t* dq = dev_copy(std::vector<uint8_t>(size_t(K * P), 0xff));
  float* ds = dev_copy(V(size_t(K * T), -1.f));
  float* dx = dev_copy(x);
  auto* dt = dev_copy(tiles);
  cuda::quantize_128x1_t(dq, P, ds, T, dx, ldx, K, dt, int64_t(tiles.size()), stream());
  ASSERT_EQ(cudaStreamSynchronize(stream()), cudaSuccess);
  const auto codes = host_copy(dq, size_t(K * P));
  const auto sc = host_copy(ds, size_t(K * T));
  int64_t bad = 0;
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    V seg(size_t(n * K));
    for (int64_t i = 0; i < n; ++i) std::copy_n(x.data() + (off[e] + i) * ldx, K, seg.data() + i * K);
    std::vector<uint8_t> rc(size_t(n * K));
    V rs(size_t(fp8::tiles(n) * K));
    fp8::quantize_128x1(rc.data(), rs.data(), seg.data(), n, K);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < po[e + 1] - po[e]; ++i) {
        const uint8_t want = i < n ? rc[size_t(i * K + k)] : 0;  // zero padding up to 16 columns
        bad += codes[size_t(k * P + po[e] + i)] != want;
      }
      for (int64_t j = 0; j < fp8::tiles(n); ++j) bad += !same_bits(sc[size_t(k * T + ts[e] + j)], rs[size_t(j * K + k)]);
    }
  }
  EXPECT_EQ(bad, 0);
  cudaFree(dq), cudaFree(ds), cudaFree(dx), cudaFree(dt);
}

// C[M, N] (+)= sum_kb (A_kb B_kb^T) sa[m, kb] sb[n, kb] with per-row scales on both sides.
TEST(CudaFp8Train, GroupedGemmRowScaledB) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  struct Case {
    int M, N, K;
    bool acc;
  };
  const std::vector<Case> cases = {{1, 1, 16, false}, {130, 200, 384, true}, {64, 72, 272, false}, {257, 129, 1040, true}};
  std::vector<cuda::Fp8Problem> probs;
  std::vector<std::vector<double>> refs;
  std::vector<float*> outs;
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    const int kt = int(fp8::tiles(c.K));
    const V a = randn(size_t(c.M) * c.K, 1.0, 40 + i), b = randn(size_t(c.N) * c.K, 0.1, 50 + i);
    std::vector<uint8_t> ac(a.size()), bc(b.size());
    V as(size_t(c.M) * kt), bs(size_t(c.N) * kt);
    fp8::quantize_1x128(ac.data(), as.data(), a.data(), c.M, c.K, c.K);
    fp8::quantize_1x128(bc.data(), bs.data(), b.data(), c.N, c.K, c.K);
    const V y0 = randn(size_t(c.M) * c.N, 1.0, 60 + i);
    std::vector<double> ref(size_t(c.M) * c.N, 0.0);
    for (int m = 0; m < c.M; ++m)
      for (int n = 0; n < c.N; ++n) {
        double acc = c.acc ? y0[size_t(m) * c.N + n] : 0.0;
        for (int kb = 0; kb < kt; ++kb) {
          double part = 0;
          for (int k = kb * 128; k < std::min(c.K, kb * 128 + 128); ++k)
            part += double(fp8::e4m3_to_f32(ac[size_t(m) * c.K + k])) * double(fp8::e4m3_to_f32(bc[size_t(n) * c.K + k]));
          acc += part * as[size_t(m) * kt + kb] * bs[size_t(n) * kt + kb];
        }
        ref[size_t(m) * c.N + n] = acc;
      }
    float* dy = dev_copy(c.acc ? y0 : V(y0.size(), 0.f));
    cuda::Fp8Problem p{dev_copy(ac), dev_copy(as), dev_copy(bc), dev_copy(bs), dy, c.M, c.N, c.K, c.K, c.K, c.N, kt, kt,
                       1, c.acc, 0};
    p.b_rows = 1;
    probs.push_back(p);
    refs.push_back(ref);
    outs.push_back(dy);
  }
  cuda::Fp8Problem* dp = nullptr;
  ASSERT_EQ(cudaMalloc(&dp, probs.size() * sizeof(cuda::Fp8Problem)), cudaSuccess);
  for (int tile_m : {64, 128}) {
    std::vector<cuda::Fp8Problem> run = probs;
    if (tile_m == 128)  // the accumulating cases ran once already: restore their first output
      for (size_t i = 0; i < cases.size(); ++i)
        if (cases[i].acc) {
          const V y0 = randn(size_t(cases[i].M) * cases[i].N, 1.0, 60 + i);
          cudaMemcpy(outs[i], y0.data(), y0.size() * 4, cudaMemcpyHostToDevice);
        }
    cuda::fp8_grouped_gemm(run, dp, stream(), tile_m);
    ASSERT_EQ(cudaStreamSynchronize(stream()), cudaSuccess);
    for (size_t i = 0; i < cases.size(); ++i) {
      const Case& c = cases[i];
      const double e = rel(host_copy(outs[i], size_t(c.M) * c.N), refs[i]);
      std::printf("[ cuda fp8 train ] row-scaled B, tile %d, M %d N %d K %d%s: rel err %.2e\n", tile_m, c.M, c.N, c.K,
                  c.acc ? " +=" : "", e);
      EXPECT_LE(e, 1e-3) << "case " << i << " tile " << tile_m;
    }
  }
  cudaFree(dp);
}

// The tensor-core path of Fp8TrainProducts against its dequantized fp32 path, segments as the experts use them.
TEST(CudaFp8Train, KernelPathEqualsDequantizedPath) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto& ctx = cuda::DeviceContext::get(0);
  cuda::Fp8TrainProducts fast(ctx);
  setenv("DSV3_CUDA_FP8_TRAIN", "dequant", 1);
  cuda::Fp8TrainProducts slow(ctx);
  unsetenv("DSV3_CUDA_FP8_TRAIN");
  const std::vector<int64_t> off = {0, 130, 130, 131, 400};  // an empty and a one-row segment
  const int64_t E = 4, R = off.back(), K = 256, N = 192;
  const V A = randn(size_t(R * K), 1.0, 70), W = randn(size_t(E * N * K), 0.05, 71), dC = randn(size_t(R * N), 1.0, 72);
  const V dA0 = randn(A.size(), 1.0, 73), dW0 = randn(W.size(), 1.0, 74);
  V got[2][3];
  for (int m = 0; m < 2; ++m) {
    cuda::Fp8TrainProducts& p = m ? slow : fast;
    float *a = dev_copy(A), *w = dev_copy(W), *dc = dev_copy(dC), *c = dev_copy(V(size_t(R * N), 0.f)),
          *da = dev_copy(dA0), *dw = dev_copy(dW0);
    p.forward(off, a, K, N, {{c, w}});
    p.backward(off, da, true, dw, dc, a, w, K, N);
    ASSERT_EQ(cudaStreamSynchronize(ctx.stream), cudaSuccess);
    got[m][0] = host_copy(c, size_t(R * N)), got[m][1] = host_copy(da, A.size()), got[m][2] = host_copy(dw, W.size());
    cudaFree(a), cudaFree(w), cudaFree(dc), cudaFree(c), cudaFree(da), cudaFree(dw);
  }
  const char* names[3] = {"fprop", "dgrad +=", "wgrad +="};
  for (int j = 0; j < 3; ++j) {
    const double e = test::rel_err(got[0][j].data(), got[1][j].data(), int64_t(got[1][j].size()));
    std::printf("[ cuda fp8 train ] kernel vs dequantized %s: rel err %.2e\n", names[j], e);
    EXPECT_LE(e, 1e-3) << names[j];
  }
}

namespace {

using test::down;
using test::up;
void expect_close(const char* what, const V& got, const V& ref, double tol) {
  const double e = test::rel_err(got.data(), ref.data(), int64_t(ref.size()));
  std::printf("[ cuda fp8 train ] %-36s rel err %.2e (tol %.0e)\n", what, e, tol);
  EXPECT_LE(e, tol) << what;
}

}  // namespace

// fp8_linear_forward / backward on the CUDA training backend against the CPU emulation: kernel shapes, ones whose
// contractions are not multiples of 16 (the dequantized path) and ones whose Wgrad is split along the tokens.
TEST(CudaFp8Train, BackendLinearMatchesCpuEmulation) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto be = make_cuda_train_backend(0);
  be->set_precision(TrainBackend::Precision::FP8);
  struct Shape {
    int64_t M, N, K;
  };
  // 2048 and 1500 rows: the Wgrad is split along the tokens (4 and 2 chunks, the second uneven).
  for (const Shape s : {Shape{300, 192, 384}, Shape{37, 72, 40}, Shape{129, 40, 64}, Shape{2048, 192, 256},
                        Shape{1500, 128, 128}}) {
    const V x = randn(size_t(s.M * s.K), 1.0, 80), W = randn(size_t(s.N * s.K), 0.05, 81),
            dy = randn(size_t(s.M * s.N), 1.0, 82), dx0 = randn(size_t(s.M * s.K), 1.0, 83),
            dW0 = randn(size_t(s.N * s.K), 1.0, 84);
    V y(size_t(s.M * s.N)), dx = dx0, dW = dW0;
    cpu::fp8_linear_forward(y.data(), x.data(), W.data(), s.M, s.N, s.K);
    cpu::fp8_linear_backward(dx.data(), true, dW.data(), dy.data(), x.data(), W.data(), s.M, s.N, s.K);
    auto gx = up(*be, x), gW = up(*be, W), gdy = up(*be, dy), gy = up(*be, V(y.size(), 0.f)), gdx = up(*be, dx0),
         gdW = up(*be, dW0);
    be->qlinear_forward(gy.data(), gx.data(), gW.data(), s.M, s.N, s.K);
    be->qlinear_backward(gdx.data(), true, gdW.data(), gdy.data(), gx.data(), gW.data(), s.M, s.N, s.K);
    const std::string tag = " " + std::to_string(s.M) + "x" + std::to_string(s.N) + "x" + std::to_string(s.K);
    expect_close(("fprop" + tag).c_str(), down(*be, gy), y, 2e-3);
    expect_close(("dgrad +=" + tag).c_str(), down(*be, gdx), dx, 2e-3);
    expect_close(("wgrad +=" + tag).c_str(), down(*be, gdW), dW, 2e-3);
  }
}

// Routed experts under --precision fp8: CUDA against the CPU emulation (cpu::experts_* with fp8 = true).
TEST(CudaFp8Train, BackendExpertsMatchCpuEmulation) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  auto be = make_cuda_train_backend(0);
  be->set_precision(TrainBackend::Precision::FP8);
  const int64_t N = 150, E = 8, K = 2, H = 256, I = 192;
  RouteParams p;
  p.n_experts = E, p.top_k = K, p.n_group = 1, p.topk_group = 1, p.group_limited = false;
  V logits = randn(size_t(N * E), 1.0, 90), s(size_t(N * E)), w(size_t(N * K));
  for (int64_t t = 0; t < N; ++t) logits[size_t(t * E + 1)] = -30.f;  // expert 1 gets no token
  std::vector<int32_t> idx(size_t(N * K));
  cpu::route_forward(idx.data(), w.data(), s.data(), logits.data(), nullptr, N, p);
  const V x = randn(size_t(N * H), 1.0, 91), Wg = randn(size_t(E * I * H), 0.05, 92), Wu = randn(Wg.size(), 0.05, 93),
          Wd = randn(size_t(E * H * I), 0.05, 94), dout = randn(size_t(N * H), 1.0, 95);
  V out(size_t(N * H), 0.f), dx(size_t(N * H), 0.f), dw(size_t(N * K)), dWg(Wg.size(), 0.f), dWu(Wu.size(), 0.f),
      dWd(Wd.size(), 0.f);
  cpu::MoeSaved<float> cs;
  cpu::experts_forward(out.data(), cs, x.data(), idx.data(), w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E,
                       true);
  cpu::experts_backward(dx.data(), dw.data(), dWg.data(), dWu.data(), dWd.data(), dout.data(), cs, x.data(), idx.data(),
                        w.data(), Wg.data(), Wu.data(), Wd.data(), N, K, H, I, E, true);
  auto gx = up(*be, x), gWg = up(*be, Wg), gWu = up(*be, Wu), gWd = up(*be, Wd), gdo = up(*be, dout),
       go = up(*be, V(out.size(), 0.f)), gdx = up(*be, V(dx.size(), 0.f)), gdw = up(*be, V(dw.size(), 0.f)),
       gdWg = up(*be, V(Wg.size(), 0.f)), gdWu = up(*be, V(Wu.size(), 0.f)), gdWd = up(*be, V(Wd.size(), 0.f));
  auto gi = up(*be, idx);
  auto gw = up(*be, w);
  auto st = be->new_moe_state();
  be->experts_forward(go.data(), *st, gx.data(), gi.data(), gw.data(), gWg.data(), gWu.data(), gWd.data(), N, K, H, I, E);
  be->experts_backward(gdx.data(), gdw.data(), gdWg.data(), gdWu.data(), gdWd.data(), gdo.data(), *st, gx.data(),
                       gi.data(), gw.data(), gWg.data(), gWu.data(), gWd.data(), N, K, H, I, E);
  expect_close("experts out", down(*be, go), out, 1e-2);
  expect_close("experts dx", down(*be, gdx), dx, 1e-2);
  expect_close("experts dw", down(*be, gdw), dw, 1e-2);
  expect_close("experts dWg", down(*be, gdWg), dWg, 1e-2);
  expect_close("experts dWu", down(*be, gdWu), dWu, 1e-2);
  expect_close("experts dWd", down(*be, gdWd), dWd, 1e-2);
}

#endif  // DSV3_HAVE_CUDA
