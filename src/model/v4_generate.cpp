#include "model/v4_generate.h"

#include <algorithm>
#include <chrono>

namespace dsv3 {

std::vector<int32_t> v4_generate(V4Model& m, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                 GenerateStats* stats, const std::function<bool(int32_t)>& on_token) {
  const V4Config& cfg = m.config();
  if (prompt.empty()) fail("the prompt is empty");
  if (opt.max_new_tokens < 0) fail("max_new_tokens must be >= 0");
  if (opt.speculative_mtp) {
    if (m.mtp_depth() < 1)
      fail("--speculative mtp needs a model with an MTP block (mtp.0.* tensors; this checkpoint has none)");
    if (opt.sampling.temperature > 0) fail("--speculative mtp supports greedy decoding only (temperature 0)");
  }
  if (int64_t(prompt.size()) > cfg.max_position_embeddings)
    fail("prompt of {} tokens exceeds max_position_embeddings = {}", prompt.size(), cfg.max_position_embeddings);
  for (int32_t id : prompt)
    if (id < 0 || id >= cfg.vocab_size) fail("token id {} is out of range for vocab_size {}", id, cfg.vocab_size);
  const int64_t total = std::min<int64_t>(int64_t(prompt.size()) + opt.max_new_tokens, cfg.max_position_embeddings);
  V4Cache cache(cfg);
  Sampler sampler(opt.sampling);
  GenerateStats st;
  st.prompt_tokens = int64_t(prompt.size());
  st.finish_reason = "length";
  std::vector<int32_t> out, next = prompt;
  using clk = std::chrono::steady_clock;
  auto t0 = clk::now();
  bool first = true;
  if (opt.speculative_mtp) {
    // Every emitted token is the main model's argmax given the tokens before it, as in plain greedy decoding.
    const int64_t V = cfg.vocab_size;
    auto emit = [&](int32_t tok) {  // false when generation must end
      out.push_back(tok);
      if (on_token && !on_token(tok)) return false;
      if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), tok) != opt.stop_ids.end()) {
        st.finish_reason = "stop";
        return false;
      }
      return int64_t(out.size()) < opt.max_new_tokens;
    };
    // MTP rows: the main streams X [n, N, d] of the last n confirmed positions with the token after each.
    auto draft = [&](const Tensor& X, const std::vector<int32_t>& toks) {
      Tensor l = m.mtp_forward(0, X, toks, cache);
      return Sampler::argmax(l.f32() + (l.dim(0) - 1) * V, V);
    };
    Tensor X;
    Tensor logits = m.forward(prompt, cache, false, &X);
    int32_t t = Sampler::argmax(logits.f32(), V);
    std::vector<int32_t> toks(prompt.begin() + 1, prompt.end());
    toks.push_back(t);
    int32_t d = draft(X, toks);
    st.prefill_s = std::chrono::duration<double>(clk::now() - t0).count();
    t0 = clk::now();
    first = false;
    bool go = opt.max_new_tokens > 0 && emit(t);
    while (go && cache.len + 2 <= total) {
      const V4Cache before = cache;  // the V4 cache is not position-addressed: a rejected draft restores it
      logits = m.forward({t, d}, cache, true, &X);
      ++st.drafted;
      const int32_t g1 = Sampler::argmax(logits.f32(), V);
      if (g1 == d) {
        ++st.accepted;
        const int32_t g2 = Sampler::argmax(logits.f32() + V, V);
        if (!emit(d) || !emit(g2)) {
          go = false;
          break;
        }
        t = g2;
        d = draft(X, {d, g2});
      } else {
        cache = before;
        logits = m.forward({t}, cache, false, &X);
        const int32_t g = Sampler::argmax(logits.f32(), V);
        if (!emit(g)) {
          go = false;
          break;
        }
        t = g;
        d = draft(X, {g});
      }
    }
    if (go && cache.len < total && int64_t(out.size()) < opt.max_new_tokens) {  // room for one plain step only
      logits = m.forward({t}, cache);
      emit(Sampler::argmax(logits.f32(), V));
    }
  }
  while (!opt.speculative_mtp && int64_t(out.size()) < opt.max_new_tokens && cache.len + int64_t(next.size()) <= total) {
    Tensor logits = m.forward(next, cache);
    if (first) {
      st.prefill_s = std::chrono::duration<double>(clk::now() - t0).count();
      t0 = clk::now();
      first = false;
    }
    const int32_t tok = sampler.sample(logits.f32(), cfg.vocab_size);
    out.push_back(tok);
    if (on_token && !on_token(tok)) break;
    if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), tok) != opt.stop_ids.end()) {
      st.finish_reason = "stop";
      break;
    }
    next = {tok};
  }
  if (!first) st.decode_s = std::chrono::duration<double>(clk::now() - t0).count();
  st.new_tokens = int64_t(out.size());
  if (stats) *stats = st;
  return out;
}

}  // namespace dsv3
