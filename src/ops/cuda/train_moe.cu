// DeepSeekMoE for training on the GPU (math of ops/cpu/backward_moe.cpp): the router forward (saving the scores)
// and backward, the sequence-wise balance loss, and the per-token helpers of the routed experts (weighted
// combine, sum of the K input gradients, dw). The expert products are cuBLAS calls in cuda_train_backend.cpp.
// Determinism: no float atomics; per-token sums run over k in order, the balance loss' per-expert sums over
// tokens in order, and per-sequence losses are added by the host.
#include <climits>

#include "ops/backend.h"
#include "ops/cuda/train_common.cuh"
#include "ops/cuda/train_kernels.h"

namespace dsv3::cuda::train {

namespace {

struct RouteArgs {
  int E, K, G, TG;
  bool sigmoid, group_limited, noaux;
  bool norm;  // weights normalized by their sum (the CPU's WeightRule)
  double c;   // weight factor
};

RouteArgs route_args(const RouteParams& p) {
  RouteArgs a;
  a.E = int(p.n_experts), a.K = int(p.top_k), a.G = int(p.n_group), a.TG = int(p.topk_group);
  a.sigmoid = p.sigmoid, a.group_limited = p.group_limited, a.noaux = p.noaux_bias;
  if (p.sigmoid)
    a.norm = p.norm_topk_prob, a.c = p.scaling;
  else if (p.norm_topk_prob && p.top_k > 1)
    a.norm = true, a.c = 1.0;  // DeepSeek-V2: normalized weights are not scaled
  else
    a.norm = false, a.c = p.scaling;
  return a;
}

// One warp per token; s and sel (2E floats per warp) in shared memory, scores also written out.
__global__ void route_fwd_kernel(int32_t* idx, float* w, float* scores, const float* logits, const float* bias,
                                 int64_t N, RouteArgs a) {
  extern __shared__ float sm[];
  const int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x * int64_t(blockDim.x >> 5) + wib;
  if (t >= N) return;  // whole warps; only warp-level sync below
  const int E = a.E, K = a.K;
  float* s = sm + wib * 2 * E;
  float* sel = s + E;
  const float* l = logits + t * E;
  if (a.sigmoid) {
    for (int e = lane; e < E; e += 32) s[e] = 1.f / (1.f + expf(-l[e]));
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    double sum = 0;
    for (int e = lane; e < E; e += 32) sum += double(s[e] = expf(l[e] - mx));
    sum = warp_sum_d(sum);
    for (int e = lane; e < E; e += 32) s[e] = float(s[e] / sum);
  }
  for (int e = lane; e < E; e += 32) {
    scores[t * E + e] = s[e];
    sel[e] = s[e] + (a.noaux && bias ? bias[e] : 0.f);
  }
  __syncwarp();
  if (a.group_limited && a.G > 1) {
    const int per = E / a.G;
    float gs = -INFINITY;
    if (lane < a.G) gs = router_group_score(sel + lane * per, per, a.noaux);
    unsigned allowed = 0;
    for (int k = 0; k < a.TG; ++k) {
      float v = lane < a.G && !((allowed >> lane) & 1u) ? gs : -INFINITY;
      int i = lane < a.G && !((allowed >> lane) & 1u) ? lane : INT_MAX;
      warp_argmax(v, i);
      if (i != INT_MAX) allowed |= 1u << i;
    }
    for (int e = lane; e < E; e += 32)
      if (!((allowed >> (e / per)) & 1u)) sel[e] = 0.f;  // transformers' masked_fill(0.0)
    __syncwarp();
  }
  double wsum = 0;
  float mine = 0.f;  // lane k keeps the score of pick k
  for (int k = 0; k < K; ++k) {
    float v = -INFINITY;
    int bi = INT_MAX;
    for (int e = lane; e < E; e += 32)
      if (bi == INT_MAX || sel[e] > v) v = sel[e], bi = e;
    warp_argmax(v, bi);
    if (bi == INT_MAX) bi = 0;
    const float sk = s[bi];
    wsum += double(sk);
    if (lane == k) mine = sk;
    __syncwarp();
    if (lane == 0) {
      idx[t * K + k] = bi;
      sel[bi] = -INFINITY;
    }
    __syncwarp();
  }
  if (lane < K) w[t * K + lane] = a.norm ? float(double(mine) / (wsum + 1e-20) * a.c) : float(double(mine) * a.c);
}

// One warp per token: ds = extra + the gradient through the weights of the K picks; dz through sigmoid/softmax.
__global__ void route_bwd_kernel(float* dz, const float* dw, const float* extra, const float* scores,
                                 const int32_t* idx, int64_t N, RouteArgs a) {
  const int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x * int64_t(blockDim.x >> 5) + wib;
  if (t >= N) return;
  const int E = a.E, K = a.K;
  const float* s = scores + t * E;
  const int32_t* it = idx + t * K;
  const float* g = dw + t * K;
  double S = 0, dot = 0;
  for (int k = 0; k < K; ++k) S += s[it[k]], dot += double(g[k]) * s[it[k]];
  const double den = S + 1e-20;
  float* d = dz + t * E;
  double sdot = 0;
  for (int e = lane; e < E; e += 32) {
    float ds = extra ? extra[t * E + e] : 0.f;
    for (int k = 0; k < K; ++k)
      if (it[k] == e) ds += a.norm ? float(a.c * (g[k] / den - dot / (den * den))) : float(a.c * g[k]);
    if (a.sigmoid) {
      d[e] = ds * (s[e] * (1.f - s[e]));
    } else {
      d[e] = ds;
      sdot += double(ds) * s[e];
    }
  }
  if (!a.sigmoid) {
    const float sd = float(warp_sum_d(sdot));
    for (int e = lane; e < E; e += 32) d[e] = s[e] * (d[e] - sd);
  }
}

// One block per sequence b (tokens [b Tq, (b+1) Tq)). Shared: cnt [E] int, f [E] and fP [E] fp64.
__global__ void balance_loss_kernel(float* dscores, const float* scores, const int32_t* idx, int64_t B, int64_t Tq,
                                    int64_t E, int64_t K, double alpha, double grad_scale, double* seq_loss,
                                    double* Sbuf) {
  extern __shared__ double smd[];
  double* f = smd;
  double* fP = f + E;
  int* cnt = reinterpret_cast<int*>(fP + E);
  const int64_t b = blockIdx.x, t0 = b * Tq;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < Tq * K; i += blockDim.x) atomicAdd(&cnt[idx[t0 * K + i]], 1);  // integer: exact
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) f[e] = double(cnt[e]) * double(E) / double(K * Tq);
  __syncthreads();
  const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  const double kk = alpha / double(B * Tq) * grad_scale;
  for (int64_t t = t0 + (threadIdx.x >> 5); t < t0 + Tq; t += nw) {
    const float* s = scores + t * E;
    double S = 0, fs = 0;
    for (int64_t e = lane; e < E; e += 32) S += s[e], fs += f[e] * s[e];
    S = warp_sum_d(S);
    fs = warp_sum_d(fs);
    if (lane == 0) Sbuf[t] = S;
    float* d = dscores + t * E;
    for (int64_t e = lane; e < E; e += 32) d[e] = float(kk * (f[e] / S - fs / (S * S)));
  }
  __syncthreads();  // Sbuf of the block's tokens is visible to the whole block
  // P_e: one warp per expert, lanes over tokens, a fixed shuffle tree (deterministic).
  for (int64_t e = threadIdx.x >> 5; e < E; e += nw) {
    double P = 0;
    for (int64_t t = t0 + lane; t < t0 + Tq; t += 32) P += double(scores[t * E + e]) / Sbuf[t] / double(Tq);
    P = warp_sum_d(P);
    if (lane == 0) fP[e] = f[e] * P;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double l = 0;
    for (int64_t e = 0; e < E; ++e) l += fP[e];
    seq_loss[b] = alpha * l / double(B);
  }
}

