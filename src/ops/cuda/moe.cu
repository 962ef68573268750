// DeepSeekMoE on the GPU: the router (sigmoid or softmax scores, selection bias, group-limited top-k, weights),
// the dispatch plan (pairs bucketed by expert, in expert order) and the
// weighted un-permute (combine). Expert products themselves are in gemm.cu (decode) or cuBLAS (prefill).
#include <algorithm>
#include <climits>
#include <cmath>

#include "ops/backend.h"
#include "ops/cuda/common.cuh"

namespace dsv3::cuda {

namespace {

struct RouteArgs {
  int T, E, K, G, TG;
  bool sigmoid, norm, group_limited, noaux;
  float scaling;
};

// Routes token tok with one warp; scores s and selection scores sel are that warp's 2E floats of shared memory.
// Only warp-level synchronization inside (callers may run it on some warps of a block).
__device__ void route_token(int tok, float* s, int* __restrict__ idx, float* __restrict__ w,
                            const float* __restrict__ logits, const float* __restrict__ bias, const RouteArgs& a) {
  const int lane = threadIdx.x & 31;
  const int E = a.E, K = a.K;
  float* sel = s + E;
  const float* lg = logits + int64_t(tok) * E;
  if (a.sigmoid) {
    for (int e = lane; e < E; e += 32) s[e] = 1.f / (1.f + expf(-lg[e]));
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, lg[e]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) sum += (s[e] = expf(lg[e] - mx));
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += 32) s[e] /= sum;
  }
  for (int e = lane; e < E; e += 32) sel[e] = s[e] + (a.noaux && bias ? bias[e] : 0.f);
  __syncwarp();
  if (a.group_limited && a.G > 1) {
    const int per = E / a.G;
    float gs = -INFINITY;
    if (lane < a.G) gs = router_group_score(sel + lane * per, per, a.noaux);
    unsigned allowed = 0;
    for (int k = 0; k < a.TG; ++k) {
      float v = lane < a.G && !((allowed >> lane) & 1u) ? gs : -INFINITY;
      int i = lane;
      warp_argmax(v, i);
      allowed |= 1u << i;
    }
    // Experts of dropped groups get selection score 0.0 (transformers' masked_fill), not -inf.
    for (int e = lane; e < E; e += 32)
      if (!((allowed >> (e / per)) & 1u)) sel[e] = 0.f;
    __syncwarp();
  }
  float wsum = 0.f;
  float wk_lane = 0.f;  // lane k keeps the weight of pick k (K <= 32)
  for (int k = 0; k < K; ++k) {
    float v = -INFINITY;
    int bi = INT_MAX;
    for (int e = lane; e < E; e += 32)
      if (sel[e] > v) {
        v = sel[e];
        bi = e;
      }
    warp_argmax(v, bi);
    if (bi == INT_MAX) bi = 0;  // only with NaN scores
    const float sk = s[bi];
    wsum += sk;
    if (lane == k) wk_lane = sk;
    if (lane == 0) {
      idx[int64_t(tok) * K + k] = bi;
      sel[bi] = -INFINITY;
    }
    __syncwarp();
  }
  if (lane < K) {
    float x = wk_lane;
    if (a.sigmoid) {
      if (a.norm) x = x / (wsum + 1e-20f);
      x *= a.scaling;
    } else if (a.norm && K > 1) {  // DeepSeek-V2: normalized weights are not scaled
      x = x / (wsum + 1e-20f);
    } else {
      x *= a.scaling;
    }
    w[int64_t(tok) * K + lane] = x;
  }
}

// One warp per token.
__global__ void moe_route_kernel(int* __restrict__ idx, float* __restrict__ w, const float* __restrict__ logits,
                                 const float* __restrict__ bias, RouteArgs a) {
  pdl_start();
  extern __shared__ float sm[];
  const int wib = threadIdx.x >> 5;
  const int tok = blockIdx.x * (blockDim.x >> 5) + wib;
  if (tok >= a.T) return;  // whole warps only; no block-wide barrier in route_token
  route_token(tok, sm + wib * 2 * a.E, idx, w, logits, bias, a);
}

// The dispatch plan of P = T*K pairs by one block (smi: 3E + 1 ints of shared memory; every thread must call).
__device__ void plan_block(int* smi, const int* __restrict__ idx, int P, int K, int E, int* counts, int* offsets,
                           int* active, int* n_active, int* sorted_xrow, int* pair_pos) {
  int* cnt = smi;           // [E]
  int* off = cnt + E;       // [E + 1]
  int* fill = off + E + 1;  // [E]
  for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = fill[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const int e = idx[i];
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0, na = 0;
    for (int e = 0; e < E; ++e) {
      off[e] = run;
      run += cnt[e];
      if (cnt[e]) active[na++] = e;
    }
    off[E] = run;
    *n_active = na;
    offsets[E] = run;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    counts[e] = cnt[e];
    offsets[e] = off[e];
  }
  // Order within an expert follows the atomics; each row's result does not depend on its place.
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const int e = idx[i];
    if (e < 0 || e >= E) {
      pair_pos[i] = -1;
      continue;
    }
    const int pos = off[e] + atomicAdd(&fill[e], 1);
    sorted_xrow[pos] = i / K;
    pair_pos[i] = pos;
  }
}

