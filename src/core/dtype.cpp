#include "core/dtype.h"

#include "core/fp8.h"

#include <cmath>

namespace dsv3 {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::F8E4M3: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
    case DType::U32: return 4;
    case DType::I8: return 1;
    case DType::F8E8M0: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8E4M3: return "F8_E4M3";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
    case DType::U32: return "U32";
    case DType::I8: return "I8";
    case DType::F8E8M0: return "F8_E8M0";
  }
  return "?";
}

bool dtype_from_name(std::string_view s, DType* out) {
  static const struct { const char* n; DType t; } table[] = {
      {"F32", DType::F32}, {"BF16", DType::BF16}, {"F16", DType::F16}, {"F8_E4M3", DType::F8E4M3},
      {"I32", DType::I32}, {"I64", DType::I64},   {"U8", DType::U8},   {"U32", DType::U32},
      {"I8", DType::I8},   {"F8_E8M0", DType::F8E8M0}};
  for (auto& e : table)
    if (s == e.n) {
      *out = e.t;
      return true;
    }
  return false;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(float(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(float(man | 0x400), int(exp) - 25);
  return sign ? -v : v;
}

uint16_t f32_to_f16(float f) {
  // Via the F16C-compatible rounding rule (nearest even); used only for tests and writing F16 files.
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  float a = std::fabs(f);
  if (std::isnan(f)) return uint16_t(sign | 0x7e00);
  if (a >= 65520.f) return uint16_t(sign | 0x7c00);
  if (a < 6.103515625e-05f) {  // subnormal: units of 2^-24
    uint32_t m = uint32_t(std::nearbyint(a * 16777216.f));
    return uint16_t(sign | m);
  }
  int e;
  float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5,1)
  uint32_t mant = uint32_t(std::nearbyint((m * 2.f - 1.f) * 1024.f));
  int ex = e - 1 + 15;
  if (mant == 1024) { mant = 0; ++ex; }
  if (ex >= 31) return uint16_t(sign | 0x7c00);
  return uint16_t(sign | (uint32_t(ex) << 10) | mant);
}

float f8e4m3_to_f32(uint8_t v) {
  uint32_t sign = v >> 7, exp = (v >> 3) & 0xf, man = v & 7;
  float r;
  if (exp == 15 && man == 7) return NAN;
  if (exp == 0) r = std::ldexp(float(man), -9);
  else r = std::ldexp(float(man | 8), int(exp) - 10);
  return sign ? -r : r;
}

float f8e8m0_to_f32(uint8_t v) { return v == 255 ? NAN : std::ldexp(1.f, int(v) - 127); }

float fp4e2m1_to_f32(uint8_t code) {
  static const float lut[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
  return lut[code & 15];
}

uint8_t f32_to_f8e4m3(float f) { return fp8::e4m3_from_f32(f); }

void convert_to_f32(DType t, const void* src, float* dst, size_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      auto s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      auto s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F8E4M3: {
      static float table[256];
      static bool init = [] { for (int i = 0; i < 256; ++i) table[i] = f8e4m3_to_f32(uint8_t(i)); return true; }();
      (void)init;
      auto s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      return;
    }
    case DType::F8E8M0: {
      auto s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f8e8m0_to_f32(s[i]);
      return;
    }
    default: break;
  }
  for (size_t i = 0; i < n; ++i) dst[i] = 0;
}

}  // namespace dsv3
