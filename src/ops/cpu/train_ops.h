#pragma once
// Training kernels on the CPU: forward functions that save what their backward needs, and the backward
// partners, llm.c style (outputs first, then saved tensors, inputs, weights, dims). Every kernel is a
// template on the float type and instantiated for float (the trainer) and double (the finite-difference
// tests). PyTorch dimension order; N = rows (tokens), a Linear is y = x W^T with W [out, in].
// Accumulation rule, repeated at the top of each file: weight gradients always accumulate (+=), so micro-
// batches and shared weights add up; an input gradient accumulates only where the comment says `+=`.
#include <cstdint>
#include <vector>

#include "ops/backend.h"

namespace dsv3::cpu {

// ---- backward_norm.cpp: RMSNorm, RoPE, SwiGLU, embedding
// out[N, D] = x * rstd * w, rstd[N] = 1/sqrt(mean(x^2) + eps); rows of x have stride xs.
template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* x, int64_t xs, const T* w, int64_t N, int64_t D, double eps);
// dx[N, D] (row stride dxs) += ..., dw[D] += ...
template <typename T>
void rmsnorm_backward(T* dx, int64_t dxs, T* dw, const T* dout, const T* x, int64_t xs, const T* rstd, const T* w,
                      int64_t N, int64_t D);
// In place on columns [off, off + dr) of the n sub-rows (stride `stride`) of each of N rows; cos/sin
// [max_pos, dr/2]. rope_backward applies the transposed rotation to the gradient, in place.
template <typename T>
void rope_forward(T* x, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
                  const float* cos, const float* sin, bool interleave);
template <typename T>
void rope_backward(T* dx, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
                   const float* cos, const float* sin, bool interleave);
// out = silu(g) * u (n elements); backward overwrites dg, du.
template <typename T>
void swiglu_forward(T* out, const T* g, const T* u, int64_t n);
template <typename T>
void swiglu_backward(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t n);
// out[N, H] = table[ids[t]]; backward: dtable[V, H] += scatter of dout (deterministic: columns per thread).
template <typename T>
void embedding_forward(T* out, const T* table, const int32_t* ids, int64_t N, int64_t H);
template <typename T>
void embedding_backward(T* dtable, const T* dout, const int32_t* ids, int64_t N, int64_t H);

// ---- backward_loss.cpp: cross-entropy with its gradient in one pass
// For each row with targets[t] >= 0: loss_t = logsumexp(logits_t) - logits_t[target]; dlogits_t =
// scale * (softmax(logits_t) - onehot(target)); rows with target < 0 get zero gradient. dlogits may alias
// logits. Returns the sum of row losses (fp64, fixed order) and counts rows whose argmax is the target.
template <typename T>
double cross_entropy_forward_backward(T* dlogits, const T* logits, const int32_t* targets, int64_t N, int64_t V,
                                      double scale, int64_t* correct);

// ---- backward_attention.cpp: causal MLA attention core over B sequences of Tq tokens
// q [B*Tq, nh, dn + dr] (rotated), kv [B*Tq, nh, dn + dv] (k_nope, v), kpe [B*Tq, dr] shared by the heads.
// out [B*Tq, nh, dv]; lse [B, nh, Tq] (log-sum-exp of each score row, saved for the backward).
// sel (DeepSeek-V3.2 DSA, optional): [B*Tq, K] positions within the sequence each query may attend to (-1 =
// none); the other keys get probability 0 in the forward and no gradient in the backward.
template <typename T>
void attention_forward(T* out, T* lse, const T* q, const T* kv, const T* kpe, int64_t B, int64_t Tq, int64_t nh,
                       int64_t dn, int64_t dr, int64_t dv, double scale, const int32_t* sel = nullptr, int64_t K = 0);
// dq, dkv, dkpe are overwritten.
template <typename T>
void attention_backward(T* dq, T* dkv, T* dkpe, const T* dout, const T* out, const T* lse, const T* q, const T* kv,
                        const T* kpe, int64_t B, int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv,
                        double scale, const int32_t* sel = nullptr, int64_t K = 0);

// ---- backward_moe.cpp: router and routed experts
// scores[N, E] = sigmoid(logits) (or softmax); idx/w [N, K] as moe_route (selection with bias, weights from
// the unbiased scores, normalized and scaled). Selection is piecewise constant: no gradient through it.
template <typename T>
void route_forward(int32_t* idx, T* w, T* scores, const T* logits, const float* bias, int64_t N,
                   const RouteParams& p);
// dlogits[N, E] (overwritten) from dw [N, K] through the normalization and scaling of the selected scores,
// plus dscores_extra [N, E] (nullable: the balance loss' gradient on every score).
template <typename T>
void route_backward(T* dlogits, const T* dw, const T* dscores_extra, const T* scores, const int32_t* idx, int64_t N,
                    const RouteParams& p);
// Sequence-wise balance loss over B sequences of Tq tokens, averaged over sequences:
//   L = alpha / B * sum_b sum_i f_i P_i,  f_i = E/(K Tq) #{t: i in TopK(t)},  P_i = 1/Tq sum_t s_it / sum_j s_jt.
// Returns L; dscores [N, E] is overwritten with dL/ds * grad_scale (f is constant).
template <typename T>
double balance_loss(T* dscores, const T* scores, const int32_t* idx, int64_t B, int64_t Tq, int64_t E, int64_t K,
                    double alpha, double grad_scale);

// Routed experts (SwiGLU), grouped weights Wg/Wu [E, I, H], Wd [E, H, I]. Assignments (t, k) are bucketed
// by expert in token order; `MoeSaved` holds that order and the per-assignment activations.
template <typename T>
struct MoeSaved {
  std::vector<int64_t> offsets;  // [E + 1] first assignment of each expert in sorted order
  std::vector<int64_t> order;    // [N*K] sorted position -> t*K + k
  std::vector<int64_t> where;    // [N*K] t*K + k -> sorted position
  std::vector<T> G, U;           // [N*K, I] gate and up projections, sorted order
  std::vector<T> Y;              // [N*K, H] expert outputs before weighting, sorted order
};
// out[N, H] += sum_k w[t, k] * Expert_{idx[t, k]}(x[t]). fp8 (float only): FP8-emulated products (fp8_linear.h).
template <typename T>
void experts_forward(T* out, MoeSaved<T>& s, const T* x, const int32_t* idx, const T* w, const T* Wg, const T* Wu,
                     const T* Wd, int64_t N, int64_t K, int64_t H, int64_t I, int64_t E, bool fp8 = false);
// dx[N, H] +=, dw[N, K] overwritten, dWg/dWu/dWd +=. Consumes s (Y is reused as scratch).
template <typename T>
void experts_backward(T* dx, T* dw, T* dWg, T* dWu, T* dWd, const T* dout, MoeSaved<T>& s, const T* x,
                      const int32_t* idx, const T* w, const T* Wg, const T* Wu, const T* Wd, int64_t N, int64_t K,
                      int64_t H, int64_t I, int64_t E, bool fp8 = false);

}  // namespace dsv3::cpu
