// Whole-step CUDA graphs (recorded pure decode steps, replayed with new ids, positions and block tables) against
// the same steps run eagerly (DSV3_CUDA_GRAPHS=0), on the CUDA backend in bf16 mode. Sequences of different
// lengths decode for many steps, so lengths cross block boundaries (64 tokens) and capacity buckets (1, 2, 4, 8
// blocks); one step appends 3 tokens to one sequence (not a pure decode step: eager) and later a sequence leaves
// the batch (a new batch size). Checked per step: logits within 1e-3 relative (they come out bit-identical: the
// same kernels with the same grids) and the same greedy token for every sequence; and that replays happened.
// Skips without a CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "model/loader.h"
#include "test_helpers.h"
#if DSV3_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#endif

using namespace dsv3;

namespace {

int32_t argmax(const float* v, int64_t n) { return int32_t(std::max_element(v, v + n) - v); }

void decode_graphs_vs_eager(const std::string& fixture, int B) {
  const std::string dir = test::data_dir(fixture);
  setenv("DSV3_CUDA_GRAPHS", "0", 1);
  LoadedModel e = open_model(dir, "cuda");
  unsetenv("DSV3_CUDA_GRAPHS");
  LoadedModel g = open_model(dir, "cuda");
  const ModelConfig& cfg = e.model->config();
  const int64_t V = cfg.vocab_size;
  const std::vector<int64_t> prompt_len = {5, 60, 63, 130};
  KvCache ce(*e.backend, cfg, 4 * 512), cg(*g.backend, cfg, 4 * 512);
  std::vector<SeqCache> se(static_cast<size_t>(B)), sg(static_cast<size_t>(B));
  std::vector<BatchSeq> be(static_cast<size_t>(B)), bg(static_cast<size_t>(B));
  for (int b = 0; b < B; ++b) {
    for (int64_t i = 0; i < prompt_len[size_t(b)]; ++i) be[size_t(b)].tokens.push_back(int32_t((i * 31 + b * 7 + 3) % V));
    bg[size_t(b)].tokens = be[size_t(b)].tokens;
    be[size_t(b)].cache = &se[size_t(b)];
    bg[size_t(b)].cache = &sg[size_t(b)];
  }
  const int steps = 150;
  double worst = 0;
  int identical = 0, token_diffs = 0;
  for (int step = 0; step < steps; ++step) {
    ForwardResult re = e.model->forward(be, ce), rg = g.model->forward(bg, cg);
    ASSERT_EQ(re.logits.numel(), rg.logits.numel());
    const int64_t n = re.logits.numel();
    const double err = test::rel_err(rg.logits.f32(), re.logits.f32(), n);
    worst = std::max(worst, err);
    identical += std::memcmp(rg.logits.f32(), re.logits.f32(), size_t(n) * 4) == 0;
    for (size_t b = 0; b < be.size(); ++b) {
      const int32_t te = argmax(re.logits.f32() + int64_t(b) * V, V), tg = argmax(rg.logits.f32() + int64_t(b) * V, V);
      token_diffs += te != tg;
      be[b].tokens = {te};  // both follow the eager tokens, so one flipped tie does not end the comparison
      bg[b].tokens = {te};
    }
    EXPECT_LE(err, 1e-3) << fixture << " batch " << B << " step " << step;
    if (step == 40 && B > 1) {  // a 3-token append (absorbed, not a pure decode step): runs eagerly
      const int32_t t = be[0].tokens[0];
      be[0].tokens = bg[0].tokens = {int32_t(1), int32_t(2), t};
    }
    if (step == 100 && B > 1) {  // a sequence leaves: a new batch size
      be.pop_back();
      bg.pop_back();
    }
  }
  std::printf("[ cuda     ] graphs %s batch %d: %d steps, max rel err %.2e vs eager, %d bit-identical, %d token diffs\n",
              fixture.c_str(), B, steps, worst, identical, token_diffs);
  EXPECT_EQ(token_diffs, 0);
#if DSV3_HAVE_CUDA
  const cuda::GraphStats st = cuda::graph_stats(*g.backend), se0 = cuda::graph_stats(*e.backend);
  std::printf("[ cuda     ] graphs %s batch %d: %lld recorded, %lld replayed, %lld eager, %lld failed\n",
              fixture.c_str(), B, (long long)st.captures, (long long)st.replays, (long long)st.eager,
              (long long)st.failed);
  EXPECT_GT(st.replays, steps / 2);
  EXPECT_EQ(st.failed, 0);
  EXPECT_EQ(se0.captures + se0.replays, 0);  // the switch keeps the other backend eager
#endif
}

TEST(CudaGraphs, DecodeReplayMatchesEagerBatch1) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  decode_graphs_vs_eager("tiny-bf16-yarn", 1);
  decode_graphs_vs_eager("tiny-fp32", 1);
}

TEST(CudaGraphs, DecodeReplayMatchesEagerBatch4) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  decode_graphs_vs_eager("tiny-bf16-yarn", 4);
  decode_graphs_vs_eager("tiny-fp32", 4);
}

}  // namespace