// out[t, j] += sum_k (w[t, k]) Y[where[t K + k], j], k in order; w null = weights of 1.
__global__ void combine_kernel(float* out, const float* Y, const float* w, const int32_t* where, int64_t N, int64_t K,
                               int64_t H) {
  DSV3_GRID_STRIDE(i, N * H) {
    const int64_t t = i / H, j = i % H;
    float acc = out[i];
    for (int64_t k = 0; k < K; ++k) {
      const float y = Y[int64_t(where[t * K + k]) * H + j];
      acc += w ? w[t * K + k] * y : y;
    }
    out[i] = acc;
  }
}

// One warp per pair (t, k): dw = dout_t . Y_pair.
__global__ void moe_dw_kernel(float* dw, const float* dout, const float* Y, const int32_t* where, int64_t NK,
                              int64_t K, int64_t H) {
  const int64_t p = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (p >= NK) return;
  const int lane = threadIdx.x & 31;
  const float* g = dout + (p / K) * H;
  const float* y = Y + int64_t(where[p]) * H;
  double d = 0;
  for (int64_t j = lane; j < H; j += 32) d += double(g[j]) * y[j];
  d = warp_sum_d(d);
  if (lane == 0) dw[p] = float(d);
}

}  // namespace

void route_forward(int32_t* idx, float* w, float* scores, const float* logits, const float* bias, int64_t N,
                   const RouteParams& p, cudaStream_t s) {
  if (N <= 0) return;
  if (p.top_k > 32 || (p.group_limited && p.n_group > 32))
    fail("CUDA router: top_k {} and n_group {} must be <= 32", p.top_k, p.n_group);
  const RouteArgs a = route_args(p);
  const int warps = 4;
  const size_t smem = size_t(warps) * 2 * a.E * sizeof(float);
  if (smem > 48 * 1024) fail("CUDA router: {} experts do not fit in shared memory", a.E);
  route_fwd_kernel<<<unsigned((N + warps - 1) / warps), warps * 32, smem, s>>>(idx, w, scores, logits, bias, N, a);
  DSV3_CUDA_KERNEL_CHECK();
}

