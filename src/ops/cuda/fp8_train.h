#pragma once
// The FP8 products of DeepSeek-V3's training recipe on one GPU (TrainBackend::fp8_linear_* and the routed experts
// under --precision fp8), the same math as the CPU emulation (ops/cpu/fp8_linear.h): fp32 operands are quantized
// with the recipe's tiles (fp8.h's kernels, bit-identical to core/fp8.h) and multiplied by fp8_grouped_gemm
// (e4m3 tensor cores, fp32 promotion every 128 of K), fp32 results:
//   Fprop  C[r, N]  = q1x128(A)[r, K] q128x128(W)[N, K]^T
//   Dgrad  dA[r, K] (= or +=) q1x128(dC)[r, N] q128x128(W)[N, K]      (W^T's codes: the same blocks, transposed)
//   Wgrad  dW[N, K] += q128x1(dC)^T q128x1(A)                          (tiles of 128 rows of one segment)
// A product runs over segments of rows: segment e (rows offsets[e] .. offsets[e + 1]) multiplies matrix e of
// W [E, N, K] (the routed experts in sorted order; a dense layer is one segment). The Wgrad operands of each segment
// are quantized from its first row, as the CPU does per expert, into transposed code buffers whose segments start
// at multiples of 16 columns (zero-padded): the contraction of the product is then always a multiple of 16.
// A Wgrad with few output tiles (a dense layer: [out, in] tiles over thousands of tokens) is split along the
// tokens at 128-token tile boundaries into partial products summed in a fixed order (add_partials), so the
// GPU's SMs all take part and the result stays deterministic.
// The tensor-core kernel needs the contraction of Fprop (K) and Dgrad (N) to be a multiple of 16; other shapes, and
// every shape with DSV3_CUDA_FP8_TRAIN=dequant, multiply the same codes dequantized to fp32 with cuBLAS in fp32
// (the reference path the tests compare the kernel with).
#include <cstdint>
#include <utility>
#include <vector>

#include "ops/cuda/device.h"
#include "ops/cuda/fp8.h"

namespace dsv3::cuda {

class Fp8TrainProducts {
 public:
  explicit Fp8TrainProducts(DeviceContext& ctx);
  ~Fp8TrainProducts();
  Fp8TrainProducts(const Fp8TrainProducts&) = delete;
  Fp8TrainProducts& operator=(const Fp8TrainProducts&) = delete;

  // Fprop of one or two products sharing A [rows, K] (quantized once): outs[j].first [rows, N] = product with
  // the weights outs[j].second [E, N, K]. offsets: host [E + 1], offsets[E] = rows.
  void forward(const std::vector<int64_t>& offsets, const float* A, int64_t K, int64_t N,
               const std::vector<std::pair<float*, const float*>>& outs);
  // Backward of C = A W^T (dA or dW may be null). dA may alias A: every operand is quantized before any product.
  void backward(const std::vector<int64_t>& offsets, float* dA, bool dA_accumulate, float* dW, const float* dC,
                const float* A, const float* W, int64_t K, int64_t N);

 private:
  enum Slot { kAq, kAs, kW0q, kW0s, kW1q, kW1s, kTiles, kCtq, kCts, kAtq, kAts, kProbs, kDeqA, kDeqB, kParts, kNumSlots };
  void* slot(Slot s, size_t bytes);
  template <typename T>
  T* take(Slot s, size_t n) {
    return static_cast<T*>(slot(s, n * sizeof(T)));
  }
  // Runs problems of one kind: on the tensor-core kernel, or dequantized through cuBLAS fp32.
  void run(std::vector<Fp8Problem>& probs);

  DeviceContext& ctx_;
  bool dequant_ = false;  // DSV3_CUDA_FP8_TRAIN=dequant
  int split_ = 1;         // the last Wgrad's split along the tokens
  struct Block {
    void* p = nullptr;
    size_t bytes = 0, rounded = 0;
  };
  Block slots_[kNumSlots];
  std::vector<ColTile> tiles_;
};

}  // namespace dsv3::cuda
