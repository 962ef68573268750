// Several DeepSeek-V4 sequences in one forward (V4Model::forward over a batch, what V4ServingModel runs each
// engine step): each sequence's logits and cache equal its own one-sequence forward, for a batch that mixes a
// prefill chunk, decodes, a first chunk and a decode that closes CSA / HCA compression windows; the MTP block's
// batched forward likewise; edge cases (an empty batch, a batch of one, a sequence at the context limit, one
// cache twice) run or fail in one line without touching any cache.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "model/v4_loader.h"
#include "serve/serving_model.h"
#include "test_helpers.h"
#include "train/v4_trainer.h"

using namespace dsv3;

namespace {

const std::string kDir = test::data_dir("tiny-v4-fwd");

LoadedV4Model& model() {
  static LoadedV4Model m = open_v4_model(kDir);
  return m;
}

// Tolerance of a batched row against the same row run alone, relative to the largest value: the products differ
// only in summation order (a one-row product is a GEMV, several rows a GEMM), so ~1e-7 is expected.
constexpr double kTol = 2e-6;

// max |a - b| / max |b| over n values (0 when both are empty or all zero).
double max_rel(const float* a, const float* b, int64_t n) {
  double d = 0, r = 0;
  for (int64_t i = 0; i < n; ++i) {
    d = std::max(d, double(std::fabs(a[i] - b[i])));
    r = std::max(r, double(std::fabs(b[i])));
  }
  return r > 0 ? d / r : d;
}

std::vector<int32_t> tokens(int64_t n, int64_t seed, int64_t V) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = int32_t((seed * 37 + i * 11 + 5) % V);
  return v;
}

// Worst relative difference over every float of two caches; the counts (entries, buffered rows, lengths) must
// be equal.
double cache_diff(const V4Cache& a, const V4Cache& b) {
  EXPECT_EQ(a.len, b.len);
  EXPECT_EQ(a.mtp_len, b.mtp_len);
  double worst = 0;
  auto vec = [&](const std::vector<float>& x, const std::vector<float>& y, const char* what) {
    EXPECT_EQ(x.size(), y.size()) << what;
    if (x.size() == y.size()) worst = std::max(worst, max_rel(x.data(), y.data(), int64_t(x.size())));
  };
  auto comp = [&](const V4CompressorState& x, const V4CompressorState& y) {
    EXPECT_EQ(x.entries, y.entries);
    vec(x.kv, y.kv, "kv");
    vec(x.buf_kv, y.buf_kv, "buf_kv");
    vec(x.buf_gate, y.buf_gate, "buf_gate");
    vec(x.prev_kv, y.prev_kv, "prev_kv");
    vec(x.prev_gate, y.prev_gate, "prev_gate");
  };
  auto layers = [&](const std::vector<V4LayerCache>& x, const std::vector<V4LayerCache>& y) {
    EXPECT_EQ(x.size(), y.size());
    for (size_t l = 0; l < std::min(x.size(), y.size()); ++l) {
      vec(x[l].window, y[l].window, "window");
      comp(x[l].comp, y[l].comp);
      comp(x[l].index, y[l].index);
    }
  };
  layers(a.layers, b.layers);
  layers(a.mtp, b.mtp);
  return worst;
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// tiny-v4-fwd: sliding window 6, CSA rate 4 (top-3 of the indexer), HCA rate 8. Before the batch the sequences
// hold 5, 7, 23, 0 and 2 tokens; the batch feeds a chunk of 11 (positions 5..15: CSA windows close at 7, 11, 15
// and the HCA window at 7), one token at position 7 (closes a CSA and the first HCA window), one at 23 (closes
// windows with entries already selected by the indexer), a first chunk of 9 (last logits only) and one at 2.
TEST(V4Batch, BatchedForwardEqualsEachSequenceAlone) {
  V4Model& m = *model().model;
  const V4Config& c = m.config();
  const int64_t V = c.vocab_size, N = c.hc_mult, d = c.hidden_size;
  const std::vector<int64_t> before = {5, 7, 23, 0, 2}, feed = {11, 1, 1, 9, 1};
  const std::vector<bool> all = {true, false, true, false, false};
  const int64_t S = int64_t(before.size());
  std::vector<V4Cache> batched, alone;
  for (int64_t s = 0; s < S; ++s) {
    batched.emplace_back(c);
    if (before[size_t(s)] > 0) m.forward(tokens(before[size_t(s)], s, V), batched.back());
    alone.push_back(batched.back());
  }
  // Twice: the second round continues from the caches the batch wrote (all decodes, a chunk of 3 for one).
  for (int round = 0; round < 2; ++round) {
    std::vector<V4Seq> batch;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t n = round == 0 ? feed[size_t(s)] : (s == 3 ? 3 : 1);
      batch.push_back(V4Seq{tokens(n, 10 * round + s + 1, V), &batched[size_t(s)], bool(all[size_t(s)])});
    }
    Tensor streams;
    Tensor got = m.forward(batch, &streams);
    int64_t row = 0, srow = 0, T = 0;
    for (const V4Seq& b : batch) T += int64_t(b.ids.size());
    ASSERT_EQ(streams.shape, (Shape{T, N, d}));
    double worst_logit = 0, worst_stream = 0, worst_cache = 0;
    for (int64_t s = 0; s < S; ++s) {
      const V4Seq& b = batch[size_t(s)];
      Tensor want_streams;
      Tensor want = m.forward(b.ids, alone[size_t(s)], b.all_logits, &want_streams);
      ASSERT_LE(row + want.dim(0), got.dim(0));
      const double e = max_rel(got.f32() + row * V, want.f32(), want.numel());
      EXPECT_LE(e, kTol) << "round " << round << " sequence " << s;
      worst_logit = std::max(worst_logit, e);
      worst_stream = std::max(worst_stream, max_rel(streams.f32() + srow * N * d, want_streams.f32(), want_streams.numel()));
      worst_cache = std::max(worst_cache, cache_diff(batched[size_t(s)], alone[size_t(s)]));
      row += want.dim(0);
      srow += want_streams.dim(0);
    }
    EXPECT_EQ(row, got.dim(0));
    EXPECT_LE(worst_stream, kTol);
    EXPECT_LE(worst_cache, kTol);
    std::printf("[v4 batch] round %d, %lld sequences, %lld rows: max relative difference from each alone: logits %.3g, "
                "streams %.3g, caches %.3g\n",
                round, (long long)S, (long long)T, worst_logit, worst_stream, worst_cache);
  }
}