void route_backward(float* dlogits, const float* dw, const float* dscores_extra, const float* scores,
                    const int32_t* idx, int64_t N, const RouteParams& p, cudaStream_t s) {
  if (N <= 0) return;
  const int warps = 4;
  route_bwd_kernel<<<unsigned((N + warps - 1) / warps), warps * 32, 0, s>>>(dlogits, dw, dscores_extra, scores, idx,
                                                                             N, route_args(p));
  DSV3_CUDA_KERNEL_CHECK();
}

void balance_loss(float* dscores, const float* scores, const int32_t* idx, int64_t B, int64_t Tq, int64_t E,
                  int64_t K, double alpha, double grad_scale, double* seq_loss, double* inv_s, cudaStream_t s) {
  if (B <= 0) return;
  const size_t smem = size_t(E) * (2 * sizeof(double) + sizeof(int));
  if (smem > 48 * 1024) fail("CUDA balance loss: {} experts do not fit in shared memory", E);
  balance_loss_kernel<<<unsigned(B), 256, smem, s>>>(dscores, scores, idx, B, Tq, E, K, alpha, grad_scale, seq_loss,
                                                     inv_s);
  DSV3_CUDA_KERNEL_CHECK();
}

void moe_combine(float* out, const float* Y, const float* w, const int32_t* where, int64_t N, int64_t K, int64_t H,
                 cudaStream_t s) {
  if (N <= 0 || H <= 0) return;
  combine_kernel<<<grid_for(N * H), 256, 0, s>>>(out, Y, w, where, N, K, H);
  DSV3_CUDA_KERNEL_CHECK();
}

void moe_sum_pairs(float* out, const float* Y, const int32_t* where, int64_t N, int64_t K, int64_t H,
                   cudaStream_t s) {
  moe_combine(out, Y, nullptr, where, N, K, H, s);
}

void moe_dw(float* dw, const float* dout, const float* Y, const int32_t* where, int64_t N, int64_t K, int64_t H,
            cudaStream_t s) {
  if (N * K <= 0) return;
  const int warps = 8;
  moe_dw_kernel<<<unsigned((N * K + warps - 1) / warps), warps * 32, 0, s>>>(dw, dout, Y, where, N * K, K, H);
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda::train
