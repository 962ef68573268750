// TrainBackend on one GPU: fp32 memory from the device context's caching allocator, every op on the context's
// stream, products through cuBLAS (fp32 in and out, bf16 tensor cores with fp32 accumulation; plain fp32 with
// DSV3_CUDA_TRAIN_F32=1 for exact comparisons), the other ops in train_*.cu (host entry points in
// train_kernels.h). The math of each op is the CPU reference kernel's (ops/cpu/train_ops.h).
//
// Host round trips (each waits for the stream): the ops that return host values (download, the losses,
// sum_squares, count_experts), the expert bucketing of experts_forward (the expert counts size the per-expert
// products, once per MoE layer) and embedding_backward (its per-row token lists are built on the host, which
// keeps the scatter deterministic without atomics).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "ops/cuda/device.h"
#include "ops/cuda/fp8_train.h"
#include "ops/cuda/grouped_gemm.h"
#include "ops/cuda/op_profile.h"
#include "ops/cuda/sm90/grouped.h"
#include "ops/cuda/train_kernels.h"
#include "ops/train_backend.h"

namespace dsv3 {

namespace {

using cuda::DeviceContext;
namespace k = cuda::train;
// Times the enclosing backend call (DSV3_CUDA_PROFILE=1), op_profile.h.
#define DSV3_TRAIN_PROF(name) cuda::OpProfiler::Scope prof_scope_(prof_, name, ctx_.stream)

int as_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) fail("CUDA training backend: {} = {} does not fit a cuBLAS int", what, v);
  return int(v);
}

// Routed-expert state of one MoE layer between experts_forward and experts_backward.
struct CudaMoeState final : MoeSavedState {
  std::vector<int64_t> offsets;  // host [E + 1]: first sorted position of each expert
  TBuf<int32_t> rows;            // [3 NK]: sorted pos -> token | sorted pos -> t K + k | t K + k -> sorted pos
  TBuf<float> G, U, Y;           // [NK, I], [NK, I], [NK, H] in sorted order
  explicit CudaMoeState(TrainBackend* be) : rows(be), G(be), U(be), Y(be) {}
};

class CudaTrainBackend final : public TrainBackend {
 public:
  explicit CudaTrainBackend(int dev) : dev_(dev), ctx_(DeviceContext::get(dev)) {
    DSV3_CUDA_CHECK(cudaSetDevice(dev));
    // DSV3_CUDA_TRAIN_F32=1: fp32 products without TF32 (exact comparisons with the CPU); else bf16 tensor cores.
    const char* e = std::getenv("DSV3_CUDA_TRAIN_F32");
    f32_ = e && std::string(e) == "1";
    // DSV3_CUDA_TRAIN_MATH=tf32: the fp32 products on TF32 tensor cores (read fp32 directly, 10-bit mantissas)
    // instead of cuBLAS' bf16 conversion of the operands (the default).
    // Dense products either hand cuBLAS the fp32 operands (it rounds them to bf16 inside its kernels) or first
    // convert them to bf16 copies (one pass each) and run its bf16 x bf16 -> fp32 kernels, which are 1.5-3x faster
    // but pay the conversion. gpu_train_gemm_bench measures both on train-s' shapes: the copies win on large
    // products (lm_head, the dense MLP) and on large weight gradients (cuBLAS' fp32-operand TN kernels are its
    // slowest), and lose on the small projections, so by default they are used there only.
    // DSV3_CUDA_TRAIN_MATH=bf16: copies for every packed product; =fp32ops: never.
    const std::string m = std::getenv("DSV3_CUDA_TRAIN_MATH") ? std::getenv("DSV3_CUDA_TRAIN_MATH") : "";
    if (m == "tf32") math_ = Math::Tf32;
    else if (m == "bf16") math_ = Math::Bf16Copies;
    else if (m == "fp32ops") math_ = Math::Fp32Operands;
    else if (!m.empty() && m != "default") fail("DSV3_CUDA_TRAIN_MATH={}: use default, bf16, fp32ops or tf32", m);
    const char* nc = std::getenv("DSV3_CUDA_NAN_CHECK");
    nan_check_ = nc && std::string(nc) == "1";
    const char* x = std::getenv("DSV3_CUDA_TRAIN_EXPERTS");
    experts_kernel_ = !(x && std::string(x) == "cublas");
    // DSV3_CUDA_TRAIN_EXPERTS=mma: the mma.sync grouped kernel instead of the sm90 wgmma/TMA one (where built).
    sm90_ = experts_kernel_ && cuda::sm90::available() && !(x && std::string(x) == "mma");
  }
  ~CudaTrainBackend() override {
    cudaStreamSynchronize(ctx_.stream);
    for (auto& s : scratch_)
      if (s.p) ctx_.alloc.release(s.p, s.rounded);
    for (auto& [p, r] : sizes_) ctx_.alloc.release(p, r);
  }

  std::string name() const override { return "cuda:" + std::to_string(dev_) + (f32_ ? " (fp32 products)" : ""); }
  bool is_host() const override { return false; }

