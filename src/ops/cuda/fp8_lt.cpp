// The library baseline for block-scaled FP8 products: cuBLASLt (CUDA 12.9+) with VEC128_32F scales on the
// activations (1x128 tiles) and BLK128x128_32F on the weights, the DeepSeek-V3 layout. Both operands are K-major
// ("TN" in cuBLAS' column-major terms: A = W [N, K] transposed, B = x [M, K]), the output bf16 or fp32.
// NOTE: cuBLASLt reads VEC128 scales token-contiguous ([tiles(K), round_up(M, 4)]) and BLK128x128 scales with
// their K blocks contiguous and padded to a multiple of 4 ([tiles(N), round_up(tiles(K), 4)]); fp8.h's
// quantize_1x128 and pad_scale_rows produce exactly these.
#include <map>
#include <mutex>
#include <tuple>

#include "ops/cuda/fp8.h"

namespace dsv3::cuda {

namespace {

#define LT_CHECK(x)                                                                          \
  do {                                                                                       \
    cublasStatus_t st_ = (x);                                                                \
    if (st_ != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt: {} failed with status {}", #x, int(st_)); \
  } while (0)

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;
};

using Key = std::tuple<cublasLtHandle_t, int64_t, int64_t, int64_t, int, size_t>;
std::mutex g_mu;
std::map<Key, Plan> g_plans;  // descriptors and the chosen algorithm per shape (heuristics cost ~10s of us)

Plan& plan_for(LtFp8& lt, int64_t M, int64_t N, int64_t K, DType yt, const float* sw, const float* sx) {
  std::lock_guard<std::mutex> g(g_mu);
  Key key{lt.handle, M, N, K, int(yt), lt.workspace_bytes};
  auto it = g_plans.find(key);
  if (it != g_plans.end()) return it->second;
  Plan p;
  LT_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const int32_t mode_a = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, mode_b = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode_a, sizeof(mode_a)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode_b, sizeof(mode_b)));
  // The heuristic sees this call's scale pointers (each call sets its own before running).
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw, sizeof(sw)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sx, sizeof(sx)));
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(N), int64_t(K)));
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(M), int64_t(K)));
  const cudaDataType_t dt = yt == DType::F32 ? CUDA_R_32F : CUDA_R_16BF;
  LT_CHECK(cublasLtMatrixLayoutCreate(&p.d, dt, uint64_t(N), uint64_t(M), int64_t(N)));
  cublasLtMatmulPreference_t pref;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &lt.workspace_bytes,
                                                sizeof(lt.workspace_bytes)));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt.handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  p.ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
  if (p.ok) p.algo = res.algo;
  return g_plans.emplace(key, p).first->second;
}

}  // namespace

bool fp8_lt_gemm(LtFp8& lt, void* y, DType yt, const uint8_t* xq, const float* sx, const uint8_t* wq, const float* sw,
                 int64_t M, int64_t N, int64_t K, cudaStream_t s) {
  if (M <= 0 || N <= 0) return true;
  DSV3_CHECK(lt.handle, "fp8_lt_gemm: no cuBLASLt handle");
  Plan& p = plan_for(lt, M, N, K, yt, sw, sx);
  if (!p.ok) return false;
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw, sizeof(sw)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sx, sizeof(sx)));
  const float one = 1.f, zero = 0.f;
  const cublasStatus_t st = cublasLtMatmul(lt.handle, p.desc, &one, wq, p.a, xq, p.b, &zero, y, p.d, y, p.d, &p.algo,
                                           lt.workspace, lt.workspace_bytes, s);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) return false;
  LT_CHECK(st);
  return true;
}

}  // namespace dsv3::cuda
