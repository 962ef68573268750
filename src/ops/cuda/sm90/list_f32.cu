// List form of sm90/grouped.h (training's expert products): bf16 operands, fp32 C, 128 x 128 x 64 tiles (the
// fp32 epilogue's shared-memory staging leaves room for a deeper pipeline than 128 x 256 would). Two kernels:
// C = A B^T (C not read) and C += A B^T (C read through the epilogue's TMA load, then written in place).
#include <vector>

#include "ops/cuda/sm90/grouped_impl.cuh"

namespace dsv3::cuda::sm90 {

namespace {
using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;
using One = cute::Shape<cute::_1, cute::_1, cute::_1>;
using Assign = detail::Family<cutlass::bfloat16_t, void, float, Tile, One, false>;
using Accum = detail::Family<cutlass::bfloat16_t, float, float, Tile, One, false>;

// Host copy of the arrays, laid out as carve() lays them out in the workspace, then one upload.
template <class F>
void run_list(const std::vector<const GroupedProblem*>& ps, float beta, void* ws, size_t ws_bytes, cudaStream_t s) {
  const int g = int(ps.size());
  if (g == 0) return;
  const size_t bytes = F::arrays_bytes(g);
  DSV3_CHECK(ws_bytes >= bytes, "sm90 list GEMM: workspace of {} bytes, {} needed", ws_bytes, bytes);
  std::vector<char> host(bytes);
  auto h = F::carve(host.data(), g);
  for (int i = 0; i < g; ++i) {
    const GroupedProblem& p = *ps[size_t(i)];
    h.shapes[i] = detail::Shape3{p.M, p.N, p.K};
    h.A[i] = reinterpret_cast<const cutlass::bfloat16_t*>(p.A);
    h.B[i] = reinterpret_cast<const cutlass::bfloat16_t*>(p.B);
    h.C[i] = p.C;
    h.D[i] = p.C;
    typename F::StrideA sa{};
    typename F::StrideB sb{};
    typename F::StrideC sc{};
    typename F::StrideD sd{};
    cute::get<0>(sa) = p.lda;
    cute::get<0>(sb) = p.ldb;
    cute::get<0>(sc) = p.ldc;
    cute::get<0>(sd) = p.ldc;
    h.sA[i] = sa, h.sB[i] = sb, h.sC[i] = sc, h.sD[i] = sd;
  }
  // The pageable source is staged by the driver before cudaMemcpyAsync returns, so `host` may go out of scope.
  DSV3_CUDA_CHECK(cudaMemcpyAsync(ws, host.data(), bytes, cudaMemcpyHostToDevice, s));
  F::run(F::carve(ws, g), g, beta, ws_bytes, s);
}
}  // namespace

bool list_gemm_ok(const GroupedProblem& p) {
  return grouped_gemm_ok(p) && p.ldc % 4 == 0 && (reinterpret_cast<uintptr_t>(p.C) & 15) == 0 &&
         (p.beta == 0.f || p.beta == 1.f);
}

size_t list_workspace_bytes(int groups) {
  return std::max(Assign::workspace_bytes(groups), Accum::workspace_bytes(groups));
}

void list_gemm(const std::vector<GroupedProblem>& probs, void* ws, size_t ws_bytes, cudaStream_t s) {
  std::vector<const GroupedProblem*> assign, accum;
  for (const auto& p : probs) {
    if (p.M <= 0 || p.N <= 0) continue;
    DSV3_CHECK(list_gemm_ok(p), "sm90 list GEMM: unsupported problem M {} N {} K {} lda {} ldb {} ldc {} beta {}", p.M,
               p.N, p.K, p.lda, p.ldb, p.ldc, p.beta);
    (p.beta == 0.f ? assign : accum).push_back(&p);
  }
  // Stream order: the second launch's upload waits behind the first launch, which has read its arrays by then.
  run_list<Assign>(assign, 0.f, ws, ws_bytes, s);
  run_list<Accum>(accum, 1.f, ws, ws_bytes, s);
}

}  // namespace dsv3::cuda::sm90
