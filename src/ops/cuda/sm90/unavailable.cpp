// sm90/grouped.h without CUTLASS (its headers were not found at build time): nothing is available, and a call
// that reaches a kernel anyway fails with a clear message instead of computing nothing.
#include "ops/cuda/sm90/grouped.h"

#include "core/error.h"

namespace dsv3::cuda::sm90 {

namespace {
[[noreturn]] void missing() { fail("this build has no CUTLASS sm90 grouped GEMMs (pip install nvidia-cutlass, rebuild)"); }
}  // namespace

bool available() { return false; }
size_t expert_workspace_bytes(int, bool) { return 0; }
size_t list_workspace_bytes(int) { return 0; }
void expert_gemm_bf16(const ExpertGemm&, void*, size_t, cudaStream_t) { missing(); }
void expert_gemm_fp8(const ExpertGemm&, void*, size_t, cudaStream_t) { missing(); }
bool list_gemm_ok(const GroupedProblem&) { return false; }
void list_gemm(const std::vector<GroupedProblem>&, void*, size_t, cudaStream_t) { missing(); }
void regroup_act_scales(float*, const float*, const int*, int, int64_t, int64_t, cudaStream_t) { missing(); }
void transpose_block_scales(float*, const float*, int64_t, int64_t, int64_t, cudaStream_t) { missing(); }

}  // namespace dsv3::cuda::sm90
