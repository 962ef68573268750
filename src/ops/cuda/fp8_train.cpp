#include "ops/cuda/fp8_train.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "core/fp8.h"

namespace dsv3::cuda {

namespace {

int as_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) fail("FP8 training products: {} = {} does not fit an int", what, v);
  return int(v);
}
int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

}  // namespace

Fp8TrainProducts::Fp8TrainProducts(DeviceContext& ctx) : ctx_(ctx) {
  const char* e = std::getenv("DSV3_CUDA_FP8_TRAIN");
  dequant_ = e && std::string(e) == "dequant";
}

Fp8TrainProducts::~Fp8TrainProducts() {
  cudaStreamSynchronize(ctx_.stream);
  for (Block& b : slots_)
    if (b.p) ctx_.alloc.release(b.p, b.rounded);
}

// Grown on demand; a released block may be handed out again to later work on the same stream (device.h), so a
// slot's old contents must not be needed once it grows.
void* Fp8TrainProducts::slot(Slot s, size_t bytes) {
  Block& b = slots_[s];
  bytes = std::max<size_t>(bytes, 16);
  if (bytes > b.bytes) {
    if (b.p) ctx_.alloc.release(b.p, b.rounded);
    b.p = nullptr;
    b.p = ctx_.alloc.alloc(bytes, &b.rounded);
    b.bytes = bytes;
  }
  return b.p;
}

void Fp8TrainProducts::forward(const std::vector<int64_t>& offsets, const float* A, int64_t K, int64_t N,
                               const std::vector<std::pair<float*, const float*>>& outs) {
  DSV3_CHECK(!offsets.empty() && outs.size() <= 2, "Fp8TrainProducts::forward: {} outputs", outs.size());
  const int64_t E = int64_t(offsets.size()) - 1, R = offsets[E];
  if (R <= 0 || N <= 0 || K <= 0) return;
  const int64_t tk = fp8::tiles(K), tn = fp8::tiles(N);
  uint8_t* Aq = take<uint8_t>(kAq, size_t(R * K));
  float* As = take<float>(kAs, size_t(R * tk));
  quantize_1x128(Aq, As, 0, A, DType::F32, K, R, K, ctx_.stream);
  std::vector<Fp8Problem> probs;
  for (size_t j = 0; j < outs.size(); ++j) {
    uint8_t* Wq = take<uint8_t>(j ? kW1q : kW0q, size_t(E * N * K));
    float* Ws = take<float>(j ? kW1s : kW0s, size_t(E * tn * tk));
    quantize_128x128(Wq, Ws, outs[j].second, DType::F32, N, K, E, ctx_.stream);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = offsets[e], n = offsets[e + 1] - o;
      if (n <= 0) continue;
      probs.push_back({Aq + o * K, As + o * tk, Wq + e * N * K, Ws + e * tn * tk, outs[j].first + o * N,
                       as_int(n, "rows"), as_int(N, "N"), as_int(K, "K"), as_int(K, "lda"), as_int(K, "ldb"),
                       as_int(N, "ldc"), int(tk), int(tk), 1, 0, 0});
    }
  }
  run(probs);
}

