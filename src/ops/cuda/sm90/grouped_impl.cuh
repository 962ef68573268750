#pragma once
// The CUTLASS side of sm90/grouped.h: one template per kernel family, instantiated by the .cu files next to
// this header (one instantiation each, so they compile in parallel). Each launch describes its groups in a
// device workspace: problem shapes (M, N, K), operand pointers and strides, per group; the expert form fills
// them from the expert offsets in a small kernel (no host round trip), the list form uploads them.
#include <cuda_runtime.h>

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/sm90/grouped.h"

namespace dsv3::cuda::sm90::detail {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using Shape3 = ProblemShape::UnderlyingProblemShape;
using RowMajor = cutlass::layout::RowMajor;     // A [M, K] and D [M, N]
using ColMajor = cutlass::layout::ColumnMajor;  // B as CUTLASS's K x N view of our row-major [N, K]

int sm_count();  // of the current device (cached)
// Workspace sizes, defined next to each instantiation.
size_t expert_workspace_bytes_bf16(int groups);
size_t expert_workspace_bytes_fp8(int groups);

// D = A B^T (+ C when ElementC is not void), fp32 accumulation. Tile and cluster shapes in CUTLASS's (M, N, K).
// Cooperative: both consumer warp groups share one tile (split along M); Pingpong: each consumer warp group
// owns a tile and the two alternate mainloop and epilogue, so one group's stores hide under the other's MMAs.
// SwapAB (expert form only): CUTLASS computes D^T = W A^T, the expert's output features along the tile's M and
// its rows along N, D^T stored column-major (= D row-major); an expert with 192 rows then fills one 192-wide N
// tile instead of one and a half 128-row M tiles.
template <class ElementAB, class ElementC, class ElementD, class Tile, class Cluster, bool Fp8Blockwise,
          bool Pingpong = false, bool SwapAB = false>
struct Family {
  static constexpr bool kFp8 = Fp8Blockwise;
  static constexpr bool kSwap = SwapAB;
  using LayoutD = std::conditional_t<SwapAB, ColMajor, RowMajor>;
  static constexpr int kAlignAB = 16 / int(sizeof(ElementAB));
  static constexpr int kAlignD = 16 / int(sizeof(ElementD));
  using NonVoidC = std::conditional_t<std::is_void_v<ElementC>, ElementD, ElementC>;
  static constexpr int kAlignC = 16 / int(sizeof(NonVoidC));
  // 1x128 activations, 128x128 weights (on the B side when swapped), both scale arrays MN-major.
  using ScaleConfig = std::conditional_t<SwapAB, cutlass::detail::Sm90BlockwiseScaleConfig<128, 1, 128>,
                                         cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128>>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  using KernelSchedule = std::conditional_t<
      Pingpong,
      std::conditional_t<Fp8Blockwise, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>,
      std::conditional_t<Fp8Blockwise, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>>;
  using EpilogueSchedule = std::conditional_t<Pingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, cutlass::epilogue::collective::EpilogueTileAuto,
      float, float, ElementC, LayoutD*, kAlignC, ElementD, LayoutD*, kAlignD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, ElementC, float>>::CollectiveOp;
  using StrideArgA = std::conditional_t<Fp8Blockwise, cute::tuple<RowMajor*, LayoutSFA*>, RowMajor*>;
  using StrideArgB = std::conditional_t<Fp8Blockwise, cute::tuple<ColMajor*, LayoutSFB*>, ColMajor*>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, StrideArgA, kAlignAB, ElementAB, StrideArgB,
      kAlignAB, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<int(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;
  using CPtr = std::conditional_t<std::is_void_v<ElementC>, const void*, const ElementC*>;

  // The per-group arrays, carved from the workspace (256-byte aligned each), then CUTLASS's own workspace.
  struct Arrays {
    Shape3* shapes;
    const ElementAB** A;
    const ElementAB** B;
    CPtr* C;
    ElementD** D;
    StrideA* sA;
    StrideB* sB;
    StrideC* sC;
    StrideD* sD;
    const float** sfa;
    const float** sfb;
    LayoutSFA* lsfa;
    LayoutSFB* lsfb;
    void* cutlass_ws;
  };
  static size_t round(size_t n) { return (n + 255) / 256 * 256; }
  static size_t arrays_bytes(int g) {
    const size_t n = size_t(g);
    size_t b = round(n * sizeof(Shape3)) + 4 * round(n * sizeof(void*)) + round(n * sizeof(StrideA)) +
               round(n * sizeof(StrideB)) + round(n * sizeof(StrideC)) + round(n * sizeof(StrideD));
    if (Fp8Blockwise) b += 2 * round(n * sizeof(void*)) + round(n * sizeof(LayoutSFA)) + round(n * sizeof(LayoutSFB));
    return b;
  }
  static Arrays carve(void* ws, int g) {
    char* p = static_cast<char*>(ws);
    auto take = [&](size_t bytes) {
      void* q = p;
      p += round(bytes);
      return q;
    };
    const size_t n = size_t(g);
    Arrays a{};
    a.shapes = static_cast<Shape3*>(take(n * sizeof(Shape3)));
    a.A = static_cast<const ElementAB**>(take(n * sizeof(void*)));
    a.B = static_cast<const ElementAB**>(take(n * sizeof(void*)));
    a.C = static_cast<CPtr*>(take(n * sizeof(void*)));
    a.D = static_cast<ElementD**>(take(n * sizeof(void*)));
    a.sA = static_cast<StrideA*>(take(n * sizeof(StrideA)));
    a.sB = static_cast<StrideB*>(take(n * sizeof(StrideB)));
    a.sC = static_cast<StrideC*>(take(n * sizeof(StrideC)));
    a.sD = static_cast<StrideD*>(take(n * sizeof(StrideD)));
    if (Fp8Blockwise) {
      a.sfa = static_cast<const float**>(take(n * sizeof(void*)));
      a.sfb = static_cast<const float**>(take(n * sizeof(void*)));
      a.lsfa = static_cast<LayoutSFA*>(take(n * sizeof(LayoutSFA)));
      a.lsfb = static_cast<LayoutSFB*>(take(n * sizeof(LayoutSFB)));
    }
    a.cutlass_ws = p;
    return a;
  }

  static typename Gemm::Arguments arguments(const Arrays& a, int groups, float beta) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    cudaGetDevice(&hw.device_id);
    hw.sm_count = sm_count();
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {groups, a.shapes, nullptr};  // shapes live on the device only
    if constexpr (Fp8Blockwise)
      args.mainloop = {a.A, a.sA, a.B, a.sB, a.sfa, a.lsfa, a.sfb, a.lsfb};
    else
      args.mainloop = {a.A, a.sA, a.B, a.sB};
    auto& f = args.epilogue.thread;
    f.alpha = 1.f;
    f.beta = beta;
    args.epilogue.ptr_C = std::is_void_v<ElementC> ? nullptr : reinterpret_cast<decltype(args.epilogue.ptr_C)>(a.C);
    args.epilogue.dC = a.sC;
    args.epilogue.ptr_D = a.D;
    args.epilogue.dD = a.sD;
    args.hw_info = hw;
    return args;
  }

