#pragma once
// Shared by the CUDA backend tests (test_cuda_*.cpp): the skip when no GPU is present, one CPU and one CUDA
// backend per test binary, and bf16-representable random inputs so both backends compute on identical values.
#include <gtest/gtest.h>

#include <cmath>
#include <utility>

#include "core/dtype.h"
#include "core/rng.h"
#include "ops/backend.h"
#include "test_helpers.h"

#define REQUIRE_CUDA() \
  if (!::dsv3::cuda_available()) GTEST_SKIP() << "no CUDA device"

namespace dsv3::test {

inline Backend& cpu() {
  static auto b = make_cpu_backend();
  return *b;
}
inline Backend& gpu() {
  static auto b = make_cuda_backend(0);
  return *b;
}

// fp32 host tensor of bf16-representable normal values.
inline Tensor rnd(Shape s, double scale, uint64_t seed, const char* name = "x") {
  Tensor t = Tensor::empty(DType::F32, std::move(s), name);
  Rng rng(seed);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = bf16_to_f32(f32_to_bf16(float(rng.normal() * scale)));
  return t;
}
inline Tensor as_dtype(const Tensor& h, DType dt) {
  if (dt == DType::F32) return h.clone();
  Tensor b = Tensor::empty(DType::BF16, h.shape, h.name);
  for (int64_t i = 0; i < h.numel(); ++i) b.ptr<uint16_t>()[i] = f32_to_bf16(h.f32()[i]);
  return b;
}
inline Tensor dev(const Tensor& h, DType dt = DType::BF16) { return gpu().upload(as_dtype(h, dt)); }
// ||got - ref|| / ||ref|| with got read back from be (infinite when got has a non-finite value).
inline double err(Backend& be, const Tensor& got, const Tensor& ref) {
  Tensor g = be.to_host(got);
  EXPECT_EQ(g.numel(), ref.numel());
  for (int64_t i = 0; i < g.numel(); ++i)
    if (!std::isfinite(g.f32()[i])) return INFINITY;
  return rel_err(g.f32(), ref.f32(), ref.numel());
}

}  // namespace dsv3::test