TEST(V4Batch, EdgeCases) {
  V4Model& m = *model().model;
  const V4Config& c = m.config();
  const int64_t V = c.vocab_size, L = c.max_position_embeddings;
  // An empty batch: no rows, nothing changes.
  Tensor streams;
  Tensor none = m.forward(std::vector<V4Seq>{}, &streams);
  EXPECT_EQ(none.shape, (Shape{0, V}));
  EXPECT_EQ(streams.shape, (Shape{0, c.hc_mult, c.hidden_size}));
  // A batch of one is the one-sequence forward, bit for bit.
  V4Cache a(c), b(c);
  const std::vector<int32_t> p = tokens(13, 3, V);
  Tensor one = m.forward(std::vector<V4Seq>{V4Seq{p, &a, true}});
  Tensor ref = m.forward(p, b, true);
  ASSERT_EQ(one.shape, ref.shape);
  EXPECT_EQ(max_rel(one.f32(), ref.f32(), ref.numel()), 0.0);
  EXPECT_EQ(cache_diff(a, b), 0.0);
  // A sequence one token short of the context limit decodes its last position beside another sequence; past the
  // limit the whole batch fails before any cache changes.
  V4Cache full(c), other(c);
  m.forward(tokens(L - 1, 4, V), full);
  m.forward(tokens(4, 5, V), other);
  V4Cache full_alone = full, other_alone = other;
  Tensor l = m.forward(std::vector<V4Seq>{V4Seq{{7}, &full}, V4Seq{{9}, &other}});
  EXPECT_EQ(l.dim(0), 2);
  EXPECT_LE(max_rel(l.f32(), m.forward({7}, full_alone).f32(), V), kTol);
  EXPECT_LE(max_rel(l.f32() + V, m.forward({9}, other_alone).f32(), V), kTol);
  EXPECT_EQ(full.len, L);
  const int64_t held = other.values();
  std::string e = error_of([&] { m.forward(std::vector<V4Seq>{V4Seq{{9}, &other}, V4Seq{{7}, &full}}); });
  EXPECT_NE(e.find("exceeds max_position_embeddings"), std::string::npos) << e;
  EXPECT_EQ(other.len, 5);
  EXPECT_EQ(other.values(), held);
  // One cache twice, an entry without tokens or a cache, a bad id: one-line errors, nothing appended.
  e = error_of([&] { m.forward(std::vector<V4Seq>{V4Seq{{1}, &other}, V4Seq{{2}, &other}}); });
  EXPECT_NE(e.find("one cache twice"), std::string::npos) << e;
  e = error_of([&] { m.forward(std::vector<V4Seq>{V4Seq{{1}, &other}, V4Seq{{}, &a}}); });
  EXPECT_NE(e.find("no tokens"), std::string::npos) << e;
  e = error_of([&] { m.forward(std::vector<V4Seq>{V4Seq{{1}, nullptr}}); });
  EXPECT_NE(e.find("without a cache"), std::string::npos) << e;
  e = error_of([&] { m.forward(std::vector<V4Seq>{V4Seq{{1}, &other}, V4Seq{{int32_t(V)}, &a}}); });
  EXPECT_NE(e.find("out of range"), std::string::npos) << e;
  EXPECT_EQ(other.len, 5);
  EXPECT_EQ(a.len, 13);
  // Through the serving model: an empty step, and a step of one sequence.
  V4ServingModel sm(m, 512, 16);
  std::vector<BatchSeq> empty;
  ForwardOptions fo;
  fo.keep_hidden = true;
  ForwardResult r = sm.forward(empty, fo);
  EXPECT_EQ(r.logits.dim(0), 0);
  EXPECT_EQ(r.hidden.dim(0), 0);
  SeqCache s;
  ASSERT_TRUE(sm.reserve(s, 20));
  std::vector<BatchSeq> single(1);
  single[0].cache = &s, single[0].tokens = p;
  r = sm.forward(single, fo);
  EXPECT_EQ(r.logits.dim(0), 1);
  EXPECT_EQ(r.hidden.shape, (Shape{int64_t(p.size()), c.hc_mult * c.hidden_size}));
  EXPECT_LE(max_rel(r.logits.f32(), ref.f32() + (int64_t(p.size()) - 1) * V, V), kTol);  // a 1-row head product here
  EXPECT_EQ(s.len, int64_t(p.size()));
  sm.release(s);
}