__global__ void moe_plan_kernel(const int* __restrict__ idx, int P, int K, int E, int* counts, int* offsets, int* active,
                                int* n_active, int* sorted_xrow, int* pair_pos) {
  pdl_start();
  extern __shared__ int smi[];
  plan_block(smi, idx, P, K, E, counts, offsets, active, n_active, sorted_xrow, pair_pos);
}

// Decode sizes: routing (the first rw warps, tokens strided over them) and the plan in one block of 1024 threads.
// The block's barrier makes the idx it wrote visible to all its threads before the plan reads them.
__global__ void __launch_bounds__(1024) moe_route_plan_kernel(int* __restrict__ idx, float* __restrict__ w,
                                                              const float* __restrict__ logits,
                                                              const float* __restrict__ bias, RouteArgs a, int rw,
                                                              int* counts, int* offsets, int* active, int* n_active,
                                                              int* sorted_xrow, int* pair_pos) {
  pdl_start();
  extern __shared__ float sm[];
  const int wib = threadIdx.x >> 5;
  if (wib < rw)
    for (int tok = wib; tok < a.T; tok += rw) route_token(tok, sm + wib * 2 * a.E, idx, w, logits, bias, a);
  __syncthreads();
  plan_block(reinterpret_cast<int*>(sm + rw * 2 * a.E), idx, a.T * a.K, a.K, a.E, counts, offsets, active, n_active,
             sorted_xrow, pair_pos);
}

// Block (t, column chunk of 256): out[t, c] += sum_k w[t, k] * Y[pair_pos[t, k], c].
template <typename TO, typename TY>
__global__ void moe_combine_kernel(TO* out, const TY* y, const float* w, const int* pair_pos, int K, int H) {
  pdl_start();
  __shared__ int64_t rows[32];
  __shared__ float wts[32];
  const int t = blockIdx.x;
  if (threadIdx.x < K) {
    const int i = t * K + threadIdx.x;
    rows[threadIdx.x] = pair_pos[i];
    wts[threadIdx.x] = w[i];
  }
  __syncthreads();
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= H) return;
  float acc = to_f(out[int64_t(t) * H + c]);
  for (int k = 0; k < K; ++k)
    if (rows[k] >= 0) acc += wts[k] * to_f(y[rows[k] * H + c]);
  out[int64_t(t) * H + c] = from_f<TO>(acc);
}

// The bf16 form, 8 channels (16 bytes) per thread: the combine reads top_k rows of y per token, so it is
// bandwidth-bound and wants full-width loads (the scalar kernel above reached a third of the copy bandwidth).
__global__ void moe_combine_bf16x8_kernel(bf16* out, const bf16* y, const float* w, const int* pair_pos, int K, int H) {
  pdl_start();
  __shared__ int64_t rows[32];
  __shared__ float wts[32];
  const int t = blockIdx.x;
  if (threadIdx.x < K) {
    const int i = t * K + threadIdx.x;
    rows[threadIdx.x] = pair_pos[i];
    wts[threadIdx.x] = w[i];
  }
  __syncthreads();
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
  if (c >= H) return;
  uint4* o = reinterpret_cast<uint4*>(out + int64_t(t) * H + c);
  uint4 ov = *o;
  const bf16* op = reinterpret_cast<const bf16*>(&ov);
  float acc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = __bfloat162float(op[j]);
  for (int k = 0; k < K; ++k) {
    if (rows[k] < 0) continue;
    const uint4 yv = *reinterpret_cast<const uint4*>(y + rows[k] * H + c);
    const bf16* yp = reinterpret_cast<const bf16*>(&yv);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] += wts[k] * __bfloat162float(yp[j]);
  }
  bf16* wp = reinterpret_cast<bf16*>(&ov);
#pragma unroll
  for (int j = 0; j < 8; ++j) wp[j] = __float2bfloat16(acc[j]);
  *o = ov;
}

}  // namespace

