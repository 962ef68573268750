#pragma once
// The training backend: every op the training model (train/train_model.*) and the optimizer need, declared
// once and implemented per device, so the training code has no device branches. ops/cpu/cpu_train_backend.cpp
// wraps the reference kernels of ops/cpu/train_ops.h (results bit-identical to calling them directly);
// ops/cuda/cuda_train_backend.cpp runs them on one GPU.
//
// Conventions (the same as ops/cpu/train_ops.h, which documents each kernel's math):
//  - Every pointer argument is memory of this backend (host memory for the CPU, device memory for CUDA),
//    obtained through TBuf or through param_memory(); host arrays are passed only where a std::vector is.
//  - Everything is fp32 in memory; a device backend may compute products in lower precision (bf16 tensor
//    cores with fp32 accumulation) within bf16 tolerances.
//  - Row-major, PyTorch dimension order, a Linear is y = x W^T with W [out, in], N = rows (tokens).
//  - Weight gradients always accumulate (+=); an input gradient accumulates only where the comment says so.
//  - Ops are asynchronous on a device backend; the ones that return host values (download, the losses,
//    sum_squares, count_experts) wait for the work before them.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ops/backend.h"  // RouteParams

namespace dsv3 {

// Routed-expert activations saved by experts_forward for experts_backward; each backend has its own.
struct MoeSavedState {
  virtual ~MoeSavedState() = default;
};

class TrainBackend {
 public:
  virtual ~TrainBackend() = default;
  virtual std::string name() const = 0;  // "cpu", "cuda:0"
  virtual bool is_host() const = 0;      // memory is host memory (pointers may be used by host code)

  // ---- memory
  virtual void* raw_alloc(size_t bytes) = 0;  // uninitialized; throws on failure
  virtual void raw_free(void* p) = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;  // waits
  virtual void synchronize() {}
  // Forget the per-op profile gathered so far (bench-train calls it after its warm-up steps, so the table covers
  // the measured steps only: first calls pay one-time costs such as loading library kernels).
  virtual void reset_profile() {}
  virtual void fill(float* x, float value, int64_t n) = 0;
  virtual void copy(float* dst, const float* src, int64_t n) = 0;
  // dst[r * dst_stride + c] (= or +=) src[r * src_stride + c] for r < rows, c < cols.
  virtual void copy_2d(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows,
                       int64_t cols, bool accumulate) = 0;
  virtual void add(float* y, const float* x, int64_t n) = 0;  // y += x
  // dst[i, :] (= or +=) src[rows[i], :] for i < n, H columns (rows: backend memory). Moves token rows between the
  // layout of a layer and the send / receive buffers of expert parallelism.
  virtual void gather_rows(float* dst, const float* src, const int32_t* rows, int64_t n, int64_t H, bool accumulate) = 0;

  // ---- products: C[M, N] = alpha op(A) op(B) + beta C, op = transpose when the flag is set (row-major).
  virtual void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) = 0;
  // y[M, N] = x[M, K] W[N, K]^T;  dx[M, K] (= or +=) dy W;  dW[N, K] += dy^T x (dx or dW may be null).
  void linear_forward(float* y, const float* x, const float* W, int64_t M, int64_t N, int64_t K) {
    gemm(false, true, M, N, K, 1.f, x, K, W, K, 0.f, y, N);
  }
  void linear_backward(float* dx, bool dx_accumulate, float* dW, const float* dy, const float* x, const float* W,
                       int64_t M, int64_t N, int64_t K) {
    if (dx) gemm(false, false, M, K, N, 1.f, dy, N, W, K, dx_accumulate ? 1.f : 0.f, dx, K);
    if (dW) gemm(true, false, N, K, M, 1.f, dy, N, x, K, 1.f, dW, K);
  }