  static size_t workspace_bytes(int groups) {
    Arrays a{};
    return arrays_bytes(groups) + round(Gemm::get_workspace_size(arguments(a, groups, 0.f)));
  }

  static void run(const Arrays& a, int groups, float beta, size_t ws_bytes, cudaStream_t s) {
    auto args = arguments(a, groups, beta);
    const size_t need = arrays_bytes(groups) + round(Gemm::get_workspace_size(args));
    DSV3_CHECK(ws_bytes >= need, "sm90 grouped GEMM: workspace of {} bytes, {} needed", ws_bytes, need);
    Gemm gemm;
    DSV3_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, "sm90 grouped GEMM: problem not supported");
    DSV3_CHECK(gemm.initialize(args, a.cutlass_ws, s) == cutlass::Status::kSuccess, "sm90 grouped GEMM: initialize");
    DSV3_CHECK(gemm.run(s) == cutlass::Status::kSuccess, "sm90 grouped GEMM: launch failed");
    DSV3_CUDA_CHECK(cudaGetLastError());
  }
};

// Expert form: group i = set * E + e; empty experts are groups with M = 0 (the scheduler gives them no tiles).
template <class F>
__global__ void fill_expert_groups(typename F::Arrays a, ExpertGemm g) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= g.E * g.sets) return;
  using EAB = std::remove_cv_t<std::remove_pointer_t<std::remove_pointer_t<decltype(a.A)>>>;
  using ED = std::remove_pointer_t<std::remove_pointer_t<decltype(a.D)>>;
  const int set = i / g.E, e = i % g.E;
  const int o = g.offsets[e], n = g.offsets[e + 1] - o;
  const EAB* rows = static_cast<const EAB*>(g.A) + int64_t(o) * g.lda;
  const EAB* w = static_cast<const EAB*>(g.W[set]) + int64_t(e) * g.w_stride;
  a.D[i] = static_cast<ED*>(g.D[set]) + int64_t(o) * g.ldd;
  a.C[i] = nullptr;
  typename F::StrideA sa{};
  typename F::StrideB sb{};
  typename F::StrideC sc{};
  typename F::StrideD sd{};
  // W rows are packed: row n of expert e starts n * K after the expert's base.
  const int M = F::kSwap ? g.N : n, N = F::kSwap ? n : g.N;
  a.shapes[i] = Shape3{M, N, g.K};
  a.A[i] = F::kSwap ? w : rows;
  a.B[i] = F::kSwap ? rows : w;
  cute::get<0>(sa) = F::kSwap ? g.K : g.lda;
  cute::get<0>(sb) = F::kSwap ? g.lda : g.K;
  if constexpr (F::kSwap) {
    cute::get<1>(sc) = g.ldd;  // column-major D^T: column r (a row of D) starts r * ldd
    cute::get<1>(sd) = g.ldd;
  } else {
    cute::get<0>(sc) = g.ldd;
    cute::get<0>(sd) = g.ldd;
  }
  a.sA[i] = sa, a.sB[i] = sb, a.sC[i] = sc, a.sD[i] = sd;
  if constexpr (F::kFp8) {
    const int kt = (g.K + 127) / 128, nt = (g.N + 127) / 128;
    const float* s_rows = g.sa + int64_t(o) * kt;
    const float* s_w = g.sw[set] + int64_t(e) * kt * nt;
    a.sfa[i] = F::kSwap ? s_w : s_rows;
    a.sfb[i] = F::kSwap ? s_rows : s_w;
    a.lsfa[i] = F::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(M, N, g.K, 1));
    a.lsfb[i] = F::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(M, N, g.K, 1));
  }
}

template <class F>
void run_expert(const ExpertGemm& g, void* ws, size_t ws_bytes, cudaStream_t s) {
  const int groups = g.E * g.sets;
  auto a = F::carve(ws, groups);
  fill_expert_groups<F><<<(groups + 127) / 128, 128, 0, s>>>(a, g);
  DSV3_CUDA_CHECK(cudaGetLastError());
  F::run(a, groups, 0.f, ws_bytes, s);
}

}  // namespace dsv3::cuda::sm90::detail