void Fp8TrainProducts::backward(const std::vector<int64_t>& offsets, float* dA, bool dA_accumulate, float* dW,
                                const float* dC, const float* A, const float* W, int64_t K, int64_t N) {
  DSV3_CHECK(!offsets.empty(), "Fp8TrainProducts::backward: no segments");
  const int64_t E = int64_t(offsets.size()) - 1, R = offsets[E];
  if (R <= 0 || N <= 0 || K <= 0) return;
  const int64_t tk = fp8::tiles(K), tn = fp8::tiles(N);
  const cudaStream_t st = ctx_.stream;
  split_ = 1;
  // Every quantization first (dA may alias A), then the products.
  std::vector<Fp8Problem> dgrad, wgrad;
  if (dA) {
    // dA_e = q1x128(dC_e) (W_e^T)^T with W_e^T [K, N] in 128x128 blocks: contraction over N.
    uint8_t* Cq = take<uint8_t>(kAq, size_t(R * N));
    float* Cs = take<float>(kAs, size_t(R * tn));
    uint8_t* WTq = take<uint8_t>(kW0q, size_t(E * N * K));
    float* WTs = take<float>(kW0s, size_t(E * tk * tn));
    quantize_1x128(Cq, Cs, 0, dC, DType::F32, N, R, N, st);
    quantize_128x128_t(WTq, WTs, W, N, K, E, st);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = offsets[e], n = offsets[e + 1] - o;
      if (n <= 0) continue;
      dgrad.push_back({Cq + o * N, Cs + o * tn, WTq + e * K * N, WTs + e * tk * tn, dA + o * K, as_int(n, "rows"),
                       as_int(K, "K"), as_int(N, "N"), as_int(N, "lda"), as_int(N, "ldb"), as_int(K, "ldc"), int(tn),
                       int(tn), 1, dA_accumulate ? 1 : 0, 0});
    }
  }
  if (dW) {
    // Segment e's rows become columns [po_e, po_e + round16(n_e)) of dC^T [N, P] and A^T [K, P]; its 128-row tiles
    // get scale columns [ts_e, ts_e + tiles(n_e)) of [N, T] and [K, T].
    tiles_.clear();
    std::vector<int64_t> po(size_t(E) + 1, 0), ts(size_t(E) + 1, 0);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t o = offsets[e], n = offsets[e + 1] - o;
      po[e + 1] = po[e] + round16(std::max<int64_t>(n, 0));
      ts[e + 1] = ts[e] + fp8::tiles(std::max<int64_t>(n, 0));
      for (int64_t j = 0; j * 128 < n; ++j)
        tiles_.push_back({as_int(o + 128 * j, "row"), int(std::min<int64_t>(128, n - 128 * j)),
                          as_int(po[e] + 128 * j, "column"), as_int(ts[e] + j, "tile")});
    }
    const int64_t P = po[E], T = ts[E];
    auto* dtiles = take<ColTile>(kTiles, tiles_.size());
    DSV3_CUDA_CHECK(cudaMemcpyAsync(dtiles, tiles_.data(), tiles_.size() * sizeof(ColTile), cudaMemcpyHostToDevice, st));
    uint8_t* Ctq = take<uint8_t>(kCtq, size_t(N * P));
    float* Cts = take<float>(kCts, size_t(N * T));
    uint8_t* Atq = take<uint8_t>(kAtq, size_t(K * P));
    float* Ats = take<float>(kAts, size_t(K * T));
    quantize_128x1_t(Ctq, P, Cts, T, dC, N, N, dtiles, int64_t(tiles_.size()), st);
    quantize_128x1_t(Atq, P, Ats, T, A, K, K, dtiles, int64_t(tiles_.size()), st);
    // Split along the tokens when the output tiles would not fill the GPU twice over (one segment only: the
    // experts' many segments already give enough tiles). Chunks are whole 128-token tiles.
    const int64_t out_tiles = fp8::tiles(N) * fp8::tiles(K);
    int S = 1;
    if (E == 1 && !dequant_) {
      const int64_t want = 2 * int64_t(ctx_.prop.multiProcessorCount);
      while (S < 8 && out_tiles * S * 2 <= want && fp8::tiles(R) >= 4 * S * 2) S *= 2;
    }
    split_ = S;
    float* parts = S > 1 ? take<float>(kParts, size_t(S) * size_t(N * K)) : nullptr;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t kp = po[e + 1] - po[e];
      if (kp <= 0) continue;
      const int64_t chunk = S > 1 ? (fp8::tiles(kp) + S - 1) / S * 128 : kp;
      for (int j = 0; j * chunk < kp; ++j) {
        const int64_t c0 = j * chunk, cn = std::min(chunk, kp - c0);
        Fp8Problem p{Ctq + po[e] + c0, Cts + ts[e] + c0 / 128, Atq + po[e] + c0, Ats + ts[e] + c0 / 128,
                     S > 1 ? parts + j * N * K : dW + e * N * K, as_int(N, "N"), as_int(K, "K"), as_int(cn, "rows"),
                     as_int(P, "P"), as_int(P, "P"), as_int(K, "ldc"), as_int(T, "T"), as_int(T, "T"), 1,
                     S > 1 ? 0 : 1, 0};
        p.b_rows = 1;
        wgrad.push_back(p);
      }
      if (S > 1) {  // chunks past the end (kp smaller than S chunks) leave their partial unwritten: zero it
        const int written = int((kp + chunk - 1) / chunk);
        if (written < S)
          DSV3_CUDA_CHECK(cudaMemsetAsync(parts + written * N * K, 0, size_t(S - written) * N * K * 4, st));
      }
    }
  }
  run(dgrad);
  run(wgrad);
  if (split_ > 1) add_partials(dW, take<float>(kParts, size_t(split_) * size_t(N * K)), N * K, split_, ctx_.stream);
}

void Fp8TrainProducts::run(std::vector<Fp8Problem>& probs) {
  probs.erase(std::remove_if(probs.begin(), probs.end(), [](const Fp8Problem& p) { return p.M <= 0 || p.N <= 0; }),
              probs.end());
  if (probs.empty()) return;
  const bool kernel = !dequant_ && std::all_of(probs.begin(), probs.end(), fp8_problem_ok);
  if (kernel) {
    auto* dev = take<Fp8Problem>(kProbs, probs.size());
    fp8_grouped_gemm(probs, dev, ctx_.stream);
    return;
  }
  // fp32 reference path: each operand dequantized exactly, C (+)= A B^T on cuBLAS without reduced precision
  // (row-major C [M, N] is column-major C^T = B A^T).
  DSV3_CUDA_CHECK(cudaSetDevice(ctx_.dev));
  for (const Fp8Problem& p : probs) {
    float* a = take<float>(kDeqA, size_t(p.M) * p.K);
    float* b = take<float>(kDeqB, size_t(p.N) * p.K);
    dequantize_operand(a, p.A, p.lda, p.sa, p.lds_a, p.M, p.K, 1, ctx_.stream);
    dequantize_operand(b, p.B, p.ldb, p.sb, p.lds_b, p.N, p.K, p.b_rows ? 1 : 128, ctx_.stream);
    DSV3_CHECK(p.c_f32, "Fp8TrainProducts: fp32 outputs only");
    const float one = 1.f, beta = p.accumulate ? 1.f : 0.f;
    DSV3_CUBLAS_CHECK(cublasGemmEx(ctx_.blas, CUBLAS_OP_T, CUBLAS_OP_N, p.N, p.M, p.K, &one, b, CUDA_R_32F, p.K, a,
                                   CUDA_R_32F, p.K, &beta, p.C, CUDA_R_32F, p.ldc, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
  }
}

}  // namespace dsv3::cuda