  // ---- FP8 products (dsv3 train --precision fp8), the DeepSeek-V3 recipe with the tiles of core/fp8.h:
  //   Fprop  y = x W^T      x in 1x128 tiles along K, W in 128x128 blocks
  //   Dgrad  dx = dy W      dy in 1x128 tiles along N, W in the same 128x128 blocks
  //   Wgrad  dW += dy^T x   dy and x in 128x1 tiles along M (the token dimension is the contraction)
  // Products and accumulation in fp32 (a device may sum each 128-wide K block on its FP8 tensor cores and
  // promote to fp32 per block). The training model runs the linear layers the recipe runs in FP8 through
  // qlinear_* (attention projections, dense and shared-expert MLPs, MTP projection) and keeps the rest
  // (embedding, lm_head, router, norms, attention core) on the plain products. Routed experts follow
  // precision() inside experts_forward / experts_backward.
  enum class Precision { Default, FP8 };
  void set_precision(Precision p) { precision_ = p; }
  Precision precision() const { return precision_; }
  virtual void fp8_linear_forward(float* y, const float* x, const float* W, int64_t M, int64_t N, int64_t K);
  virtual void fp8_linear_backward(float* dx, bool dx_accumulate, float* dW, const float* dy, const float* x,
                                   const float* W, int64_t M, int64_t N, int64_t K);
  void qlinear_forward(float* y, const float* x, const float* W, int64_t M, int64_t N, int64_t K) {
    if (precision_ == Precision::FP8) fp8_linear_forward(y, x, W, M, N, K);
    else linear_forward(y, x, W, M, N, K);
  }
  void qlinear_backward(float* dx, bool dx_accumulate, float* dW, const float* dy, const float* x, const float* W,
                        int64_t M, int64_t N, int64_t K) {
    if (precision_ == Precision::FP8) fp8_linear_backward(dx, dx_accumulate, dW, dy, x, W, M, N, K);
    else linear_backward(dx, dx_accumulate, dW, dy, x, W, M, N, K);
  }

  // ---- the kernels of ops/cpu/train_ops.h, float only (same arguments, same semantics)
  virtual void rmsnorm_forward(float* out, float* rstd, const float* x, int64_t xs, const float* w, int64_t N,
                               int64_t D, double eps) = 0;
  virtual void rmsnorm_backward(float* dx, int64_t dxs, float* dw, const float* dout, const float* x, int64_t xs,
                                const float* rstd, const float* w, int64_t N, int64_t D) = 0;
  // cos/sin [max_pos, dr/2] and pos [N] are backend memory.
  virtual void rope_forward(float* x, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr,
                            const int32_t* pos, const float* cos, const float* sin, bool interleave) = 0;
  virtual void rope_backward(float* dx, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr,
                             const int32_t* pos, const float* cos, const float* sin, bool interleave) = 0;
  virtual void swiglu_forward(float* out, const float* g, const float* u, int64_t n) = 0;
  virtual void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u,
                               int64_t n) = 0;
  virtual void embedding_forward(float* out, const float* table, const int32_t* ids, int64_t N, int64_t H) = 0;
  virtual void embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t N, int64_t H) = 0;
  // Returns the summed row loss (fp64) and adds the rows whose argmax is the target to *correct.
  virtual double cross_entropy_forward_backward(float* dlogits, const float* logits, const int32_t* targets,
                                                int64_t N, int64_t V, double scale, int64_t* correct) = 0;
  virtual void attention_forward(float* out, float* lse, const float* q, const float* kv, const float* kpe,
                                 int64_t B, int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv,
                                 double scale) = 0;
  virtual void attention_backward(float* dq, float* dkv, float* dkpe, const float* dout, const float* out,
                                  const float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                                  int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv, double scale) = 0;
  // DeepSeek-V3.2: attention_forward / attention_backward where each query row r attends only to the positions
  // sel[r, 0..K) of its own sequence (-1 = none; the DSA selection, a constant of the step). The default refuses:
  // only the CPU backend trains V3.2 so far.
  virtual void attention_forward_sel(float* out, float* lse, const float* q, const float* kv, const float* kpe,
                                     int64_t B, int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv,
                                     double scale, const int32_t* sel, int64_t K) {
    fail("attention with a DSA selection (DeepSeek-V3.2 training) is not implemented on {}", name());
  }
  virtual void attention_backward_sel(float* dq, float* dkv, float* dkpe, const float* dout, const float* out,
                                      const float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                                      int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv, double scale,
                                      const int32_t* sel, int64_t K) {
    fail("attention with a DSA selection (DeepSeek-V3.2 training) is not implemented on {}", name());
  }
  virtual void route_forward(int32_t* idx, float* w, float* scores, const float* logits, const float* bias,
                             int64_t N, const RouteParams& p) = 0;
  virtual void route_backward(float* dlogits, const float* dw, const float* dscores_extra, const float* scores,
                              const int32_t* idx, int64_t N, const RouteParams& p) = 0;
  virtual double balance_loss(float* dscores, const float* scores, const int32_t* idx, int64_t B, int64_t Tq,
                              int64_t E, int64_t K, double alpha, double grad_scale) = 0;
  // load[e] += #{i < n : idx[i] == e} (load is host memory, [E]).
  virtual void count_experts(std::vector<int64_t>& load, const int32_t* idx, int64_t n) = 0;
  virtual std::unique_ptr<MoeSavedState> new_moe_state() = 0;
  virtual void experts_forward(float* out, MoeSavedState& s, const float* x, const int32_t* idx, const float* w,
                               const float* Wg, const float* Wu, const float* Wd, int64_t N, int64_t K, int64_t H,
                               int64_t I, int64_t E) = 0;
  virtual void experts_backward(float* dx, float* dw, float* dWg, float* dWu, float* dWd, const float* dout,
                                MoeSavedState& s, const float* x, const int32_t* idx, const float* w,
                                const float* Wg, const float* Wu, const float* Wd, int64_t N, int64_t K, int64_t H,
                                int64_t I, int64_t E) = 0;

  // ---- optimizer over the flat parameter buffer
  // sum of squares in fp64 (a fixed reduction order per backend: the same input gives the same result).
  virtual double sum_squares(const float* x, int64_t n) = 0;
  // One AdamW update of elements [offset, offset + n) (PyTorch semantics, see train/optimizer.cpp):
  //   g = grads * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  //   p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)
  virtual void adamw_update(float* params, const float* grads, float* m, float* v, int64_t offset, int64_t n,
                            float b1, float b2, float eps, float grad_scale, float decay, float step_size,
                            float inv_sqrt_bc2) = 0;

 protected:
  Precision precision_ = Precision::Default;
};

