// MTP speculative decoding (greedy): the model's own MTP module drafts the token after next; one main-model
// pass over [current, draft] verifies it. Accepted: two tokens for one main pass. Rejected: the main model's
// own token is kept and the draft's cache entry is dropped by shortening the sequence (the latent cache is
// position-addressed, so the stale row is simply overwritten later). Output is identical to plain greedy
// decoding because every emitted token is the main model's argmax given the tokens before it.
#include <chrono>

#include "model/generate.h"

namespace dsv3 {

std::vector<int32_t> generate_speculative(Model& m, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                          GenerateStats* stats, const std::function<bool(int32_t)>& on_token) {
  const ModelConfig& cfg = m.config();
  if (cfg.num_nextn_predict_layers < 1) fail("--speculative mtp needs a model with MTP modules (num_nextn_predict_layers >= 1)");
  if (opt.sampling.temperature > 0) fail("--speculative mtp supports greedy decoding only (temperature 0)");
  Backend& be = m.backend();
  const int64_t P = int64_t(prompt.size());
  const int64_t total = std::min<int64_t>(P + opt.max_new_tokens + 1, cfg.max_position_embeddings);
  KvCache cache(be, cfg, 2 * (total + 64));
  SeqCache main_seq, mtp_seq;
  GenerateStats st;
  st.prompt_tokens = P;
  st.finish_reason = "length";
  std::vector<int32_t> out;
  using clk = std::chrono::steady_clock;
  auto t0 = clk::now();
  const int64_t V = cfg.vocab_size;

  // Emits a token; returns false when generation must end.
  auto emit = [&](int32_t tok) {
    out.push_back(tok);
    if (on_token && !on_token(tok)) return false;
    for (auto s : opt.stop_ids)
      if (s == tok) {
        st.finish_reason = "stop";
        return false;
      }
    return int64_t(out.size()) < opt.max_new_tokens;
  };
  // MTP rows: consume `toks` with the main hidden states `h` [n, H] (batch order); returns the draft.
  auto draft = [&](const std::vector<int32_t>& toks, const Tensor& h) {
    std::vector<BatchSeq> b(1);
    b[0].cache = &mtp_seq;
    b[0].tokens = toks;
    Tensor logits;
    m.mtp_forward(1, h, b, cache, &logits);
    return Sampler::argmax(logits.f32() + (logits.dim(0) - 1) * V, V);
  };

  std::vector<BatchSeq> b(1);
  b[0].cache = &main_seq;
  b[0].tokens = prompt;
  ForwardOptions fo;
  fo.keep_hidden = true;
  ForwardResult r = m.forward(b, cache, fo);
  int32_t t = Sampler::argmax(r.logits.f32(), V);
  std::vector<int32_t> mtp_toks(prompt.begin() + 1, prompt.end());
  mtp_toks.push_back(t);
  int32_t d = draft(mtp_toks, r.hidden);
  st.prefill_s = std::chrono::duration<double>(clk::now() - t0).count();
  t0 = clk::now();
  bool go = opt.max_new_tokens > 0 && emit(t);
  while (go && main_seq.len + 2 <= total) {
    b[0].tokens = {t, d};
    fo.all_logits = true;
    r = m.forward(b, cache, fo);
    ++st.drafted;
    const int32_t g1 = Sampler::argmax(r.logits.f32(), V);
    if (g1 == d) {
      ++st.accepted;
      const int32_t g2 = Sampler::argmax(r.logits.f32() + V, V);
      if (!emit(d) || !emit(g2)) break;
      t = g2;
      d = draft({d, g2}, r.hidden);
    } else {
      main_seq.len -= 1;  // drop the rejected draft's cache row
      if (!emit(g1)) break;
      t = g1;
      d = draft({g1}, r.hidden.rows(0, 1));
    }
  }
  st.decode_s = std::chrono::duration<double>(clk::now() - t0).count();
  st.new_tokens = int64_t(out.size());
  if (stats) *stats = st;
  return out;
}

}  // namespace dsv3
