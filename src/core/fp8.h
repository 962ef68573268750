#pragma once
// FP8 block-scaled quantization, the DeepSeek-V3 recipe (E4M3 "fn" everywhere, scales from max |x| per tile):
//   activations  1x128 tiles  (per row, per 128 columns of K)     scales [M, ceil(K/128)]
//   weights      128x128 blocks                                  scales [ceil(N/128), ceil(K/128)]
//   transposed   128x1 tiles  (per column, per 128 rows)         scales [ceil(M/128), K]   (Wgrad operands)
//   scale = max(amax / 448, 2^-126) (fp32), code = e4m3(x / scale) rounded to nearest even and saturated to +-448;
//   value = code * scale (the hub's `weight_scale_inv` is this scale). A tile of zeros gets scale 1.
// These functions are the specification: the CUDA kernels compute bit-identical codes and scales (IEEE fp32
// division and the hardware's round-to-nearest-even satfinite conversion), and tests compare them.
// Partial edge tiles (K or N not a multiple of 128) take their amax over the elements that exist.
#include <cstdint>
#include <cstring>

namespace dsv3::fp8 {

inline constexpr int64_t kTile = 128;
inline constexpr float kMax = 448.f;

// The smallest scale: FLT_MIN (2^-126). For amax below 448 x 2^-126 (~5e-36; gradients reach such tiles)
// amax / 448 is a denormal or rounds to 0, and a zero scale would make x / scale infinite, or NaN for the tile's
// zeros (0 / 0). A normal scale keeps every code finite: such a tile's values are far below its smallest code and
// quantize to 0 (or the smallest codes).
inline constexpr float kMinScale = 1.17549435e-38f;

inline int64_t tiles(int64_t n) { return (n + kTile - 1) / kTile; }
inline float scale_from_amax(float amax) {
  if (!(amax > 0.f)) return 1.f;
  const float s = amax / kMax;
  return s < kMinScale ? kMinScale : s;
}

// Round-to-nearest-even fp32 -> e4m3fn with saturation to +-448 (NaN -> 0x7f), exactly what
// cvt.rn.satfinite.e4m3x2.f32 does; bit manipulation, so it is usable on hot paths.
inline uint8_t e4m3_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7f;          // NaN
  if (a >= 0x43e00000u) return sign | 0x7e;  // |f| >= 448 (and inf): saturate
  if (a < 0x3c800000u) {                     // |f| < 2^-6: subnormal codes, step 2^-9
    float af;
    std::memcpy(&af, &a, 4);
    // af * 512 is exact; the conversion rounds half to even like the hardware (default FP environment).
    const float m = af * 512.f;
    uint32_t q = uint32_t(m);
    const float rem = m - float(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    return sign | uint8_t(q);  // q == 8 is exactly the smallest normal code
  }
  // Normal: keep 3 mantissa bits with round-to-nearest-even on the 20 dropped bits, rebias 127 -> 7.
  const uint32_t r = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;  // (exp8 << 3) | man3, carry included
  return sign | uint8_t(r - ((127u - 7u) << 3));
}

// e4m3fn -> fp32 through a 256-entry table.
float e4m3_to_f32(uint8_t c);

// x [M, K] with leading dimension ldx -> codes [M, K] (dense), scales [M, tiles(K)].
void quantize_1x128(uint8_t* codes, float* scales, const float* x, int64_t M, int64_t K, int64_t ldx);
// w [N, K] -> codes [N, K], scales [tiles(N), tiles(K)].
void quantize_128x128(uint8_t* codes, float* scales, const float* w, int64_t N, int64_t K);
// x [M, K] -> codes [M, K], scales [tiles(M), K]: each column quantized in tiles of 128 rows.
void quantize_128x1(uint8_t* codes, float* scales, const float* x, int64_t M, int64_t K);

// The inverses (value = code * scale), into fp32 [rows, K] dense.
void dequantize_1x128(float* x, const uint8_t* codes, const float* scales, int64_t M, int64_t K);
void dequantize_128x128(float* w, const uint8_t* codes, const float* scales, int64_t N, int64_t K);
void dequantize_128x1(float* x, const uint8_t* codes, const float* scales, int64_t M, int64_t K);

// Quantize-then-dequantize in place ("fake quantization"): what an FP8 operand holds, in fp32.
void round_trip_1x128(float* x, int64_t M, int64_t K, int64_t ldx);
void round_trip_128x128(float* w, int64_t N, int64_t K);
void round_trip_128x1(float* x, int64_t M, int64_t K, int64_t ldx);

}  // namespace dsv3::fp8
