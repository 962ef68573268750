#include "model/v4_generate.h"

#include <algorithm>
#include <chrono>

namespace dsv3 {

std::vector<int32_t> v4_generate(V4Model& m, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                 GenerateStats* stats, const std::function<bool(int32_t)>& on_token) {
  const V4Config& cfg = m.config();
  if (prompt.empty()) fail("the prompt is empty");
  if (opt.max_new_tokens < 0) fail("max_new_tokens must be >= 0");
  if (opt.speculative_mtp) fail("speculative decoding is not available for DeepSeek-V4 models (the MTP block is not loaded)");
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
  while (int64_t(out.size()) < opt.max_new_tokens && cache.len + int64_t(next.size()) <= total) {
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
