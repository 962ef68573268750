#pragma once
// Element types of stored tensors and the exact conversions to fp32 that the CPU reference path uses.
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace dsv3 {

enum class DType : uint8_t { F32, BF16, F16, F8E4M3, I32, I64, U8, U32 };

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

// Convert n elements of any float dtype to fp32.
void convert_to_f32(DType t, const void* src, float* dst, size_t n);

}  // namespace dsv3
