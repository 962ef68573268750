// cuDNN's fused causal attention (src/ops/cuda/cudnn/attention.h) on MLA's prefill layout against an fp64
// reference on the host over the same bf16 operands, and against the hand-written kernel (attention_prefill.cu)
// it replaces. Keys come from mla_concat_k (each head's k_nope next to the shared k_pe), v is a view into kv.
// Shapes: the DeepSeek-V3 head dims (128 + 64 / 128) and a small config (64 + 32 / 64); lengths that are not
// multiples of the 64/128 tiles, a cached prefix (pos0 > 0: bottom-right causal alignment), one query.
// bf16 output: ||out - ref|| / ||ref|| <= 1e-2 (softmax probabilities rounded to bf16 before P V, as flash
// attention kernels do). Skips without a GPU or without cuDNN in the build.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "core/rng.h"
#include "ops/backend.h"

#if DSV3_HAVE_CUDA
#include <cuda_runtime.h>

#include "cuda_memory_helpers.h"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/cudnn/attention.h"

using namespace dsv3;
using test::dev_copy;
using test::host_copy;

namespace {

float bf(uint16_t b) {
  float y;
  convert_to_f32(DType::BF16, &b, &y, 1);
  return y;
}

struct Case {
  int len, pos0, nh, dn, dr, dv;
};

void run_case(const Case& c) {
  const int n = c.pos0 + c.len, dqk = c.dn + c.dr;
  Rng rng(uint64_t(c.len * 131 + c.pos0));
  auto rnd = [&](size_t m) {
    std::vector<uint16_t> v(m);
    for (auto& x : v) x = f32_to_bf16(float(rng.normal()));
    return v;
  };
  const auto q = rnd(size_t(c.len) * c.nh * dqk), kv = rnd(size_t(n) * c.nh * (c.dn + c.dv)), kpe = rnd(size_t(n) * c.dr);
  const float scale = 1.f / std::sqrt(float(dqk));
  // fp64 reference
  std::vector<double> ref(size_t(c.len) * c.nh * c.dv, 0.0);
  for (int i = 0; i < c.len; ++i)
    for (int h = 0; h < c.nh; ++h) {
      const int last = c.pos0 + i;
      std::vector<double> sc(size_t(last) + 1);
      double mx = -INFINITY;
      for (int j = 0; j <= last; ++j) {
        double d = 0;
        for (int t = 0; t < c.dn; ++t)
          d += double(bf(q[(size_t(i) * c.nh + h) * dqk + t])) * bf(kv[(size_t(j) * c.nh + h) * (c.dn + c.dv) + t]);
        for (int t = 0; t < c.dr; ++t)
          d += double(bf(q[(size_t(i) * c.nh + h) * dqk + c.dn + t])) * bf(kpe[size_t(j) * c.dr + t]);
        sc[size_t(j)] = d * scale, mx = std::max(mx, sc[size_t(j)]);
      }
      double z = 0;
      for (double& x : sc) z += (x = std::exp(x - mx));
      for (int j = 0; j <= last; ++j)
        for (int t = 0; t < c.dv; ++t)
          ref[(size_t(i) * c.nh + h) * c.dv + t] +=
              sc[size_t(j)] / z * bf(kv[(size_t(j) * c.nh + h) * (c.dn + c.dv) + c.dn + t]);
    }
  auto* dq = reinterpret_cast<cuda::bf16*>(dev_copy(q));
  auto* dkv = reinterpret_cast<cuda::bf16*>(dev_copy(kv));
  auto* dkpe = reinterpret_cast<cuda::bf16*>(dev_copy(kpe));
  auto* dk = reinterpret_cast<cuda::bf16*>(dev_copy(std::vector<uint16_t>(size_t(n) * c.nh * dqk)));
  auto* dout = reinterpret_cast<cuda::bf16*>(dev_copy(std::vector<uint16_t>(ref.size())));
  auto* dnat = reinterpret_cast<cuda::bf16*>(dev_copy(std::vector<uint16_t>(ref.size())));
  cuda::mla_concat_k(dk, dkv, dkpe, n, c.nh, c.dn, c.dr, c.dv, nullptr);
  // the dense keys equal [k_nope | k_pe] exactly
  const auto hk = host_copy(reinterpret_cast<uint16_t*>(dk), size_t(n) * c.nh * dqk);
  for (int j = 0; j < n; ++j)
    for (int h = 0; h < c.nh; ++h)
      for (int t = 0; t < dqk; ++t)
        ASSERT_EQ(hk[(size_t(j) * c.nh + h) * dqk + t], t < c.dn ? kv[(size_t(j) * c.nh + h) * (c.dn + c.dv) + t]
                                                                  : kpe[size_t(j) * c.dr + t - c.dn]);
  cuda::cudnn::CausalAttention a;
  a.out = dout, a.q = dq, a.k = dk, a.v = dkv + c.dn, a.v_row = int64_t(c.nh) * (c.dn + c.dv), a.v_head = c.dn + c.dv;
  a.len = c.len, a.n = n, a.nh = c.nh, a.dqk = dqk, a.dv = c.dv, a.scale = scale;
  const char* why = nullptr;
  ASSERT_TRUE(cuda::cudnn::causal_attention(a, nullptr, &why)) << why;
  cuda::mla_prefill(dnat, dq, dkv, dkpe, c.len, c.pos0, c.nh, c.dn, c.dr, c.dv, scale, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto ho = host_copy(reinterpret_cast<uint16_t*>(dout), ref.size());
  const auto hn = host_copy(reinterpret_cast<uint16_t*>(dnat), ref.size());
  double e2 = 0, n2 = 0, s2 = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    e2 += (bf(ho[i]) - ref[i]) * (bf(ho[i]) - ref[i]), s2 += ref[i] * ref[i];
    n2 += (bf(hn[i]) - ref[i]) * (bf(hn[i]) - ref[i]);
  }
  const double ec = std::sqrt(e2 / s2), en = std::sqrt(n2 / s2);
  std::printf("[ cudnn attn ] len %d pos0 %d nh %d d %d+%d/%d: rel err cuDNN %.2e, built-in %.2e\n", c.len, c.pos0, c.nh,
              c.dn, c.dr, c.dv, ec, en);
  EXPECT_LE(ec, 1e-2);
  EXPECT_LE(en, 1e-2);
  for (void* p : {static_cast<void*>(dq), static_cast<void*>(dkv), static_cast<void*>(dkpe), static_cast<void*>(dk),
                  static_cast<void*>(dout), static_cast<void*>(dnat)})
    cudaFree(p);
}

}  // namespace

TEST(CudaCudnnAttention, MatchesFp64AndBuiltInKernel) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  if (!cuda::cudnn::available()) GTEST_SKIP() << "built without cuDNN (or cuDNN older than 9.6)";
  for (const Case& c : {Case{1, 0, 2, 128, 64, 128}, Case{77, 0, 3, 128, 64, 128}, Case{300, 0, 2, 128, 64, 128},
                        Case{129, 200, 2, 128, 64, 128}, Case{1, 63, 2, 128, 64, 128}, Case{96, 17, 4, 64, 32, 64}})
    run_case(c);
}

TEST(CudaCudnnAttention, RefusesInconsistentShapes) {
  if (!cuda_available() || !cuda::cudnn::available()) GTEST_SKIP() << "no CUDA device or no cuDNN";
  cuda::cudnn::CausalAttention a;
  a.len = 8, a.n = 4, a.nh = 1, a.dqk = 192, a.dv = 128;  // more queries than keys
  const char* why = nullptr;
  EXPECT_FALSE(cuda::cudnn::causal_attention(a, nullptr, &why));
  EXPECT_NE(why, nullptr);
}

#endif  // DSV3_HAVE_CUDA