// --precision default | fp8 (dsv3 train, bench-train, grads); throws InputError otherwise.
TrainBackend::Precision parse_precision(const std::string& s);

// make_train_backend("cpu") or ("cuda", "cuda:N"); throws InputError with a one-line reason when the device
// is unknown or unavailable (no GPU, a build without CUDA).
std::unique_ptr<TrainBackend> make_train_backend(const std::string& device);
std::unique_ptr<TrainBackend> make_cpu_train_backend();
std::unique_ptr<TrainBackend> make_cuda_train_backend(int device_index);  // ops/cuda (or the stub)

// An array of T in a TrainBackend's memory, sized on demand like std::vector::resize but without keeping the
// contents (activation buffers are planned per shape and reused across steps).
template <typename T>
class TBuf {
 public:
  TBuf() = default;
  explicit TBuf(TrainBackend* be) : be_(be) {}
  TBuf(const TBuf&) = delete;
  TBuf& operator=(const TBuf&) = delete;
  TBuf(TBuf&& o) noexcept { *this = std::move(o); }
  TBuf& operator=(TBuf&& o) noexcept {
    std::swap(be_, o.be_), std::swap(p_, o.p_), std::swap(n_, o.n_), std::swap(cap_, o.cap_);
    return *this;
  }
  ~TBuf() { release(); }

  void bind(TrainBackend* be) {
    if (be_ != be) release(), be_ = be;
  }
  // Pointer to n elements (uninitialized when the buffer grew).
  T* resize(size_t n) {
    if (n > cap_) {
      release();
      p_ = static_cast<T*>(be_->raw_alloc(n * sizeof(T)));
      cap_ = n;
    }
    n_ = n;
    return p_;
  }
  void clear() { n_ = 0; }
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }

 private:
  void release() {
    if (p_) be_->raw_free(p_);
    p_ = nullptr, n_ = 0, cap_ = 0;
  }
  TrainBackend* be_ = nullptr;
  T* p_ = nullptr;
  size_t n_ = 0, cap_ = 0;
};

}  // namespace dsv3