  // ---- memory
  void* raw_alloc(size_t bytes) override {
    size_t rounded = 0;
    void* p = ctx_.alloc.alloc(std::max<size_t>(bytes, 1), &rounded);
    sizes_[p] = rounded;
    return p;
  }
  void raw_free(void* p) override {
    if (!p) return;
    auto it = sizes_.find(p);
    if (it == sizes_.end()) fail("CUDA training backend: freeing memory it did not allocate");
    ctx_.alloc.release(p, it->second);  // stream order keeps the block's pending work ahead of its next use
    sizes_.erase(it);
  }
  void upload(void* dst, const void* host_src, size_t bytes) override { DSV3_TRAIN_PROF("upload");
    if (bytes) DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, ctx_.stream));
  }
  void download(void* host_dst, const void* src, size_t bytes) override { DSV3_TRAIN_PROF("download");
    if (bytes) DSV3_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, ctx_.stream));
    synchronize();
  }
  void synchronize() override { DSV3_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream)); }
  void reset_profile() override { prof_.reset(); }
  void fill(float* x, float value, int64_t n) override { DSV3_TRAIN_PROF("fill"); k::fill(x, value, n, ctx_.stream); }
  void copy(float* dst, const float* src, int64_t n) override { DSV3_TRAIN_PROF("copy");
    if (n > 0 && dst != src)
      DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * 4, cudaMemcpyDeviceToDevice, ctx_.stream));
  }
  void copy_2d(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows, int64_t cols,
               bool accumulate) override { DSV3_TRAIN_PROF("copy_2d");
    k::copy_2d(dst, dst_stride, src, src_stride, rows, cols, accumulate, ctx_.stream);
  }
  void add(float* y, const float* x, int64_t n) override { DSV3_TRAIN_PROF("add"); k::add(y, x, n, ctx_.stream); }
  void gather_rows(float* dst, const float* src, const int32_t* rows, int64_t n, int64_t H, bool accumulate) override {
    DSV3_TRAIN_PROF("gather_rows");
    k::gather_rows(dst, src, rows, n, H, ctx_.stream, accumulate);
  }

  // ---- products
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) override { DSV3_TRAIN_PROF("gemm");
    gemm_batched(ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
  }

  // ---- FP8 products (--precision fp8): fp8_train.h, a dense layer is one segment of rows.
  void fp8_linear_forward(float* y, const float* x, const float* W, int64_t M, int64_t N, int64_t K) override {
    DSV3_TRAIN_PROF("fp8_linear_forward");
    nan_check("fp8_linear_forward x", x, M * K), nan_check("fp8_linear_forward W", W, N * K);
    fp8().forward({0, M}, x, K, N, {{y, W}});
    nan_check("fp8_linear_forward y", y, M * N);
  }
  void fp8_linear_backward(float* dx, bool dx_accumulate, float* dW, const float* dy, const float* x, const float* W,
                           int64_t M, int64_t N, int64_t K) override {
    DSV3_TRAIN_PROF("fp8_linear_backward");
    nan_check("fp8_linear_backward dy", dy, M * N), nan_check("fp8_linear_backward x", x, M * K);
    nan_check("fp8_linear_backward W", W, N * K);
    if (dx && dx_accumulate) nan_check("fp8_linear_backward dx before accumulating", dx, M * K);
    fp8().backward({0, M}, dx, dx_accumulate, dW, dy, x, W, K, N);
    if (dx) nan_check("fp8_linear_backward dx", dx, M * K);
    if (dW) nan_check("fp8_linear_backward dW", dW, N * K);
  }
  // DSV3_CUDA_NAN_CHECK=1: fail naming the first FP8 product whose input or output holds a NaN or an infinity
  // (a debugging aid: each check waits for the GPU).
  void nan_check(const char* what, const float* p, int64_t n) {
    if (!nan_check_ || n <= 0) return;
    const double s = sum_squares(p, n);
    if (!std::isfinite(s))
      fail("DSV3_CUDA_NAN_CHECK: {} has non-finite values ({} elements, sum of squares {})", what, n, s);
  }

  // ---- norms, rope, swiglu, embedding
  void rmsnorm_forward(float* out, float* rstd, const float* x, int64_t xs, const float* w, int64_t N, int64_t D,
                       double eps) override { DSV3_TRAIN_PROF("rmsnorm_forward");
    k::rmsnorm_forward(out, rstd, x, xs, w, N, D, eps, ctx_.stream);
  }
  void rmsnorm_backward(float* dx, int64_t dxs, float* dw, const float* dout, const float* x, int64_t xs,
                        const float* rstd, const float* w, int64_t N, int64_t D) override { DSV3_TRAIN_PROF("rmsnorm_backward");
    float* part = scratch<float>(kNormPart, size_t(k::rmsnorm_backward_part_floats(N, D)));
    k::rmsnorm_backward(dx, dxs, dw, dout, x, xs, rstd, w, N, D, part, ctx_.stream);
  }
  void rope_forward(float* x, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
                    const float* cos, const float* sin, bool interleave) override { DSV3_TRAIN_PROF("rope_forward");
    k::rope(x, N, n, stride, off, dr, pos, cos, sin, interleave, false, ctx_.stream);
  }
  void rope_backward(float* dx, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
                     const float* cos, const float* sin, bool interleave) override { DSV3_TRAIN_PROF("rope_backward");
    k::rope(dx, N, n, stride, off, dr, pos, cos, sin, interleave, true, ctx_.stream);
  }
  void swiglu_forward(float* out, const float* g, const float* u, int64_t n) override { DSV3_TRAIN_PROF("swiglu_forward");
    k::swiglu_forward(out, g, u, n, ctx_.stream);
  }
  void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u, int64_t n) override { DSV3_TRAIN_PROF("swiglu_backward");
    k::swiglu_backward(dg, du, dout, g, u, n, ctx_.stream);
  }
  void embedding_forward(float* out, const float* table, const int32_t* ids, int64_t N, int64_t H) override { DSV3_TRAIN_PROF("embedding_forward");
    k::embedding_forward(out, table, ids, N, H, ctx_.stream);
  }
  void embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t N, int64_t H) override { DSV3_TRAIN_PROF("embedding_backward");
    if (N <= 0) return;
    host_i32_.resize(size_t(N));
    download(host_i32_.data(), ids, size_t(N) * 4);
    // Token lists per distinct id (ids ascending, tokens in order inside an id): [rows | offsets | tokens].
    std::vector<int32_t> ord(static_cast<size_t>(N));
    std::iota(ord.begin(), ord.end(), 0);
    std::stable_sort(ord.begin(), ord.end(), [&](int32_t a, int32_t b) { return host_i32_[a] < host_i32_[b]; });
    std::vector<int32_t> row_id, off;
    for (int64_t i = 0; i < N; ++i)
      if (i == 0 || host_i32_[ord[i]] != host_i32_[ord[i - 1]]) {
        row_id.push_back(host_i32_[ord[i]]);
        off.push_back(int32_t(i));
      }
    off.push_back(int32_t(N));
    const int64_t nr = int64_t(row_id.size());
    plan_.clear();
    plan_.insert(plan_.end(), row_id.begin(), row_id.end());
    plan_.insert(plan_.end(), off.begin(), off.end());
    plan_.insert(plan_.end(), ord.begin(), ord.end());
    int32_t* d = scratch<int32_t>(kEmbPlan, plan_.size());
    upload(d, plan_.data(), plan_.size() * 4);
    k::embedding_backward(dtable, dout, d, d + nr, d + 2 * nr + 1, nr, H, ctx_.stream);
    synchronize();  // plan_ (pageable host memory) may be rewritten by the next call
  }

  double cross_entropy_forward_backward(float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                                        int64_t V, double scale, int64_t* correct) override { DSV3_TRAIN_PROF("cross_entropy_forward_backward");
    if (N <= 0) {
      if (correct) *correct = 0;
      return 0.0;
    }
    double* loss = scratch<double>(kRowLoss, size_t(N));
    int32_t* hit = scratch<int32_t>(kRowHit, size_t(N));
    k::cross_entropy(dlogits, logits, targets, N, V, scale, loss, hit, ctx_.stream);
    std::vector<double> hl(static_cast<size_t>(N));
    host_i32_.resize(size_t(N));
    DSV3_CUDA_CHECK(cudaMemcpyAsync(hl.data(), loss, size_t(N) * 8, cudaMemcpyDeviceToHost, ctx_.stream));
    download(host_i32_.data(), hit, size_t(N) * 4);
    double total = 0;
    int64_t c = 0;
    for (int64_t t = 0; t < N; ++t) total += hl[t], c += host_i32_[t];
    if (correct) *correct = c;
    return total;
  }

  // ---- attention. Default: the fused flash kernels of train_flash_attention.cu (bf16 tensor cores, no T x T
  // buffer; their bf16 operand copies live in the kScores slot). The materialized path below runs with fp32
  // products (DSV3_CUDA_TRAIN_F32=1, exact comparisons), with DSV3_CUDA_TRAIN_ATTN=naive (read per call), and
  // for head dims the fused kernels do not instantiate.
  bool use_flash_attention(int64_t dn, int64_t dr, int64_t dv) const {
    if (f32_ || !k::flash_attention_supported(dn, dr, dv)) return false;
    const char* e = std::getenv("DSV3_CUDA_TRAIN_ATTN");
    return !(e && std::string(e) == "naive");
  }

  // Materialized path: per sequence, cuBLAS products batched over the heads, scores [nh, Tq, Tq] in scratch;
  // the keys concatenated per head, Kc [B*Tq, nh, dn + dr] = [k_nope | k_pe], so each product is one call.
  void attention_forward(float* out, float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                         int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv, double scale) override { DSV3_TRAIN_PROF("attention_forward");
    if (use_flash_attention(dn, dr, dv)) {
      void* work = scratch<unsigned char>(kScores, k::flash_attention_work_bytes(B, Tq, nh, dn, dr, dv, false));
      if (k::flash_attention_forward(out, lse, q, kv, kpe, B, Tq, nh, dn, dr, dv, float(scale), work, ctx_.stream))
        return;
    }
    const int64_t qs = nh * (dn + dr), ks = nh * (dn + dv), os = nh * dv, TT = Tq * Tq;
    float* S = scratch<float>(kScores, size_t(nh * TT));
    float* Kc = scratch<float>(kKeys, size_t(B * Tq * qs));
    k::concat_keys(Kc, kv, kpe, B * Tq, nh, dn, dr, dv, ctx_.stream);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r0 = b * Tq;
      // S_h = scale Q_h Kc_h^T;  P = causal softmax (lse saved);  O_h = P_h V_h
      gemm_batched(false, true, Tq, Tq, dn + dr, float(scale), q + r0 * qs, qs, dn + dr, Kc + r0 * qs, qs, dn + dr,
                   0.f, S, Tq, TT, nh);
      k::causal_softmax_forward(S, lse + b * nh * Tq, nh, Tq, ctx_.stream);
      gemm_batched(false, false, Tq, dv, Tq, 1.f, S, Tq, TT, kv + r0 * ks + dn, ks, dn + dv, 0.f, out + r0 * os, os,
                   dv, nh);
    }
  }

  void attention_backward(float* dq, float* dkv, float* dkpe, const float* dout, const float* out, const float* lse,
                          const float* q, const float* kv, const float* kpe, int64_t B, int64_t Tq, int64_t nh,
                          int64_t dn, int64_t dr, int64_t dv, double scale) override { DSV3_TRAIN_PROF("attention_backward");
    if (use_flash_attention(dn, dr, dv)) {
      void* work = scratch<unsigned char>(kScores, k::flash_attention_work_bytes(B, Tq, nh, dn, dr, dv, true));
      if (k::flash_attention_backward(dq, dkv, dkpe, dout, out, lse, q, kv, kpe, B, Tq, nh, dn, dr, dv,
                                      float(scale), work, ctx_.stream))
        return;
    }
    const int64_t qs = nh * (dn + dr), ks = nh * (dn + dv), os = nh * dv, TT = Tq * Tq;
    const float sc = float(scale);
    float* P = scratch<float>(kScores, size_t(nh * TT));
    float* dP = scratch<float>(kScores2, size_t(nh * TT));
    float* D = scratch<float>(kRowDot, size_t(nh * Tq));
    float* Kc = scratch<float>(kKeys, size_t(B * Tq * qs));
    float* dKc = scratch<float>(kKeyGrads, size_t(Tq * qs));
    k::concat_keys(Kc, kv, kpe, B * Tq, nh, dn, dr, dv, ctx_.stream);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r0 = b * Tq;
      const float *qb = q + r0 * qs, *kvb = kv + r0 * ks, *kcb = Kc + r0 * qs, *dob = dout + r0 * os;
      float *dqb = dq + r0 * qs, *dkvb = dkv + r0 * ks;
      gemm_batched(false, true, Tq, Tq, dn + dr, sc, qb, qs, dn + dr, kcb, qs, dn + dr, 0.f, P, Tq, TT, nh);
      k::causal_softmax_recompute(P, D, lse + b * nh * Tq, dob, out + r0 * os, nh, Tq, dv, os, ctx_.stream);
      // dV = P^T dO;  dP = dO V^T;  dS = P (dP - D)
      gemm_batched(true, false, Tq, dv, Tq, 1.f, P, Tq, TT, dob, os, dv, 0.f, dkvb + dn, ks, dn + dv, nh);
      gemm_batched(false, true, Tq, Tq, dv, 1.f, dob, os, dv, kvb + dn, ks, dn + dv, 0.f, dP, Tq, TT, nh);
      k::softmax_backward(dP, P, D, nh, Tq, ctx_.stream);
      // dQ = sc dS Kc (both parts of q);  dKc = sc dS^T Q, split into dk_nope and the head sum for dkpe
      gemm_batched(false, false, Tq, dn + dr, Tq, sc, dP, Tq, TT, kcb, qs, dn + dr, 0.f, dqb, qs, dn + dr, nh);
      gemm_batched(true, false, Tq, dn + dr, Tq, sc, dP, Tq, TT, qb, qs, dn + dr, 0.f, dKc, qs, dn + dr, nh);
      k::split_key_grads(dkvb, dkpe + r0 * dr, dKc, Tq, nh, dn, dr, dv, ctx_.stream);
    }
  }

  // ---- router
  void route_forward(int32_t* idx, float* w, float* scores, const float* logits, const float* bias, int64_t N,
                     const RouteParams& p) override { DSV3_TRAIN_PROF("route_forward");
    k::route_forward(idx, w, scores, logits, bias, N, p, ctx_.stream);
  }
  void route_backward(float* dlogits, const float* dw, const float* dscores_extra, const float* scores,
                      const int32_t* idx, int64_t N, const RouteParams& p) override { DSV3_TRAIN_PROF("route_backward");
    k::route_backward(dlogits, dw, dscores_extra, scores, idx, N, p, ctx_.stream);
  }
  double balance_loss(float* dscores, const float* scores, const int32_t* idx, int64_t B, int64_t Tq, int64_t E,
                      int64_t K, double alpha, double grad_scale) override { DSV3_TRAIN_PROF("balance_loss");
    if (B <= 0) return 0.0;
    double* seq = scratch<double>(kSeqLoss, size_t(B));
    double* S = scratch<double>(kTokSum, size_t(B * Tq));
    k::balance_loss(dscores, scores, idx, B, Tq, E, K, alpha, grad_scale, seq, S, ctx_.stream);
    std::vector<double> h(static_cast<size_t>(B));
    download(h.data(), seq, size_t(B) * 8);
    double total = 0;
    for (double v : h) total += v;
    return total;
  }
  void count_experts(std::vector<int64_t>& load, const int32_t* idx, int64_t n) override {
    if (n <= 0) return;
    host_i32_.resize(size_t(n));
    download(host_i32_.data(), idx, size_t(n) * 4);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t e = host_i32_[i];
      if (e >= 0 && e < int64_t(load.size())) ++load[e];
    }
  }

  // ---- routed experts
  std::unique_ptr<MoeSavedState> new_moe_state() override { return std::make_unique<CudaMoeState>(this); }

  void experts_forward(float* out, MoeSavedState& st, const float* x, const int32_t* idx, const float* w,
                       const float* Wg, const float* Wu, const float* Wd, int64_t N, int64_t K, int64_t H, int64_t I,
                       int64_t E) override { DSV3_TRAIN_PROF("experts_forward");
    auto& s = as_state(st);
    const int64_t NK = N * K;
    plan_experts(s, idx, NK, K, E);
    if (NK == 0) return;
    const int32_t* xrow = s.rows.data();
    float* G = s.G.resize(size_t(NK * I));
    float* U = s.U.resize(size_t(NK * I));
    float* Y = s.Y.resize(size_t(NK * H));
    float* Xs = scratch<float>(kMoeX, size_t(NK * H));
    float* A = scratch<float>(kMoeA, size_t(NK * I));
    k::gather_rows(Xs, x, xrow, NK, H, ctx_.stream);
    if (precision() == Precision::FP8) {  // the recipe's products per expert (CPU: cpu/backward_moe.cpp)
      nan_check("experts fp8 x", Xs, NK * H);
      fp8().forward(s.offsets, Xs, H, I, {{G, Wg}, {U, Wu}});
      nan_check("experts fp8 G", G, NK * I), nan_check("experts fp8 U", U, NK * I);
      k::swiglu_forward(A, G, U, NK * I, ctx_.stream);
      fp8().forward(s.offsets, A, I, H, {{Y, Wd}});
      nan_check("experts fp8 Y", Y, NK * H);
      k::moe_combine(out, Y, w, s.rows.data() + 2 * NK, N, K, H, ctx_.stream);
      return;
    }
    if (use_grouped_kernel(H, I)) {
      experts_forward_grouped(s, Xs, A, Wg, Wu, Wd, NK, H, I, E);
      k::moe_combine(out, Y, w, s.rows.data() + 2 * NK, N, K, H, ctx_.stream);
      return;
    }
    std::vector<Product> gu, dn;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = s.offsets[e], n = s.offsets[e + 1] - o;
      if (n == 0) continue;
      gu.push_back({false, true, n, I, H, Xs + o * H, H, Wg + e * I * H, H, 0.f, G + o * I, I});
      gu.push_back({false, true, n, I, H, Xs + o * H, H, Wu + e * I * H, H, 0.f, U + o * I, I});
      dn.push_back({false, true, n, H, I, A + o * I, I, Wd + e * H * I, I, 0.f, Y + o * H, H});
    }
    gemm_group(gu);
    k::swiglu_forward(A, G, U, NK * I, ctx_.stream);
    gemm_group(dn);
    k::moe_combine(out, Y, w, s.rows.data() + 2 * NK, N, K, H, ctx_.stream);
  }

  void experts_backward(float* dx, float* dw, float* dWg, float* dWu, float* dWd, const float* dout,
                        MoeSavedState& st, const float* x, const int32_t* idx, const float* w, const float* Wg,
                        const float* Wu, const float* Wd, int64_t N, int64_t K, int64_t H, int64_t I,
                        int64_t E) override { DSV3_TRAIN_PROF("experts_backward");
    auto& s = as_state(st);
    const int64_t NK = N * K;
    if (NK == 0) return;
    if (int64_t(s.offsets.size()) != E + 1 || s.Y.size() != size_t(NK * H))
      fail("experts_backward: the saved state does not match (run experts_forward on the same shapes first)");
    const int32_t *xrow = s.rows.data(), *order = xrow + NK, *where = xrow + 2 * NK;
    float *G = s.G.data(), *U = s.U.data(), *Y = s.Y.data();
    k::moe_dw(dw, dout, Y, where, N, K, H, ctx_.stream);
    // dY = w_tk dout_t in sorted order (Y's buffer is free now: it becomes dY, later the per-pair dx).
    float* ws = scratch<float>(kMoeW, size_t(NK));
    k::gather_rows(ws, w, order, NK, 1, ctx_.stream);
    float* dY = Y;
    k::gather_rows_scaled(dY, dout, xrow, ws, NK, H, ctx_.stream);
    float* Xs = scratch<float>(kMoeX, size_t(NK * H));
    float* A = scratch<float>(kMoeA, size_t(NK * I));
    k::gather_rows(Xs, x, xrow, NK, H, ctx_.stream);
    k::swiglu_forward(A, G, U, NK * I, ctx_.stream);
    if (precision() == Precision::FP8) {
      // dWd += dY^T A, dA = dY Wd (into A); dG, dU in place; dX = dG Wg + dU Wu into dY's buffer; dWg, dWu.
      nan_check("experts fp8 dY", dY, NK * H), nan_check("experts fp8 A", A, NK * I);
      fp8().backward(s.offsets, A, false, dWd, dY, A, Wd, I, H);
      nan_check("experts fp8 dA", A, NK * I), nan_check("experts fp8 dWd", dWd, E * H * I);
      k::swiglu_backward(G, U, A, G, U, NK * I, ctx_.stream);
      nan_check("experts fp8 dG", G, NK * I), nan_check("experts fp8 dU", U, NK * I);
      float* DX = dY;
      fp8().backward(s.offsets, DX, false, dWg, G, Xs, Wg, H, I);
      fp8().backward(s.offsets, DX, true, dWu, U, Xs, Wu, H, I);
      nan_check("experts fp8 dX", DX, NK * H), nan_check("experts fp8 dWg", dWg, E * I * H),
          nan_check("experts fp8 dWu", dWu, E * I * H);
      k::moe_sum_pairs(dx, DX, where, N, K, H, ctx_.stream);
      return;
    }
    if (use_grouped_kernel(H, I)) {
      experts_backward_grouped(s, Xs, A, dY, dWg, dWu, dWd, Wg, Wu, Wd, NK, H, I, E);
      k::moe_sum_pairs(dx, Y, where, N, K, H, ctx_.stream);
      return;
    }
    // dWd += dY^T A, then dA = dY Wd into A (once dWd has used it); dX = dG Wg, then += dU Wu; dWg, dWu.
    std::vector<Product> dwd, da, dxg, dxu, dwgu;
    float* DX = Y;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = s.offsets[e], n = s.offsets[e + 1] - o;
      if (n == 0) continue;
      dwd.push_back({true, false, H, I, n, dY + o * H, H, A + o * I, I, 1.f, dWd + e * H * I, I});
      da.push_back({false, false, n, I, H, dY + o * H, H, Wd + e * H * I, I, 0.f, A + o * I, I});
      dxg.push_back({false, false, n, H, I, G + o * I, I, Wg + e * I * H, H, 0.f, DX + o * H, H});
      dxu.push_back({false, false, n, H, I, U + o * I, I, Wu + e * I * H, H, 1.f, DX + o * H, H});
      dwgu.push_back({true, false, I, H, n, G + o * I, I, Xs + o * H, H, 1.f, dWg + e * I * H, H});
      dwgu.push_back({true, false, I, H, n, U + o * I, I, Xs + o * H, H, 1.f, dWu + e * I * H, H});
    }
    gemm_group(dwd);
    gemm_group(da);
    k::swiglu_backward(G, U, A, G, U, NK * I, ctx_.stream);  // in place: G, U become dG, dU
    gemm_group(dwgu);  // reads dG, dU before the dX products (which only write DX)
    gemm_group(dxg);
    gemm_group(dxu);
    k::moe_sum_pairs(dx, DX, where, N, K, H, ctx_.stream);
  }

  // ---- routed experts on the grouped GEMM kernel (grouped_gemm.h): bf16 operands, fp32 results. Products that
  // are not in its NT form read transposed bf16 copies: weights [E, I, H] <-> [E, H, I], and the expert blocks of
  // sorted rows as columns, each block padded with zero columns to a multiple of 8 (the kernel's K granularity).
  bool use_grouped_kernel(int64_t H, int64_t I) const { return experts_kernel_ && !f32_ && H % 8 == 0 && I % 8 == 0; }

  // bf16 scratch carved from one slot: n elements, 16-byte aligned.
  struct Arena {
    cuda::bf16* base;
    size_t used = 0;
    cuda::bf16* take(size_t n) {
      cuda::bf16* p = base + used;
      used += (n + 7) / 8 * 8;
      return p;
    }
  };

  void experts_forward_grouped(CudaMoeState& s, const float* Xs, float* A, const float* Wg, const float* Wu,
                               const float* Wd, int64_t NK, int64_t H, int64_t I, int64_t E) {
    const size_t need = size_t((NK * H + 7) / 8 * 8 + (NK * I + 7) / 8 * 8 + 3 * ((E * I * H + 7) / 8 * 8));
    Arena ar{scratch<cuda::bf16>(kMoeBf16, need)};
    cuda::bf16 *Xb = ar.take(NK * H), *Ab = ar.take(NK * I), *Wgb = ar.take(E * I * H), *Wub = ar.take(E * I * H),
               *Wdb = ar.take(E * H * I);
    cuda::convert_to_bf16(Xb, Xs, NK * H, ctx_.stream);
    cuda::convert_to_bf16(Wgb, Wg, E * I * H, ctx_.stream);
    cuda::convert_to_bf16(Wub, Wu, E * I * H, ctx_.stream);
    cuda::convert_to_bf16(Wdb, Wd, E * H * I, ctx_.stream);
    float *G = s.G.data(), *U = s.U.data(), *Y = s.Y.data();
    std::vector<cuda::GroupedProblem> gu, dn;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = s.offsets[e], n = s.offsets[e + 1] - o;
      if (n == 0) continue;
      gu.push_back(nt(Xb + o * H, H, Wgb + e * I * H, H, G + o * I, I, n, I, H, 0.f));
      gu.push_back(nt(Xb + o * H, H, Wub + e * I * H, H, U + o * I, I, n, I, H, 0.f));
      dn.push_back(nt(Ab + o * I, I, Wdb + e * H * I, I, Y + o * H, H, n, H, I, 0.f));
    }
    grouped(gu);
    k::swiglu_forward(A, G, U, NK * I, ctx_.stream);
    cuda::convert_to_bf16(Ab, A, NK * I, ctx_.stream);
    grouped(dn);
  }

  // In: Xs (sorted x rows), A = silu(G) U, dY (in s.Y's buffer, sorted order). Out: dWg/dWu/dWd +=, and the
  // per-pair input gradients in s.Y's buffer; s.G/s.U become dG/dU, A becomes dA.
  void experts_backward_grouped(CudaMoeState& s, const float* Xs, float* A, float* dY, float* dWg, float* dWu,
                                float* dWd, const float* Wg, const float* Wu, const float* Wd, int64_t NK, int64_t H,
                                int64_t I, int64_t E) {
    // Padded column layout of the transposed expert blocks: expert e's rows -> columns [po[e], po[e] + pad[e]).
    std::vector<int64_t> po(size_t(E) + 1, 0);
    for (int64_t e = 0; e < E; ++e) po[e + 1] = po[e] + (s.offsets[e + 1] - s.offsets[e] + 7) / 8 * 8;
    const int64_t P = po[E];
    col_src_.assign(size_t(P), -1);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = s.offsets[e]; i < s.offsets[e + 1]; ++i) col_src_[po[e] + i - s.offsets[e]] = int32_t(i);
    int32_t* dcol = scratch<int32_t>(kMoeCols, size_t(std::max<int64_t>(P, 1)));
    upload(dcol, col_src_.data(), size_t(P) * 4);
    synchronize();  // col_src_ is reused by the next call
    auto r8 = [](int64_t n) { return size_t((n + 7) / 8 * 8); };
    const size_t need = r8(H * P) * 2 + r8(I * P) * 3 + r8(NK * H) + r8(NK * I) * 2 + r8(E * I * H) * 3;
    Arena ar{scratch<cuda::bf16>(kMoeBf16, need)};
    cuda::bf16 *dYT = ar.take(H * P), *XT = ar.take(H * P), *AT = ar.take(I * P), *dGT = ar.take(I * P),
               *dUT = ar.take(I * P), *dYb = ar.take(NK * H), *dGb = ar.take(NK * I), *dUb = ar.take(NK * I),
               *WdT = ar.take(E * I * H), *WgT = ar.take(E * H * I), *WuT = ar.take(E * H * I);
    const cudaStream_t st = ctx_.stream;
    cuda::transpose_to_bf16(dYT, dY, H, dcol, P, H, st);
    cuda::transpose_to_bf16(AT, A, I, dcol, P, I, st);
    cuda::transpose_to_bf16(XT, Xs, H, dcol, P, H, st);
    cuda::convert_to_bf16(dYb, dY, NK * H, st);
    cuda::transpose_to_bf16(WdT, Wd, I, nullptr, H, I, st, E, H * I, I * H);  // [E, H, I] -> [E, I, H]
    cuda::transpose_to_bf16(WgT, Wg, H, nullptr, I, H, st, E, I * H, H * I);  // [E, I, H] -> [E, H, I]
    cuda::transpose_to_bf16(WuT, Wu, H, nullptr, I, H, st, E, I * H, H * I);
    float *G = s.G.data(), *U = s.U.data(), *DX = dY;
    // dWd += dY^T A and dA = dY Wd (into A, whose transposed copy dWd reads) in one launch.
    std::vector<cuda::GroupedProblem> p1, p2, p3;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = s.offsets[e], n = s.offsets[e + 1] - o;
      if (n == 0) continue;
      const int64_t kp = po[e + 1] - po[e];
      p1.push_back(nt(dYT + po[e], P, AT + po[e], P, dWd + e * H * I, I, H, I, kp, 1.f));
      p1.push_back(nt(dYb + o * H, H, WdT + e * I * H, H, A + o * I, I, n, I, H, 0.f));
    }
    grouped(p1);
    k::swiglu_backward(G, U, A, G, U, NK * I, st);  // in place: G, U become dG, dU
    cuda::convert_to_bf16(dGb, G, NK * I, st);
    cuda::convert_to_bf16(dUb, U, NK * I, st);
    cuda::transpose_to_bf16(dGT, G, I, dcol, P, I, st);
    cuda::transpose_to_bf16(dUT, U, I, dcol, P, I, st);
    // dX = dG Wg with dWg += dG^T X, dWu += dU^T X in one launch; then dX += dU Wu (same rows: a second launch).
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = s.offsets[e], n = s.offsets[e + 1] - o;
      if (n == 0) continue;
      const int64_t kp = po[e + 1] - po[e];
      p2.push_back(nt(dGb + o * I, I, WgT + e * H * I, I, DX + o * H, H, n, H, I, 0.f));
      p2.push_back(nt(dGT + po[e], P, XT + po[e], P, dWg + e * I * H, H, I, H, kp, 1.f));
      p2.push_back(nt(dUT + po[e], P, XT + po[e], P, dWu + e * I * H, H, I, H, kp, 1.f));
      p3.push_back(nt(dUb + o * I, I, WuT + e * H * I, I, DX + o * H, H, n, H, I, 1.f));
    }
    grouped(p2);
    grouped(p3);
  }

  // C[M, N] (+)= A[M, K] B[N, K]^T with leading dimensions lda, ldb, ldc (elements).
  static cuda::GroupedProblem nt(const cuda::bf16* A, int64_t lda, const cuda::bf16* B, int64_t ldb, float* C,
                                 int64_t ldc, int64_t M, int64_t N, int64_t K, float beta) {
    return {A,
            B,
            C,
            as_int(M, "M"),
            as_int(N, "N"),
            as_int(K, "K"),
            as_int(lda, "lda"),
            as_int(ldb, "ldb"),
            as_int(ldc, "ldc"),
            beta,
            0};
  }
  void grouped(std::vector<cuda::GroupedProblem>& ps) {
    DSV3_TRAIN_PROF("grouped");
    if (ps.empty()) return;
    if (sm90_ && std::all_of(ps.begin(), ps.end(), [](const cuda::GroupedProblem& p) {
          return p.M <= 0 || p.N <= 0 || cuda::sm90::list_gemm_ok(p);
        })) {
      const size_t bytes = cuda::sm90::list_workspace_bytes(int(ps.size()));
      cuda::sm90::list_gemm(ps, scratch<char>(kSm90Ws, bytes), bytes, ctx_.stream);
      return;
    }
    auto* dev = scratch<cuda::GroupedProblem>(kGemmPtrs, ps.size());
    cuda::grouped_gemm(ps, dev, ctx_.stream);
  }

  // ---- optimizer
  double sum_squares(const float* x, int64_t n) override { DSV3_TRAIN_PROF("sum_squares");
    if (n <= 0) return 0.0;
    double* part = scratch<double>(kSumSq, k::kSumSquaresBlocks);
    k::sum_squares(x, n, part, ctx_.stream);
    std::vector<double> h(k::kSumSquaresBlocks);
    download(h.data(), part, h.size() * 8);
    double s = 0;
    for (double v : h) s += v;
    return s;
  }
  void adamw_update(float* params, const float* grads, float* m, float* v, int64_t offset, int64_t n, float b1,
                    float b2, float eps, float grad_scale, float decay, float step_size,
                    float inv_sqrt_bc2) override { DSV3_TRAIN_PROF("adamw_update");
    k::adamw(params + offset, grads + offset, m + offset, v + offset, n, b1, b2, eps, grad_scale, decay, step_size,
             inv_sqrt_bc2, ctx_.stream);
  }

 private:
  // Scratch slots: grown on demand, reused by later ops (one stream orders every use).
  enum Slot {
    kNormPart, kEmbPlan, kRowLoss, kRowHit, kScores, kScores2, kRowDot, kKeys, kKeyGrads, kSeqLoss, kTokSum, kMoeX,
    kMoeA,
    kMoeW, kSumSq, kGemmPtrs, kMoeBf16, kMoeCols, kSm90Ws, kGemmA, kGemmB, kNumSlots
  };
  struct Scratch {
    void* p = nullptr;
    size_t bytes = 0, rounded = 0;
  };
  template <typename T>
  T* scratch(Slot slot, size_t n) {
    Scratch& s = scratch_[slot];
    const size_t bytes = std::max<size_t>(n * sizeof(T), 1);
    if (bytes > s.bytes) {
      if (s.p) ctx_.alloc.release(s.p, s.rounded);
      s.p = nullptr;
      s.p = ctx_.alloc.alloc(bytes, &s.rounded);
      s.bytes = bytes;
    }
    return static_cast<T*>(s.p);
  }

  cuda::Fp8TrainProducts& fp8() {
    if (!fp8_) fp8_ = std::make_unique<cuda::Fp8TrainProducts>(ctx_);
    return *fp8_;
  }

  static CudaMoeState& as_state(MoeSavedState& st) {
    auto* s = dynamic_cast<CudaMoeState*>(&st);
    if (!s) fail("experts_forward/backward: the MoE state was not made by this CUDA backend");
    return *s;
  }

  // Buckets the NK pairs (t, k) by expert, token order inside an expert (the CPU's order): host offsets, and
  // on the device [token of each sorted position | t K + k of each sorted position | sorted position of t K + k].
  void plan_experts(CudaMoeState& s, const int32_t* idx, int64_t NK, int64_t K, int64_t E) {
    host_i32_.resize(size_t(NK));
    if (NK) download(host_i32_.data(), idx, size_t(NK) * 4);
    s.offsets.assign(size_t(E + 1), 0);
    for (int64_t i = 0; i < NK; ++i) {
      const int32_t e = host_i32_[i];
      if (e < 0 || e >= E) fail("experts_forward: expert index {} out of range [0, {})", e, E);
      s.offsets[e + 1]++;
    }
    for (int64_t e = 0; e < E; ++e) s.offsets[e + 1] += s.offsets[e];
    plan_.assign(size_t(3 * NK), 0);
    std::vector<int64_t> fill(s.offsets.begin(), s.offsets.end() - 1);
    for (int64_t i = 0; i < NK; ++i) {
      const int64_t pos = fill[host_i32_[i]]++;
      plan_[pos] = int32_t(i / K);
      plan_[NK + pos] = int32_t(i);
      plan_[2 * NK + i] = int32_t(pos);
    }
    int32_t* d = s.rows.resize(std::max<size_t>(plan_.size(), 1));
    upload(d, plan_.data(), plan_.size() * 4);
    synchronize();  // plan_ is pageable host memory reused by the next call
  }

  // One row-major product C = op(A) op(B) + beta C of a group (alpha 1).
  struct Product {
    bool ta, tb;
    int64_t M, N, K;
    const float* A;
    int64_t lda;
    const float* B;
    int64_t ldb;
    float beta;
    float* C;
    int64_t ldc;
  };
  // Independent products (one per active expert) in one cuBLAS call (cublasGemmGroupedBatchedEx, each product
  // its own group of one): a per-expert loop is ~300 launches per MoE layer, each too small to fill the GPU.
  // Falls back to the loop where cuBLAS refuses the grouped form for these types.
  void gemm_group(const std::vector<Product>& ps) {
    if (ps.empty()) return;
    if (grouped_ok_ && ps.size() > 1) {
      const size_t n = ps.size();
      std::vector<cublasOperation_t> ta(n), tb(n);
      std::vector<int> m(n), nn(n), kk(n), lda(n), ldb(n), ldc(n), size(n, 1);
      std::vector<float> alpha(n, 1.f), beta(n);
      std::vector<const void*> ptrs(3 * n);
      for (size_t i = 0; i < n; ++i) {  // column-major view, as in gemm_batched: the operands swap places
        const Product& p = ps[i];
        ta[i] = p.tb ? CUBLAS_OP_T : CUBLAS_OP_N, tb[i] = p.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        m[i] = as_int(p.N, "N"), nn[i] = as_int(p.M, "M"), kk[i] = as_int(p.K, "K");
        lda[i] = as_int(std::max<int64_t>(p.ldb, 1), "ldb"), ldb[i] = as_int(std::max<int64_t>(p.lda, 1), "lda");
        ldc[i] = as_int(std::max<int64_t>(p.ldc, 1), "ldc"), beta[i] = p.beta;
        ptrs[i] = p.B, ptrs[n + i] = p.A, ptrs[2 * n + i] = p.C;
      }
      auto* dptr = scratch<const void*>(kGemmPtrs, 3 * n);
      upload(dptr, ptrs.data(), ptrs.size() * sizeof(void*));  // stream-ordered after the previous group's use
      const cublasComputeType_t ct =
        f32_ ? CUBLAS_COMPUTE_32F : (math_ == Math::Tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F_FAST_16BF);
      DSV3_CUDA_CHECK(cudaSetDevice(dev_));
      const cublasStatus_t st = cublasGemmGroupedBatchedEx(
          ctx_.blas, ta.data(), tb.data(), m.data(), nn.data(), kk.data(), alpha.data(), dptr, CUDA_R_32F, lda.data(),
          dptr + n, CUDA_R_32F, ldb.data(), beta.data(), const_cast<void* const*>(dptr + 2 * n), CUDA_R_32F,
          ldc.data(), as_int(int64_t(n), "groups"), size.data(), ct);
      if (st == CUBLAS_STATUS_SUCCESS) return;
      if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) DSV3_CUBLAS_CHECK(st);
      grouped_ok_ = false;  // this cuBLAS has no grouped form for fp32 operands: the loop from now on
    }
    for (const Product& p : ps) gemm(p.ta, p.tb, p.M, p.N, p.K, 1.f, p.A, p.lda, p.B, p.ldb, p.beta, p.C, p.ldc);
  }

  // Row-major C[M, N] = alpha op(A) op(B) + beta C for `batch` matrices (strides in elements). cuBLAS is
  // column-major: a row-major X is its transpose there, so it computes C^T = op(B)^T op(A)^T, i.e. the operands
  // swap places and keep their transpose flags.
  void gemm_batched(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    int64_t sa, const float* B, int64_t ldb, int64_t sb, float beta, float* C, int64_t ldc,
                    int64_t sc, int64_t batch) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    // Profiled per shape: which products a step's dense time goes to.
    const std::string shape = prof_.on() ? "gemm_batched " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                                               std::to_string(K) + (ta ? " T" : " N") + (tb ? "T" : "N") +
                                               (batch > 1 ? " x" + std::to_string(batch) : std::string()) +
                                               " ld " + std::to_string(lda) + "/" + std::to_string(ldb) + "/" +
                                               std::to_string(ldc) + " align " +
                                               std::to_string(reinterpret_cast<uintptr_t>(A) % 16) + "/" +
                                               std::to_string(reinterpret_cast<uintptr_t>(B) % 16) + "/" +
                                               std::to_string(reinterpret_cast<uintptr_t>(C) % 16) +
                                               (beta != 0.f ? " beta" : "")
                                         : std::string();
    DSV3_TRAIN_PROF(shape.c_str());
    const cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasComputeType_t ct =
        f32_ ? CUBLAS_COMPUTE_32F : (math_ == Math::Tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F_FAST_16BF);
    const int m = as_int(N, "N"), n = as_int(M, "M"), kk = as_int(K, "K");
    // K = 0 leaves C = beta C (as BLAS); leading dimensions must still be >= 1 for cuBLAS.
    const int la = as_int(std::max<int64_t>(lda, 1), "lda"), lb = as_int(std::max<int64_t>(ldb, 1), "ldb");
    const int lc = as_int(std::max<int64_t>(ldc, 1), "ldc");
    DSV3_CUDA_CHECK(cudaSetDevice(dev_));
    // bf16 operand copies (DSV3_CUDA_TRAIN_MATH=bf16) for packed operands: A is [M, K] (or [K, M] when ta) with
    // lda = its column count, B likewise; C stays fp32 with beta.
    const int64_t a_cols = ta ? M : K, b_cols = tb ? K : N;
    const double mnk = double(M) * double(N) * double(K);
    const bool copies = math_ == Math::Bf16Copies ||
                        (math_ == Math::Rule && (mnk >= 0x1p34 || (ta && mnk >= 0x1p32 && std::min(M, N) >= 512)));
    if (batch == 1 && copies && !f32_ && lda == a_cols && ldb == b_cols && K > 0) {
      const int64_t na = M * K, nb = N * K;
      auto* ab = scratch<cuda::bf16>(kGemmA, size_t(na));
      auto* bb = scratch<cuda::bf16>(kGemmB, size_t(nb));
      cuda::convert_to_bf16(ab, A, na, ctx_.stream);
      cuda::convert_to_bf16(bb, B, nb, ctx_.stream);
      DSV3_CUBLAS_CHECK(cublasGemmEx(ctx_.blas, ob, oa, m, n, kk, &alpha, bb, CUDA_R_16BF, lb, ab, CUDA_R_16BF, la,
                                     &beta, C, CUDA_R_32F, lc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      return;
    }
    if (batch == 1) {
      DSV3_CUBLAS_CHECK(cublasGemmEx(ctx_.blas, ob, oa, m, n, kk, &alpha, B, CUDA_R_32F, lb, A, CUDA_R_32F, la, &beta,
                                     C, CUDA_R_32F, lc, ct, CUBLAS_GEMM_DEFAULT));
    } else {
      DSV3_CUBLAS_CHECK(cublasGemmStridedBatchedEx(ctx_.blas, ob, oa, m, n, kk, &alpha, B, CUDA_R_32F, lb, sb, A,
                                                   CUDA_R_32F, la, sa, &beta, C, CUDA_R_32F, lc, sc,
                                                   as_int(batch, "batch"), ct, CUBLAS_GEMM_DEFAULT));
    }
  }

  int dev_;
  cuda::OpProfiler prof_{"training steps"};
  DeviceContext& ctx_;
  bool f32_ = false;
  bool nan_check_ = false;  // DSV3_CUDA_NAN_CHECK=1
  // How the non-exact fp32 products run (DSV3_CUDA_TRAIN_MATH): bf16 operand copies by the size rule (default),
  // copies always, cuBLAS on the fp32 operands (bf16 inside its kernels) always, or TF32 tensor cores.
  enum class Math { Rule, Bf16Copies, Fp32Operands, Tf32 } math_ = Math::Rule;
  bool grouped_ok_ = true;  // cuBLAS accepted the grouped form (gemm_group)
  bool sm90_ = false;  // the list products on sm90/grouped.h's wgmma/TMA kernel
  bool experts_kernel_ = true;  // routed experts on the grouped GEMM kernel (DSV3_CUDA_TRAIN_EXPERTS=cublas: off)
  std::vector<int32_t> col_src_;
  std::unique_ptr<cuda::Fp8TrainProducts> fp8_;  // made on the first FP8 product
  std::unordered_map<void*, size_t> sizes_;  // live raw_alloc blocks -> their allocator size class
  Scratch scratch_[kNumSlots];
  std::vector<int32_t> host_i32_, plan_;
};

}  // namespace

std::unique_ptr<TrainBackend> make_cuda_train_backend(int device_index) {
  cuda::require_device(device_index);
  return std::make_unique<CudaTrainBackend>(device_index);
}

}  // namespace dsv3
