// Conversions of checkpoint tensors into a flat parameter buffer in CPU memory: the loader's host path and the
// defaults of Backend::write_weights / write_weights_fp8 (see backend.h). Device backends override both.
#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "ops/backend.h"

namespace dsv3 {

void check_weight_dest(const Tensor& flat, int64_t offset, int64_t n) {
  if (flat.dtype != DType::F32 && flat.dtype != DType::BF16)
    fail("write_weights: {} must be F32 or BF16, got {}", flat.name, dtype_name(flat.dtype));
  if (offset < 0 || n < 0 || offset + n > flat.numel())
    fail("write_weights: [{}, {}) is outside {} of {} elements", offset, offset + n, flat.name, flat.numel());
}

namespace {

void check_host_dest(const Tensor& flat, int64_t offset, int64_t n) {
  if (flat.device != Device::CPU) fail("write_weights: {} is not in host memory", flat.name);
  check_weight_dest(flat, offset, n);
}

void store_f32(Tensor& flat, int64_t offset, const float* v, int64_t n) {
  if (flat.dtype == DType::F32) {
    std::copy(v, v + n, flat.ptr<float>() + offset);
  } else {
    uint16_t* d = flat.ptr<uint16_t>() + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(v[i]);
  }
}

}  // namespace

void write_weights_host(Tensor& flat, int64_t offset, const void* src, DType src_dt, int64_t n) {
  check_host_dest(flat, offset, n);
  std::vector<float> v(static_cast<size_t>(n));
  convert_to_f32(src_dt, src, v.data(), v.size());
  store_f32(flat, offset, v.data(), n);
}

void write_weights_fp8_host(Tensor& flat, int64_t offset, const uint8_t* w8, const float* scale, int64_t N,
                            int64_t K, int64_t bn, int64_t bk) {
  check_host_dest(flat, offset, N * K);
  const int64_t sk = (K + bk - 1) / bk;
  std::vector<float> v(static_cast<size_t>(N * K));
  convert_to_f32(DType::F8E4M3, w8, v.data(), v.size());
  for (int64_t r = 0; r < N; ++r)
    for (int64_t c = 0; c < K; ++c) v[size_t(r * K + c)] *= scale[(r / bn) * sk + c / bk];
  store_f32(flat, offset, v.data(), N * K);
}

void Backend::write_weights(Tensor& flat, int64_t offset, const void* src, DType src_dt, int64_t n) {
  write_weights_host(flat, offset, src, src_dt, n);
}

void Backend::write_weights_fp8(Tensor& flat, int64_t offset, const uint8_t* w8, const float* scale, int64_t N,
                                int64_t K, int64_t bn, int64_t bk) {
  write_weights_fp8_host(flat, offset, w8, scale, N, K, bn, bk);
}

void Backend::write_raw(Tensor& dst, size_t byte_offset, const void* src, size_t bytes) {
  if (dst.device != Device::CPU) fail("write_raw: {} is not in host memory", dst.name);
  if (byte_offset + bytes > dst.nbytes())
    fail("write_raw: [{}, {}) is outside the {} bytes of {}", byte_offset, byte_offset + bytes, dst.nbytes(), dst.name);
  std::memcpy(static_cast<char*>(dst.data) + byte_offset, src, bytes);
}

}  // namespace dsv3
