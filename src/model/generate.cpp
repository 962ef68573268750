#include "model/generate.h"

#include <algorithm>
#include <chrono>

namespace dsv3 {

std::vector<int32_t> generate_speculative(Model& m, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                          GenerateStats* stats, const std::function<bool(int32_t)>& on_token);

std::vector<int32_t> generate(Model& m, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                              GenerateStats* stats, const std::function<bool(int32_t)>& on_token) {
  const ModelConfig& cfg = m.config();
  if (prompt.empty()) fail("the prompt is empty");
  if (opt.max_new_tokens < 0) fail("max_new_tokens must be >= 0");
  if (int64_t(prompt.size()) > cfg.max_position_embeddings)
    fail("prompt of {} tokens exceeds max_position_embeddings = {}", prompt.size(), cfg.max_position_embeddings);
  if (opt.speculative_mtp) return generate_speculative(m, prompt, opt, stats, on_token);
  const int64_t total = std::min<int64_t>(int64_t(prompt.size()) + opt.max_new_tokens, cfg.max_position_embeddings);
  KvCache cache(m.backend(), cfg, total);
  SeqCache seq;
  Sampler sampler(opt.sampling);
  GenerateStats st;
  st.prompt_tokens = int64_t(prompt.size());
  st.finish_reason = "length";
  std::vector<int32_t> out;
  using clk = std::chrono::steady_clock;
  auto t0 = clk::now();
  std::vector<BatchSeq> batch(1);
  batch[0].cache = &seq;
  batch[0].tokens = prompt;
  ForwardOptions fo;
  fo.absorb_decode = opt.absorb_decode;
  bool first = true;
  while (int64_t(out.size()) < opt.max_new_tokens && seq.len + int64_t(batch[0].tokens.size()) <= total) {
    ForwardResult r = m.forward(batch, cache, fo);
    if (first) {
      st.prefill_s = std::chrono::duration<double>(clk::now() - t0).count();
      t0 = clk::now();
      first = false;
    }
    int32_t tok = sampler.sample(r.logits.f32(), cfg.vocab_size);
    out.push_back(tok);
    if (on_token && !on_token(tok)) break;
    if (std::find(opt.stop_ids.begin(), opt.stop_ids.end(), tok) != opt.stop_ids.end()) {
      st.finish_reason = "stop";
      break;
    }
    batch[0].tokens = {tok};
    if (seq.len + 1 > total) break;
  }
  if (!first) st.decode_s = std::chrono::duration<double>(clk::now() - t0).count();
  st.new_tokens = int64_t(out.size());
  if (stats) *stats = st;
  return out;
}

}  // namespace dsv3
