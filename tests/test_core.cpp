// Core types: dtype conversions against exact values.
#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"
#include "core/tensor.h"

using namespace dsv3;

TEST(DType, Bf16RoundTrip) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-3.5f)), -3.5f);
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even gives 1.
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(DType, Fp8E4M3Values) {
  EXPECT_EQ(f8e4m3_to_f32(0x00), 0.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x38), 1.0f);         // exponent 7 (bias 7), mantissa 0
  EXPECT_EQ(f8e4m3_to_f32(0x7e), 448.0f);       // largest finite
  EXPECT_EQ(f8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0x7f)));
  for (int c = 0; c < 0x7f; ++c) EXPECT_EQ(f32_to_f8e4m3(f8e4m3_to_f32(uint8_t(c))), c);
  EXPECT_EQ(f32_to_f8e4m3(1000.f), 0x7e);       // saturates
}

TEST(DType, F16Values) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  for (uint16_t h : {0x3c00, 0x1234, 0x0001, 0x7bff, 0x8400}) EXPECT_EQ(f32_to_f16(f16_to_f32(h)), h);
}

TEST(Tensor, ReshapeAndRows) {
  Tensor t = Tensor::zeros(DType::F32, {4, 3}, "t");
  t.f32()[3] = 7;
  Tensor r = t.rows(1, 3);
  EXPECT_EQ(r.shape, (Shape{2, 3}));
  EXPECT_EQ(r.f32()[0], 7);
  EXPECT_THROW(t.reshape({5, 2}), InputError);
  EXPECT_THROW(t.check_shape({3, 4}), InputError);
}
