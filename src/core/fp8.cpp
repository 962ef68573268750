#include "core/fp8.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dtype.h"

namespace dsv3::fp8 {

float e4m3_to_f32(uint8_t c) {
  static const auto table = [] {
    std::vector<float> t(256);
    for (int i = 0; i < 256; ++i) t[size_t(i)] = f8e4m3_to_f32(uint8_t(i));
    return t;
  }();
  return table[c];
}

void quantize_1x128(uint8_t* codes, float* scales, const float* x, int64_t M, int64_t K, int64_t ldx) {
  const int64_t kt = tiles(K);
#pragma omp parallel for schedule(static) if (M * K > 65536)
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * ldx;
    for (int64_t t = 0; t < kt; ++t) {
      const int64_t k0 = t * kTile, k1 = std::min(K, k0 + kTile);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float s = scale_from_amax(amax);
      scales[m * kt + t] = s;
      for (int64_t k = k0; k < k1; ++k) codes[m * K + k] = e4m3_from_f32(row[k] / s);
    }
  }
}

void quantize_128x128(uint8_t* codes, float* scales, const float* w, int64_t N, int64_t K) {
  const int64_t nt = tiles(N), kt = tiles(K);
#pragma omp parallel for collapse(2) schedule(static) if (N * K > 65536)
  for (int64_t bn = 0; bn < nt; ++bn)
    for (int64_t bk = 0; bk < kt; ++bk) {
      const int64_t n0 = bn * kTile, n1 = std::min(N, n0 + kTile), k0 = bk * kTile, k1 = std::min(K, k0 + kTile);
      float amax = 0.f;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(w[n * K + k]));
      const float s = scale_from_amax(amax);
      scales[bn * kt + bk] = s;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = k0; k < k1; ++k) codes[n * K + k] = e4m3_from_f32(w[n * K + k] / s);
    }
}

void quantize_128x1(uint8_t* codes, float* scales, const float* x, int64_t M, int64_t K) {
  const int64_t mt = tiles(M);
#pragma omp parallel for schedule(static) if (M * K > 65536)
  for (int64_t t = 0; t < mt; ++t) {
    const int64_t m0 = t * kTile, m1 = std::min(M, m0 + kTile);
    std::vector<float> amax(size_t(K), 0.f);
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k) amax[size_t(k)] = std::max(amax[size_t(k)], std::fabs(x[m * K + k]));
    for (int64_t k = 0; k < K; ++k) scales[t * K + k] = scale_from_amax(amax[size_t(k)]);
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k) codes[m * K + k] = e4m3_from_f32(x[m * K + k] / scales[t * K + k]);
  }
}

void dequantize_1x128(float* x, const uint8_t* codes, const float* scales, int64_t M, int64_t K) {
  const int64_t kt = tiles(K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x[m * K + k] = e4m3_to_f32(codes[m * K + k]) * scales[m * kt + k / kTile];
}

void dequantize_128x128(float* w, const uint8_t* codes, const float* scales, int64_t N, int64_t K) {
  const int64_t kt = tiles(K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      w[n * K + k] = e4m3_to_f32(codes[n * K + k]) * scales[(n / kTile) * kt + k / kTile];
}

void dequantize_128x1(float* x, const uint8_t* codes, const float* scales, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x[m * K + k] = e4m3_to_f32(codes[m * K + k]) * scales[(m / kTile) * K + k];
}

void round_trip_1x128(float* x, int64_t M, int64_t K, int64_t ldx) {
  const int64_t kt = tiles(K);
#pragma omp parallel for schedule(static) if (M * K > 65536)
  for (int64_t m = 0; m < M; ++m) {
    float* row = x + m * ldx;
    for (int64_t t = 0; t < kt; ++t) {
      const int64_t k0 = t * kTile, k1 = std::min(K, k0 + kTile);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float s = scale_from_amax(amax);
      for (int64_t k = k0; k < k1; ++k) row[k] = e4m3_to_f32(e4m3_from_f32(row[k] / s)) * s;
    }
  }
}

void round_trip_128x128(float* w, int64_t N, int64_t K) {
  std::vector<uint8_t> c(size_t(N * K));
  std::vector<float> s(size_t(tiles(N) * tiles(K)));
  quantize_128x128(c.data(), s.data(), w, N, K);
  dequantize_128x128(w, c.data(), s.data(), N, K);
}

void round_trip_128x1(float* x, int64_t M, int64_t K, int64_t ldx) {
  const int64_t mt = tiles(M);
#pragma omp parallel for schedule(static) if (M * K > 65536)
  for (int64_t t = 0; t < mt; ++t) {
    const int64_t m0 = t * kTile, m1 = std::min(M, m0 + kTile);
    std::vector<float> amax(size_t(K), 0.f);
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k) amax[size_t(k)] = std::max(amax[size_t(k)], std::fabs(x[m * ldx + k]));
    for (int64_t k = 0; k < K; ++k) amax[size_t(k)] = scale_from_amax(amax[size_t(k)]);
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k)
        x[m * ldx + k] = e4m3_to_f32(e4m3_from_f32(x[m * ldx + k] / amax[size_t(k)])) * amax[size_t(k)];
  }
}

}  // namespace dsv3::fp8
