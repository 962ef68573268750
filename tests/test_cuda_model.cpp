// The whole model on the CUDA backend against the reference fixtures and against the CPU backend, in both
// activation modes: bf16 (the fast path) and fp32 (DSV3_CUDA_ACT=f32, for exact comparisons).
//  - fp32: logits and MTP logits within ||d|| / ||ref|| <= 2e-2 (they land near 1e-5).
//  - bf16: rounding alone keeps each row near 1e-2, but a token whose router scores are nearly tied can pick a
//    different expert than the fp32 reference, which moves that row by 10-70%; the whole-tensor error then
//    depends on how many such rows a fixture has. Checked: median row <= 2e-2, at most 5% of rows over 5%,
//    whole tensor <= 1e-1; all printed.
// Greedy generation agreement is reported (the first token must match). Skips without a CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <tuple>

#include "io/safetensors.h"
#include "model/generate.h"
#include "model/loader.h"
#include "model/sequence_logits.h"
#include "test_helpers.h"

using namespace dsv3;

namespace {

std::vector<int32_t> ids_of(const Tensor& t) { return std::vector<int32_t>(t.ptr<int32_t>(), t.ptr<int32_t>() + t.numel()); }

struct Logits {
  Tensor main, mtp;
};

// Full-sequence logits of every row (and MTP module 1's when the model has one), as `dsv3 logits` computes them.
Logits run_logits(LoadedModel& lm, const std::vector<int32_t>& all, int64_t B, int64_t T) {
  SequenceLogits r = sequence_logits(*lm.model, *lm.backend, all, B, T);
  return {r.logits, r.mtp.empty() ? Tensor() : r.mtp[0]};
}

// A CUDA model in fp32-activation mode or the default bf16 mode.
LoadedModel open_cuda(const std::string& dir, bool f32) {
  if (f32) setenv("DSV3_CUDA_ACT", "f32", 1);
  LoadedModel lm = open_model(dir, "cuda");
  if (f32) unsetenv("DSV3_CUDA_ACT");
  return lm;
}

class CudaFixture : public ::testing::TestWithParam<std::tuple<std::string, bool>> {};

TEST_P(CudaFixture, LogitsMatchReferenceAndCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const auto [name, f32] = GetParam();
  const std::string dir = test::data_dir(name);
  const char* mode = f32 ? "fp32" : "bf16";
  SafetensorsFile ref(dir + "/reference.safetensors");
  Tensor ids = ref.get("input_ids"), want = ref.get("logits");
  const int64_t B = ids.dim(0), T = ids.dim(1);
  auto all = ids_of(ids);
  LoadedModel g = open_cuda(dir, f32);
  LoadedModel c = open_model(dir, "cpu");
  Logits lg = run_logits(g, all, B, T), lc = run_logits(c, all, B, T);
  ASSERT_EQ(lg.main.numel(), want.numel());
  const double e_ref = test::rel_err(lg.main.f32(), want.ptr<float>(), want.numel());
  const double e_cpu = test::rel_err(lg.main.f32(), lc.main.f32(), want.numel());
  // Rows far off (> 5%) point at routing decisions that flipped under bf16 rounding, not at rounding itself.
  const int64_t V = want.dim(-1), rows = want.numel() / V;
  std::vector<double> re(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) re[size_t(i)] = test::rel_err(lg.main.f32() + i * V, lc.main.f32() + i * V, V);
  std::vector<double> sorted = re;
  std::sort(sorted.begin(), sorted.end());
  int64_t far = 0;
  for (double x : re) far += x > 0.05;
  std::printf("[ cuda     ] %s %s logits: rel err %.2e vs reference, %.2e vs cpu; rows vs cpu: median %.1e, max %.1e, "
              "%lld of %lld over 5%%\n", name.c_str(), mode, e_ref, e_cpu, sorted[sorted.size() / 2], sorted.back(),
              (long long)far, (long long)rows);
  if (f32) {
    EXPECT_LE(e_ref, 2e-2);
    EXPECT_LE(e_cpu, 2e-2);
  } else {
    EXPECT_LE(sorted[sorted.size() / 2], 2e-2);
    EXPECT_LE(double(far), 0.05 * double(rows));
    EXPECT_LE(e_ref, 1e-1);
  }
  if (ref.has("mtp_logits.1")) {
    Tensor mw = ref.get("mtp_logits.1");
    ASSERT_EQ(lg.mtp.numel(), mw.numel());
    const double e = test::rel_err(lg.mtp.f32(), mw.ptr<float>(), mw.numel());
    std::printf("[ cuda     ] %s %s mtp_logits.1: rel err %.2e vs reference\n", name.c_str(), mode, e);
    EXPECT_LE(e, f32 ? 2e-2 : 1e-1);
  }
}

TEST_P(CudaFixture, GreedyGenerationAgreement) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const auto [name, f32] = GetParam();
  const std::string dir = test::data_dir(name);
  SafetensorsFile ref(dir + "/reference.safetensors");
  if (!ref.has("gen_prompt")) GTEST_SKIP() << "no generation reference in " << name;
  auto prompt = ids_of(ref.get("gen_prompt"));
  auto full = ids_of(ref.get("gen_output"));
  std::vector<int32_t> want(full.begin() + prompt.size(), full.end());
  LoadedModel lm = open_cuda(dir, f32);
  for (bool absorb : {true, false}) {
    GenerateOptions go;
    go.max_new_tokens = int64_t(want.size());
    go.absorb_decode = absorb;
    auto got = generate(*lm.model, prompt, go);
    ASSERT_EQ(got.size(), want.size());
    size_t same_prefix = 0;
    while (same_prefix < got.size() && got[same_prefix] == want[same_prefix]) ++same_prefix;
    size_t same = 0;
    for (size_t i = 0; i < got.size(); ++i) same += got[i] == want[i];
    std::printf("[ cuda     ] %s %s greedy (%s): %zu/%zu tokens equal, first %zu in a row\n", name.c_str(),
                f32 ? "fp32" : "bf16", absorb ? "absorbed" : "decompressed", same, want.size(), same_prefix);
    EXPECT_GE(same_prefix, 1u) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaFixture,
                         ::testing::Combine(::testing::Values("tiny-fp32", "tiny-bf16-yarn", "tiny-fp8", "tiny-mtp"),
                                            ::testing::Bool()));

// Decode rows (absorbed path, several sequences) and a prefill chunk in one forward, against the CPU.
TEST(CudaModel, MixedBatchMatchesCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const std::string dir = test::data_dir("tiny-fp32");
  for (bool f32 : {true, false}) {
  LoadedModel g = open_cuda(dir, f32), c = open_model(dir, "cpu");
  std::vector<double> errs;
  std::vector<Tensor> outs[2];
  for (int which = 0; which < 2; ++which) {
    LoadedModel& lm = which ? c : g;
    KvCache cache(*lm.backend, lm.model->config(), 512);
    std::vector<SeqCache> sc(3);
    std::vector<BatchSeq> batch(3);
    const std::vector<std::vector<int32_t>> prompts = {{5, 6, 7, 8, 9, 10, 11}, {100, 200, 300}, {42, 43, 44, 45, 46, 47, 48, 49, 50}};
    for (int i = 0; i < 3; ++i) {
      batch[i].cache = &sc[i];
      batch[i].tokens = prompts[i];
    }
    outs[which].push_back(lm.model->forward(batch, cache).logits);
    // Step 2: sequence 0 decodes one token, sequence 1 appends a 6-token chunk (prefill path at pos0 3),
    // sequence 2 appends 3 tokens (absorbed path, one slice per token).
    batch[0].tokens = {12};
    batch[1].tokens = {301, 302, 303, 304, 305, 306};
    batch[2].tokens = {51, 52, 53};
    ForwardOptions fo;
    fo.all_logits = true;
    outs[which].push_back(lm.model->forward(batch, cache, fo).logits);
  }
  const int64_t V = g.model->config().vocab_size;
  for (size_t s = 0; s < outs[0].size(); ++s) {
    ASSERT_EQ(outs[0][s].numel(), outs[1][s].numel());
    const double e = test::rel_err(outs[0][s].f32(), outs[1][s].f32(), outs[1][s].numel());
    std::printf("[ cuda     ] mixed batch (%s) step %zu: rel err %.2e vs cpu", f32 ? "fp32" : "bf16", s, e);
    if (s == 1) {  // rows: sequence 0 (1 decode row), 1 (6 prefill rows), 2 (3 absorbed rows)
      int64_t r0 = 0;
      for (int64_t n : {1, 6, 3}) {
        std::printf(", %.2e", test::rel_err(outs[0][s].f32() + r0 * V, outs[1][s].f32() + r0 * V, n * V));
        r0 += n;
      }
    }
    std::printf("\n");
    EXPECT_LE(e, f32 ? 2e-2 : 1.5e-1) << "step " << s;  // bf16: see the file comment on routing flips
  }
  }
}

}  // namespace
