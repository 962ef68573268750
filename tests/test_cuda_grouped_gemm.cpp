// The grouped GEMM kernel (src/ops/cuda/grouped_gemm.cu) and its transposing conversion against a CPU
// reference in fp64 over the same bf16-rounded operands: problems of many shapes in one launch (edge tiles in M, N
// and K, M or N of 1, K of 8, accumulation with beta, leading dimensions larger than the rows), and the padded
// column map of the expert blocks. Tolerance: ||gpu - ref|| / ||ref|| <= 1e-5 (fp32 accumulation of exact bf16
// products; only the summation order differs). Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "core/rng.h"
#include "ops/backend.h"

#if DSV3_HAVE_CUDA
#include <cuda_runtime.h>

#include "ops/cuda/grouped_gemm.h"
#include "cuda_memory_helpers.h"

using namespace dsv3;
using cuda::bf16;

namespace {

using test::dev_copy;
using test::host_copy;
float bf16_round(float x) {
  const uint16_t b = f32_to_bf16(x);
  float y;
  convert_to_f32(DType::BF16, &b, &y, 1);
  return y;
}
std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = f32_to_bf16(v[i]);
  return r;
}

struct Case {
  int M, N, K, lda, ldb, ldc;
  float beta;
};

}  // namespace

TEST(CudaGroupedGemm, ManyShapesInOneLaunch) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const std::vector<Case> cases = {{1, 1, 8, 8, 8, 1, 0.f},        {130, 200, 40, 40, 48, 201, 0.f},
                                   {128, 128, 32, 32, 32, 128, 1.f}, {7, 300, 1000, 1000, 1008, 300, 1.f},
                                   {257, 64, 72, 80, 72, 64, 0.5f},  {1024, 512, 1024, 1024, 1024, 512, 0.f},
                                   {33, 1, 16, 16, 16, 1, 1.f}};
  Rng rng(11);
  std::vector<std::vector<float>> A, B, C0;
  std::vector<bf16*> dA, dB;
  std::vector<float*> dC;
  std::vector<cuda::GroupedProblem> probs;
  for (const Case& c : cases) {
    std::vector<float> a(size_t(c.M) * c.lda), b(size_t(c.N) * c.ldb), c0(size_t(c.M) * c.ldc);
    for (auto& x : a) x = bf16_round(float(rng.normal()));
    for (auto& x : b) x = bf16_round(float(rng.normal()));
    for (auto& x : c0) x = float(rng.normal());
    dA.push_back(reinterpret_cast<bf16*>(dev_copy(to_bf16(a))));
    dB.push_back(reinterpret_cast<bf16*>(dev_copy(to_bf16(b))));
    dC.push_back(dev_copy(c0));
    probs.push_back({dA.back(), dB.back(), dC.back(), c.M, c.N, c.K, c.lda, c.ldb, c.ldc, c.beta, 0});
    A.push_back(a), B.push_back(b), C0.push_back(c0);
  }
  cuda::GroupedProblem* dprobs = nullptr;
  ASSERT_EQ(cudaMalloc(&dprobs, probs.size() * sizeof(cuda::GroupedProblem)), cudaSuccess);
  cuda::grouped_gemm(probs, dprobs, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    std::vector<float> got = host_copy(dC[i], size_t(c.M) * c.ldc);
    double d = 0, s = 0;
    for (int m = 0; m < c.M; ++m)
      for (int n = 0; n < c.ldc; ++n) {
        double ref = C0[i][size_t(m) * c.ldc + n];  // columns past N stay untouched
        if (n < c.N) {
          double acc = 0;
          for (int k = 0; k < c.K; ++k) acc += double(A[i][size_t(m) * c.lda + k]) * B[i][size_t(n) * c.ldb + k];
          ref = acc + (c.beta != 0.f ? double(c.beta) * ref : 0.0);
        }
        const double g = got[size_t(m) * c.ldc + n];
        d += (g - ref) * (g - ref), s += ref * ref;
      }
    const double err = std::sqrt(d / std::max(s, 1e-30));
    std::printf("[ grouped  ] M %d N %d K %d beta %g: rel err %.2e\n", c.M, c.N, c.K, c.beta, err);
    EXPECT_LT(err, 1e-5) << "case " << i;
    cudaFree(dA[i]), cudaFree(dB[i]), cudaFree(dC[i]);
  }
  cudaFree(dprobs);
}

TEST(CudaGroupedGemm, TransposeWithColumnMap) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const int rows = 45, cols = 70, batch = 3;
  std::vector<int32_t> map = {3, 0, -1, 44, 7, 7, -1, -1, 12, 1};  // padding (-1) and repeats
  for (int i = 0; i < 30; ++i) map.push_back((i * 7) % rows);
  const int n_out = int(map.size());
  Rng rng(5);
  std::vector<float> in(size_t(batch) * rows * cols);
  for (auto& x : in) x = float(rng.normal());
  float* din = dev_copy(in);
  int32_t* dmap = dev_copy(map);
  bf16* dout = nullptr;
  ASSERT_EQ(cudaMalloc(&dout, size_t(batch) * cols * n_out * 2), cudaSuccess);
  cuda::transpose_to_bf16(dout, din, cols, dmap, n_out, cols, nullptr, batch, int64_t(rows) * cols,
                          int64_t(cols) * n_out);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint16_t> got = host_copy(reinterpret_cast<uint16_t*>(dout), size_t(batch) * cols * n_out);
  int bad = 0;
  for (int b = 0; b < batch; ++b)
    for (int c = 0; c < cols; ++c)
      for (int j = 0; j < n_out; ++j) {
        const float want = map[j] < 0 ? 0.f : in[(size_t(b) * rows + map[j]) * cols + c];
        bad += got[(size_t(b) * cols + c) * n_out + j] != f32_to_bf16(want);
      }
  EXPECT_EQ(bad, 0);
  cudaFree(din), cudaFree(dmap), cudaFree(dout);
}

#endif  // DSV3_HAVE_CUDA
