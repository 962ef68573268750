#pragma once
// Row-major GEMM for the training kernels, overloaded on float (sgemm) and double (dgemm, used only by the
// finite-difference tests). C[M, N] = alpha op(A) op(B) + beta C, op = transpose when the flag is set.
// NOTE: the OpenMP build of OpenBLAS runs single-threaded when called inside an OpenMP parallel region, so
// kernels that parallelize over independent blocks (heads, experts) can call it from their loops.
#include <cblas.h>

#include <cstdint>

namespace dsv3::cpu {

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(M), int(N), int(K),
              alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
}
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                 const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(M), int(N), int(K),
              alpha, A, int(lda), B, int(ldb), beta, C, int(ldc));
}

// Linear layer y[M, N] = x[M, K] W[N, K]^T and its backward:
//   dx[M, K] (= or +=) dy[M, N] W[N, K];  dW[N, K] += dy^T x.
template <typename T>
inline void linear_forward(T* y, const T* x, const T* W, int64_t M, int64_t N, int64_t K) {
  gemm(false, true, M, N, K, T(1), x, K, W, K, T(0), y, N);
}
template <typename T>
inline void linear_backward(T* dx, bool dx_accumulate, T* dW, const T* dy, const T* x, const T* W, int64_t M,
                            int64_t N, int64_t K) {
  if (dx) gemm(false, false, M, K, N, T(1), dy, N, W, K, dx_accumulate ? T(1) : T(0), dx, K);
  if (dW) gemm(true, false, N, K, M, T(1), dy, N, x, K, T(1), dW, K);
}

}  // namespace dsv3::cpu