void moe_route(int* idx, float* w, const float* logits, const float* bias, int T, const RouteParams& p, cudaStream_t s) {
  if (T == 0) return;
  DSV3_CHECK(p.top_k >= 1 && p.top_k <= 32 && p.top_k <= p.n_experts, "moe_route: top_k {} of {} experts", p.top_k,
             p.n_experts);
  RouteArgs a{T, int(p.n_experts), int(p.top_k), int(p.n_group), int(p.topk_group), p.sigmoid, p.norm_topk_prob,
              p.group_limited, p.noaux_bias, float(p.scaling)};
  if (a.group_limited && a.G > 1)
    DSV3_CHECK(a.G <= 32 && a.E % a.G == 0 && a.TG <= a.G, "moe_route: {} groups of {} experts, top {}", a.G, a.E, a.TG);
  constexpr int warps = 4;
  const size_t smem = size_t(warps) * 2 * a.E * sizeof(float);
  launch(moe_route_kernel, dim3((T + warps - 1) / warps), dim3(warps * 32), smem, s, idx, w, logits, bias, a);
  DSV3_CUDA_KERNEL_CHECK();
}

void moe_route_plan(int* idx, float* w, const float* logits, const float* bias, int T, const RouteParams& p, int* counts,
                    int* offsets, int* active, int* n_active, int* sorted_xrow, int* pair_pos, cudaStream_t s) {
  if (T == 0) return;
  DSV3_CHECK(T <= kRoutePlanMaxT, "moe_route_plan: {} tokens (at most {})", T, kRoutePlanMaxT);
  DSV3_CHECK(p.top_k >= 1 && p.top_k <= 32 && p.top_k <= p.n_experts, "moe_route: top_k {} of {} experts", p.top_k,
             p.n_experts);
  RouteArgs a{T, int(p.n_experts), int(p.top_k), int(p.n_group), int(p.topk_group), p.sigmoid, p.norm_topk_prob,
              p.group_limited, p.noaux_bias, float(p.scaling)};
  if (a.group_limited && a.G > 1)
    DSV3_CHECK(a.G <= 32 && a.E % a.G == 0 && a.TG <= a.G, "moe_route: {} groups of {} experts, top {}", a.G, a.E, a.TG);
  // Routing warps: one per token up to 32, fewer when 2E floats each would pass 40 KB (E = 256: 20 warps).
  const int rw = std::max(1, std::min({T, 32, int(40960 / (8 * a.E))}));
  const size_t smem = size_t(rw) * 2 * a.E * sizeof(float) + size_t(3 * a.E + 1) * sizeof(int);
  DSV3_CHECK(smem <= 48 * 1024, "moe_route_plan: {} experts need {} bytes of shared memory", a.E, smem);
  launch(moe_route_plan_kernel, dim3(1), dim3(1024), smem, s, idx, w, logits, bias, a, rw, counts, offsets, active,
         n_active, sorted_xrow, pair_pos);
  DSV3_CUDA_KERNEL_CHECK();
}

void moe_plan(const int* idx, int T, int K, int E, int* counts, int* offsets, int* active, int* n_active,
              int* sorted_xrow, int* pair_pos, cudaStream_t s) {
  const int P = T * K;
  const size_t smem = size_t(3 * E + 1) * sizeof(int);
  launch(moe_plan_kernel, dim3(1), dim3(1024), smem, s, idx, P, K, E, counts, offsets, active, n_active, sorted_xrow, pair_pos);
  DSV3_CUDA_KERNEL_CHECK();
}

void moe_combine(bf16* out, const void* y, bool y_f32, const float* w, const int* pair_pos, int T, int K, int H,
                 cudaStream_t s) {
  if (T == 0) return;
  DSV3_CHECK(K <= 32, "moe_combine: top_k {} > 32", K);
  const bool wide = !y_f32 && H % 8 == 0 && ((reinterpret_cast<uintptr_t>(out) | reinterpret_cast<uintptr_t>(y)) & 15) == 0;
  if (wide) {
    const int threads = std::max(32, std::min(256, H / 8));  // at least 32: the first K threads load the routes
    launch(moe_combine_bf16x8_kernel, dim3(T, (H / 8 + threads - 1) / threads), dim3(threads), 0, s, out,
           static_cast<const bf16*>(y), w, pair_pos, K, H);
    DSV3_CUDA_KERNEL_CHECK();
    return;
  }
  const int threads = 256;
  const dim3 grid(T, (H + threads - 1) / threads);
  if (y_f32)
    launch(moe_combine_kernel<bf16, float>, grid, dim3(threads), 0, s, out, static_cast<const float*>(y), w, pair_pos, K, H);
  else
    launch(moe_combine_kernel<bf16, bf16>, grid, dim3(threads), 0, s, out, static_cast<const bf16*>(y), w, pair_pos, K, H);
  DSV3_CUDA_KERNEL_CHECK();
}

void moe_combine_f32(float* out, const float* y, const float* w, const int* pair_pos, int T, int K, int H,
                     cudaStream_t s) {
  if (T == 0) return;
  DSV3_CHECK(K <= 32, "moe_combine: top_k {} > 32", K);
  launch(moe_combine_kernel<float, float>, dim3(T, (H + 255) / 256), dim3(256), 0, s, out, y, w, pair_pos, K, H);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
