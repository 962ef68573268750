// FP8 weight products on the CPU: F8E4M3 codes [N, K] with fp32 128x128 block scales (core/fp8.h).
// Decoding a code: e4m3fn shifted into an IEEE half (sign to bit 15, exponent and mantissa to bits 14..7) is
// the same number times 2^-8, subnormals included (e4m3's 2^-9 steps land on half subnormals), so one
// shift + F16C conversion widens 16 codes at a time without a table or a gather; the 2^8 is folded into the
// block scale. Each 128-wide K block is summed on its own and scaled once (the promotion of the FP8 recipe).
#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "core/fp8.h"
#include "ops/cpu/gemm.h"

namespace dsv3::cpu {

namespace {

constexpr float kHalfToE4m3 = 256.f;  // code value = half(code shifted) * 2^8
// Code c in a 16-bit lane: (c << 8) >> 1 (arithmetic) puts the sign in bits 15 and 14 and eeeemmm in bits 13..7;
// the mask clears bit 14, leaving the half s 0eeee mmm0000000 (three integer ops per 8 or 16 codes).
constexpr short kHalfMask = short(0xBF80);

// 8 codes -> 8 floats (value / 256).
inline __m256 codes8(const uint8_t* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(b, 8), 1), _mm_set1_epi16(kHalfMask)));
}

#ifdef __AVX512F__
// 16 codes -> 16 floats (value / 256).
inline __m512 codes16(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_cvtph_ps(_mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(b, 8), 1), _mm256_set1_epi16(kHalfMask)));
}
#endif

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_k value(w[k]) x[k] for one weight row; srow = the row's block scales [tiles(K)].
inline float dot_row_fp8(const uint8_t* w, const float* srow, int64_t K, const float* x) {
  float tail = 0.f;
#ifdef __AVX512F__
  __m512 tot = _mm512_setzero_ps();
#else
  __m256 tot = _mm256_setzero_ps();
#endif
  for (int64_t k0 = 0, kb = 0; k0 < K; k0 += fp8::kTile, ++kb) {
    const int64_t k1 = std::min(K, k0 + fp8::kTile);
    int64_t k = k0;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 32 <= k1; k += 32) {
      a0 = _mm512_fmadd_ps(codes16(w + k), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(codes16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    }
    for (; k + 16 <= k1; k += 16) a0 = _mm512_fmadd_ps(codes16(w + k), _mm512_loadu_ps(x + k), a0);
    tot = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(srow[kb] * kHalfToE4m3), tot);
#else
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; k + 16 <= k1; k += 16) {
      a0 = _mm256_fmadd_ps(codes8(w + k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(codes8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    }
    tot = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(srow[kb] * kHalfToE4m3), tot);
#endif
    float st = 0.f;
    for (; k < k1; ++k) st += fp8::e4m3_to_f32(w[k]) * x[k];
    tail += st * srow[kb];
  }
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(tot) + tail;
#else
  return hsum8(tot) + tail;
#endif
}

// dst[k] = value(w[k]) for one row (code x its block scale).
inline void dequant_row(float* dst, const uint8_t* w, const float* srow, int64_t K) {
  for (int64_t k0 = 0, kb = 0; k0 < K; k0 += fp8::kTile, ++kb) {
    const int64_t k1 = std::min(K, k0 + fp8::kTile);
    const __m256 s = _mm256_set1_ps(srow[kb] * kHalfToE4m3);
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) _mm256_storeu_ps(dst + k, _mm256_mul_ps(codes8(w + k), s));
    for (; k < k1; ++k) dst[k] = fp8::e4m3_to_f32(w[k]) * srow[kb];
  }
}

inline void dot_rows_f32(const float* w, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + m * ldx + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + m * ldx + k + 8), a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; k < K; ++k) s += w[k] * x[m * ldx + k];
    y[m * ldy] = s;
  }
}

}  // namespace

void gemv_rows_fp8(const GemvJob& g, int64_t n0, int64_t n1) {
  const auto* W = static_cast<const uint8_t*>(g.W);
  const int64_t kt = fp8::tiles(g.K);
  if (g.M == 1) {  // decode: the codes stream from memory once, 1 byte per weight
    for (int64_t n = n0; n < n1; ++n) g.y[n] = dot_row_fp8(W + n * g.ldw, g.scale + (n / fp8::kTile) * kt, g.K, g.x);
    return;
  }
  // A few rows of x: each weight row is widened once (into L1) and used for all of them.
  std::vector<float> row(size_t(g.K));
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row(row.data(), W + n * g.ldw, g.scale + (n / fp8::kTile) * kt, g.K);
    dot_rows_f32(row.data(), g.K, g.x, g.ldx, g.M, g.y + n, g.ldy);
  }
}

void dequant_rows_fp8(float* dst, int64_t ld_dst, const uint8_t* W, const float* scale, int64_t K, int64_t n0,
                      int64_t rows) {
  const int64_t kt = fp8::tiles(K);
#pragma omp parallel for schedule(static) if (rows * K > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    dequant_row(dst + r * ld_dst, W + n * K, scale + (n / fp8::kTile) * kt, K);
  }
}

void gemm_xwT_fp8(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint8_t* W, const float* scale,
                  float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (M <= kSmallM) {
    GemvJob j{W, DType::F8E4M3, N, K, K, A, lda, C, ldc, M};
    j.scale = scale;
    gemv_multi({j});
    return;
  }
  // Panels of whole 128-row blocks dequantized to fp32, then threaded sgemm per panel.
  int64_t panel = std::max<int64_t>(128, std::min<int64_t>(N, (int64_t(8) << 20) / std::max<int64_t>(K, 1)));
  panel = (panel + fp8::kTile - 1) / fp8::kTile * fp8::kTile;
  std::vector<float> buf(size_t(std::min(panel, N) * K));
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t nb = std::min(panel, N - n0);
    dequant_rows_fp8(buf.data(), K, W, scale, K, n0, nb);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(nb), int(K), 1.f, A, int(lda), buf.data(), int(K),
                0.f, C + n0, int(ldc));
  }
}

}  // namespace dsv3::cpu