// MTP block 0 (a CSA block) over several sequences at once equals each sequence's own mtp_forward (random
// weights; tiny-v4-fwd has no MTP block).
TEST(V4Batch, BatchedMtpForwardEqualsEachSequenceAlone) {
  const nlohmann::json j = {
      {"model_type", "deepseek_v4"}, {"vocab_size", 64}, {"hidden_size", 16}, {"moe_intermediate_size", 8},
      {"num_hidden_layers", 3}, {"num_attention_heads", 2}, {"num_key_value_heads", 1}, {"head_dim", 8},
      {"q_lora_rank", 8}, {"o_groups", 2}, {"o_lora_rank", 4}, {"qk_rope_head_dim", 4}, {"n_routed_experts", 4},
      {"num_experts_per_tok", 2}, {"num_hash_layers", 1},
      {"layer_types", {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                       "compressed_sparse_attention"}},
      {"compress_rates", {{"compressed_sparse_attention", 4}, {"heavily_compressed_attention", 8}}},
      {"sliding_window", 6}, {"index_n_heads", 2}, {"index_head_dim", 8}, {"index_topk", 2}, {"hc_mult", 2},
      {"max_position_embeddings", 64}, {"initializer_range", 0.3}, {"num_nextn_predict_layers", 1}};
  const V4Config c = V4Config::from_json(j);
  std::unique_ptr<Backend> be = make_cpu_backend();
  V4Model m(init_v4_weights(c, 9), *be);
  ASSERT_EQ(m.mtp_depth(), 1);
  const int64_t V = c.vocab_size, N = c.hc_mult, d = c.hidden_size;
  const std::vector<int64_t> lens = {10, 1, 6};
  std::vector<V4Cache> batched, alone;
  std::vector<V4Seq> batch;
  std::vector<Tensor> X;
  std::vector<float> all;
  for (int64_t s = 0; s < int64_t(lens.size()); ++s) {
    batched.emplace_back(c);
    alone.emplace_back(c);
  }
  for (int64_t s = 0; s < int64_t(lens.size()); ++s) {
    V4Cache main(c);
    Tensor Xs;
    m.forward(tokens(lens[size_t(s)], s, V), main, false, &Xs);
    X.push_back(Xs);
    all.insert(all.end(), Xs.f32(), Xs.f32() + Xs.numel());
    batch.push_back(V4Seq{tokens(lens[size_t(s)], s + 7, V), &batched[size_t(s)]});
  }
  const int64_t T = int64_t(all.size()) / (N * d);
  Tensor got = m.mtp_forward(0, Tensor::f32_from(all, {T, N, d}), batch);
  ASSERT_EQ(got.shape, (Shape{T, V}));
  int64_t row = 0;
  double worst = 0;
  for (int64_t s = 0; s < int64_t(lens.size()); ++s) {
    Tensor want = m.mtp_forward(0, X[size_t(s)], batch[size_t(s)].ids, alone[size_t(s)]);
    const double e = max_rel(got.f32() + row * V, want.f32(), want.numel());
    EXPECT_LE(e, kTol) << s;
    worst = std::max(worst, e);
    EXPECT_LE(cache_diff(batched[size_t(s)], alone[size_t(s)]), kTol);
    row += want.dim(0);
  }
  std::printf("[v4 batch] MTP block over %zu sequences: max relative logit difference from each alone %.3g\n",
              lens.size(), worst);
}
