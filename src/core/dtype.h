#pragma once
// Element types of stored tensors and the exact conversions to fp32 that the CPU reference path uses.
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace dsv3 {

// I8 holds packed FP4 (e2m1) pairs in DeepSeek-V4 checkpoints; F8E8M0 is the UE8M0 power-of-two scale byte.
enum class DType : uint8_t { F32, BF16, F16, F8E4M3, I32, I64, U8, U32, I8, F8E8M0 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);           // safetensors spelling: "F32", "BF16", "F8_E4M3", ...
bool dtype_from_name(std::string_view s, DType* out);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
// E4M3 "fn" (no infinities, 0x7f/0xff are NaN, max 448), as torch.float8_e4m3fn.
float f8e4m3_to_f32(uint8_t v);
uint8_t f32_to_f8e4m3(float f);  // round to nearest even, saturating at +-448

// UE8M0 scale byte b: 2^(b - 127) exactly; b = 255 is NaN.
float f8e8m0_to_f32(uint8_t v);
// FP4 e2m1 code (low 4 bits): 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives (bit 3 is the sign).
float fp4e2m1_to_f32(uint8_t code);

// Convert n elements of any float dtype (F8E8M0 included) to fp32.
void convert_to_f32(DType t, const void* src, float* dst, size_t n);

}  // namespace dsv3
