#pragma once
// Shared by the CUDA kernels (.cu) of the Hopper backend: error checks, bf16 helpers, warp reductions and the
// tensor-core building blocks (mma.sync m16n8k16 bf16 -> fp32, ldmatrix, cp.async) that the GEMV, attention
// and decode kernels share. Fragment layouts follow the PTX ISA for mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16 (row-major):  a0 = A[g][2t..2t+1]   a1 = A[g+8][2t..2t+1]   a2 = A[g][2t+8..]   a3 = A[g+8][2t+8..]
//   B 16x8  ("col"):      b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]
//   C 16x8  (fp32):       c0,c1 = C[g][2t..2t+1]   c2,c3 = C[g+8][2t..2t+1]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ops/cuda/cuda_ops.h"

namespace dsv3::cuda {

#define DSV3_CUDA_KERNEL_CHECK() DSV3_CUDA_CHECK(cudaGetLastError())

// Programmatic dependent launch (sm_90). Every kernel begins with pdl_start(): it lets the next kernel of the
// stream launch now (its blocks become resident and wait), then waits until the previous kernel has finished
// and its writes are visible. Stream order is unchanged; what is saved is the launch latency between kernels,
// a few microseconds each, which dominates decode (about 25 small kernels per layer).
// NOTE: the dependent grid starts only after every block of this one has issued launch_dependents, so waiting
// blocks never keep this grid's own blocks from being scheduled.
__device__ __forceinline__ void pdl_start() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

// Launch with the programmatic-serialization attribute (see pdl_start) and check the launch.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  DSV3_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024). Every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32, nw = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[w] = v;
  __syncthreads();
  float s = lane < nw ? part[lane] : 0.f;
  return warp_sum(s);
}

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<bf16>(bf16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t u) {
  __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&u);
  return __bfloat1622float2(h);
}

// Weights are streamed once per step: bypass L1 so they do not evict the activations that are re-read.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// D = A B + D, bf16 inputs, fp32 accumulators (layouts in the file comment).
__device__ __forceinline__ void mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// D = A B + D with e4m3 inputs (m16n8k32), fp32 accumulators. In 32-bit registers the fragments have the same
// layout as the bf16 m16n8k16 form above, each register holding 4 consecutive k of e4m3 instead of 2 of bf16
// (a0 = A[g][4t..4t+3], a2 = A[g][16+4t..], b0 = B[4t..4t+3][g], b1 = B[16+4t..][g]), so the same byte
// offsets and ldmatrix calls load them.
__device__ __forceinline__ void mma_fp8(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Four 8x8 bf16 matrices; lanes 8i..8i+7 give the row addresses of matrix i; register i of lane l holds
// matrix i's row l/4, columns 2(l%4), 2(l%4)+1 (transposed with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy that bypasses registers; valid == false writes zeros (src is not read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Warp argmax over (value, index): larger value wins, ties go to the lower index (the CPU reference's order).
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, i, o);
    if (v2 > v || (v2 == v && i2 < i)) {
      v = v2;
      i = i2;
    }
  }
}

// Score of one expert group in group-limited routing, over its `per` selection scores v: the sum of the two
// best (DeepSeek-V3, noaux_tc) or the best (DeepSeek-V2 group_limited_greedy). Shared by both routers.
__device__ __forceinline__ float router_group_score(const float* v, int per, bool noaux) {
  if (!noaux) {
    float gs = -INFINITY;
    for (int i = 0; i < per; ++i) gs = fmaxf(gs, v[i]);
    return gs;
  }
  float b1 = -INFINITY, b2 = -INFINITY;
  for (int i = 0; i < per; ++i) {
    const float x = v[i];
    if (x > b1) {
      b2 = b1;
      b1 = x;
    } else if (x > b2) {
      b2 = x;
    }
  }
  return per >= 2 ? b1 + b2 : b1;
}

// One key tile of the causal online softmax (base 2) for a warp's 16 query rows, shared by the inference prefill
// and the training flash-attention kernels. sc [NT][4] holds the raw scores Q K^T in m16n8 C-fragment order for
// keys key0 .. key0 + 8 NT (row g: query position pa, row g + 8: pb; t = lane % 4); keys after the query or at
// or past kend are masked. Updates the running max m and sum l of both rows, rescales the output accumulators
// o [OV][4], and leaves the unnormalized probabilities in sc.
template <int NT, int OV>
__device__ __forceinline__ void online_softmax_tile(float (&sc)[NT][4], float (&o)[OV][4], float (&m)[2], float (&l)[2],
                                                    int key0, int pa, int pb, int kend, float scale_log2, int t) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = key0 + nt * 8 + 2 * t + (e & 1);
      float v = sc[nt][e] * scale_log2;
      if (j > (e < 2 ? pa : pb) || j >= kend) v = -INFINITY;
      sc[nt][e] = v;
      mx[e >> 1] = fmaxf(mx[e >> 1], v);
    }
  float alpha[2], mu[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float mn = fmaxf(m[r], mx[r]);
    mu[r] = mn == -INFINITY ? 0.f : mn;  // a row with no visible key yet keeps p = 0
    alpha[r] = exp2f(m[r] - mu[r]);
    m[r] = mn;
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = exp2f(sc[nt][e] - mu[e >> 1]);
      sc[nt][e] = p;
      l[e >> 1] += p;
    }
#pragma unroll
  for (int i = 0; i < OV; ++i) {
    o[i][0] *= alpha[0];
    o[i][1] *= alpha[0];
    o[i][2] *= alpha[1];
    o[i][3] *= alpha[1];
  }
}

}  // namespace dsv3::cuda
