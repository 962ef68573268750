// The CPU training backend: every TrainBackend op forwards to the float instantiation of the reference
// kernels (ops/cpu/train_ops.h, ops/cpu/blas.h), so training through the backend is bit-identical to calling
// them directly. Memory is ordinary 64-byte-aligned host memory; the optimizer loops live here.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "ops/cpu/blas.h"
#include "ops/cpu/fp8_linear.h"
#include "ops/cpu/train_ops.h"
#include "ops/train_backend.h"

namespace dsv3 {

namespace {

struct CpuMoeState : MoeSavedState {
  cpu::MoeSaved<float> s;
};

cpu::MoeSaved<float>& saved(MoeSavedState& s) { return static_cast<CpuMoeState&>(s).s; }

class CpuTrainBackend : public TrainBackend {
 public:
  std::string name() const override { return "cpu"; }
  bool is_host() const override { return true; }

  void* raw_alloc(size_t bytes) override {
    const size_t align = 64, n = std::max<size_t>((bytes + align - 1) / align * align, align);
    void* p = std::aligned_alloc(align, n);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void raw_free(void* p) override { std::free(p); }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes && dst != src) std::memcpy(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes && dst != src) std::memcpy(dst, src, bytes);
  }
  void fill(float* x, float value, int64_t n) override { std::fill_n(x, n, value); }
  void copy(float* dst, const float* src, int64_t n) override {
    if (n > 0 && dst != src) std::memcpy(dst, src, size_t(n) * sizeof(float));
  }
  void copy_2d(float* dst, int64_t ds, const float* src, int64_t ss, int64_t rows, int64_t cols,
               bool accumulate) override {
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
      float* d = dst + r * ds;
      const float* s = src + r * ss;
      if (accumulate)
        for (int64_t c = 0; c < cols; ++c) d[c] += s[c];
      else
        std::copy_n(s, cols, d);
    }
  }
  void gather_rows(float* dst, const float* src, const int32_t* rows, int64_t n, int64_t H, bool accumulate) override {
#pragma omp parallel for schedule(static) if (n * H > (1 << 16))
    for (int64_t i = 0; i < n; ++i) {
      const float* s = src + int64_t(rows[i]) * H;
      float* d = dst + i * H;
      if (accumulate)
        for (int64_t j = 0; j < H; ++j) d[j] += s[j];
      else
        std::copy_n(s, H, d);
    }
  }
  void add(float* y, const float* x, int64_t n) override {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }

  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) override {
    cpu::gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }

  void rmsnorm_forward(float* out, float* rstd, const float* x, int64_t xs, const float* w, int64_t N, int64_t D,
                       double eps) override {
    cpu::rmsnorm_forward(out, rstd, x, xs, w, N, D, eps);
  }
  void rmsnorm_backward(float* dx, int64_t dxs, float* dw, const float* dout, const float* x, int64_t xs,
                        const float* rstd, const float* w, int64_t N, int64_t D) override {
    cpu::rmsnorm_backward(dx, dxs, dw, dout, x, xs, rstd, w, N, D);
  }
  void rope_forward(float* x, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
                    const float* cos, const float* sin, bool interleave) override {
    cpu::rope_forward(x, N, n, stride, off, dr, pos, cos, sin, interleave);
  }
  void rope_backward(float* dx, int64_t N, int64_t n, int64_t stride, int64_t off, int64_t dr, const int32_t* pos,
                     const float* cos, const float* sin, bool interleave) override {
    cpu::rope_backward(dx, N, n, stride, off, dr, pos, cos, sin, interleave);
  }
  void swiglu_forward(float* out, const float* g, const float* u, int64_t n) override {
    cpu::swiglu_forward(out, g, u, n);
  }
  void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u, int64_t n) override {
    cpu::swiglu_backward(dg, du, dout, g, u, n);
  }
  void embedding_forward(float* out, const float* table, const int32_t* ids, int64_t N, int64_t H) override {
    cpu::embedding_forward(out, table, ids, N, H);
  }
  void embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t N, int64_t H) override {
    cpu::embedding_backward(dtable, dout, ids, N, H);
  }
  double cross_entropy_forward_backward(float* dlogits, const float* logits, const int32_t* targets, int64_t N,
                                        int64_t V, double scale, int64_t* correct) override {
    // The kernel stores its count; the interface adds it (head_loss sums over row chunks).
    int64_t c = 0;
    const double s = cpu::cross_entropy_forward_backward(dlogits, logits, targets, N, V, scale, &c);
    if (correct) *correct += c;
    return s;
  }
  void attention_forward(float* out, float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                         int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv, double scale) override {
    cpu::attention_forward(out, lse, q, kv, kpe, B, Tq, nh, dn, dr, dv, scale);
  }
  void attention_backward(float* dq, float* dkv, float* dkpe, const float* dout, const float* out, const float* lse,
                          const float* q, const float* kv, const float* kpe, int64_t B, int64_t Tq, int64_t nh,
                          int64_t dn, int64_t dr, int64_t dv, double scale) override {
    cpu::attention_backward(dq, dkv, dkpe, dout, out, lse, q, kv, kpe, B, Tq, nh, dn, dr, dv, scale);
  }
  void attention_forward_sel(float* out, float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                             int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv, double scale,
                             const int32_t* sel, int64_t K) override {
    cpu::attention_forward(out, lse, q, kv, kpe, B, Tq, nh, dn, dr, dv, scale, sel, K);
  }
  void attention_backward_sel(float* dq, float* dkv, float* dkpe, const float* dout, const float* out,
                              const float* lse, const float* q, const float* kv, const float* kpe, int64_t B,
                              int64_t Tq, int64_t nh, int64_t dn, int64_t dr, int64_t dv, double scale,
                              const int32_t* sel, int64_t K) override {
    cpu::attention_backward(dq, dkv, dkpe, dout, out, lse, q, kv, kpe, B, Tq, nh, dn, dr, dv, scale, sel, K);
  }

  void route_forward(int32_t* idx, float* w, float* scores, const float* logits, const float* bias, int64_t N,
                     const RouteParams& p) override {
    cpu::route_forward(idx, w, scores, logits, bias, N, p);
  }
  void route_backward(float* dlogits, const float* dw, const float* dscores_extra, const float* scores,
                      const int32_t* idx, int64_t N, const RouteParams& p) override {
    cpu::route_backward(dlogits, dw, dscores_extra, scores, idx, N, p);
  }
  double balance_loss(float* dscores, const float* scores, const int32_t* idx, int64_t B, int64_t Tq, int64_t E,
                      int64_t K, double alpha, double grad_scale) override {
    return cpu::balance_loss(dscores, scores, idx, B, Tq, E, K, alpha, grad_scale);
  }
  void count_experts(std::vector<int64_t>& load, const int32_t* idx, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) load[idx[i]]++;
  }
  std::unique_ptr<MoeSavedState> new_moe_state() override { return std::make_unique<CpuMoeState>(); }
  void experts_forward(float* out, MoeSavedState& s, const float* x, const int32_t* idx, const float* w,
                       const float* Wg, const float* Wu, const float* Wd, int64_t N, int64_t K, int64_t H, int64_t I,
                       int64_t E) override {
    cpu::experts_forward(out, saved(s), x, idx, w, Wg, Wu, Wd, N, K, H, I, E, precision() == Precision::FP8);
  }
  void experts_backward(float* dx, float* dw, float* dWg, float* dWu, float* dWd, const float* dout,
                        MoeSavedState& s, const float* x, const int32_t* idx, const float* w, const float* Wg,
                        const float* Wu, const float* Wd, int64_t N, int64_t K, int64_t H, int64_t I,
                        int64_t E) override {
    cpu::experts_backward(dx, dw, dWg, dWu, dWd, dout, saved(s), x, idx, w, Wg, Wu, Wd, N, K, H, I, E,
                          precision() == Precision::FP8);
  }

  void fp8_linear_forward(float* y, const float* x, const float* W, int64_t M, int64_t N, int64_t K) override {
    cpu::fp8_linear_forward(y, x, W, M, N, K);
  }
  void fp8_linear_backward(float* dx, bool dx_accumulate, float* dW, const float* dy, const float* x, const float* W,
                           int64_t M, int64_t N, int64_t K) override {
    cpu::fp8_linear_backward(dx, dx_accumulate, dW, dy, x, W, M, N, K);
  }

  // fp64 partial sums over fixed 64K-element chunks, added in chunk order: independent of the thread count.
  double sum_squares(const float* x, int64_t n) override {
    const int64_t chunk = 1 << 16, nc = (n + chunk - 1) / chunk;
    std::vector<double> part(nc, 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nc; ++c) {
      double s = 0;
      for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) s += double(x[i]) * x[i];
      part[c] = s;
    }
    double s = 0;
    for (double p : part) s += p;
    return s;
  }
  // PyTorch's AdamW: p *= 1 - lr wd (decay); m, v updated; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
  void adamw_update(float* params, const float* grads, float* M, float* Vv, int64_t offset, int64_t n, float b1,
                    float b2, float eps, float gs, float decay, float step_size, float inv_sqrt_bc2) override {
#pragma omp parallel for schedule(static)
    for (int64_t i = offset; i < offset + n; ++i) {
      const float g = grads[i] * gs;
      const float mi = b1 * M[i] + (1.f - b1) * g;
      const float vi = b2 * Vv[i] + (1.f - b2) * g * g;
      M[i] = mi;
      Vv[i] = vi;
      params[i] = params[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
    }
  }
};

}  // namespace

std::unique_ptr<TrainBackend> make_cpu_train_backend() { return std::make_unique<CpuTrainBackend>(); }

}  // namespace dsv3
