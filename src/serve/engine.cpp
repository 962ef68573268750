#include "serve/engine.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <unordered_map>

namespace dsv3 {

using clk = std::chrono::steady_clock;

TokenLogprob score_token(const float* l, int64_t V, int32_t id, int64_t k) {
  // Double accumulation: the same value log_softmax gives in fp64, within fp32 rounding of the result.
  double mx = l[0];
  for (int64_t i = 1; i < V; ++i) mx = std::max(mx, double(l[i]));
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(double(l[i]) - mx);
  const double lse = mx + std::log(sum);
  TokenLogprob t;
  t.id = id;
  t.logprob = id >= 0 ? float(double(l[id]) - lse) : std::numeric_limits<float>::quiet_NaN();
  k = std::min<int64_t>(k, V);
  if (k == 1) {  // the common case (is the token greedy?): one pass, no index array
    const int32_t best = Sampler::argmax(l, V);
    t.top.push_back({best, float(double(l[best]) - lse)});
  } else if (k > 1) {
    std::vector<int32_t> ix(V);
    std::iota(ix.begin(), ix.end(), 0);
    std::partial_sort(ix.begin(), ix.begin() + k, ix.end(),
                      [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    for (int64_t i = 0; i < k; ++i) t.top.push_back({ix[i], float(double(l[ix[i]]) - lse)});
  }
  return t;
}

// The last event of a sequence that ends without output (cancelled, failed).
static EngineEvent final_event(const char* reason, const std::string& error) {
  EngineEvent ev;
  ev.done = true;
  ev.finish_reason = reason;
  ev.error = error;
  return ev;
}

bool RequestStream::next(EngineEvent* ev, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> g(mu_);
  if (!cv_.wait_for(g, timeout, [&] { return !q_.empty(); })) return false;
  *ev = std::move(q_.front());
  q_.pop_front();
  return true;
}

void RequestStream::push(EngineEvent ev) {
  {
    std::lock_guard<std::mutex> g(mu_);
    q_.push_back(std::move(ev));
  }
  cv_.notify_all();
}

struct Engine::Seq {
  std::shared_ptr<RequestStream> out;
  EngineRequest req;
  SeqCache cache;
  size_t fed = 0;             // prompt tokens already in the cache
  int32_t last = -1;          // last sampled token (input of the next decode step)
  int64_t generated = 0;
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<StreamDecoder> decoder;
  std::string text;           // generated text so far (complete UTF-8)
  size_t sent = 0;            // bytes of `text` already streamed
  size_t max_stop = 0;
  clk::time_point t_submit, t_first;
  bool done = false;
  // Speculative decoding (greedy requests when the engine has it on):
  bool spec = false;
  SeqCache mtp_cache;
  int32_t draft = -1;                    // drafted token for the next verify step, -1 if none
  std::vector<int32_t> mtp_tokens;       // MTP rows to run this step: tokens consumed ...
  std::vector<std::vector<float>> mtp_h; // ... with the main hidden state at the same position
  std::vector<float> pending_h;          // last prefill row's hidden state, waiting for its next token
  // Logprobs and logit processing:
  std::vector<TokenLogprob> pending_lp;  // scored tokens not yet handed out in an event
  std::vector<TokenLogprob> prompt_lp;   // prompt tokens scored so far (prompt_logprobs)
  std::unordered_map<int32_t, int64_t> counts;  // generated token -> occurrences (penalties)
  std::vector<float> row;                // processed logits of the current step
  bool processed = false;                // penalties or logit_bias change the logits

  void push(EngineEvent ev) {
    ev.tokens = std::move(pending_lp);
    pending_lp.clear();
    out->push(std::move(ev));
  }
  void push_text(std::string t) {
    EngineEvent ev;
    ev.text = std::move(t);
    push(std::move(ev));
  }
};

Engine::Engine(Model& model, const Tokenizer& tok, const EngineConfig& cfg)
    : Engine(
          latent_serving_limits(model.config()),
          [&model](int64_t tokens, int64_t block) { return std::make_unique<LatentServingModel>(model, tokens, block); },
          tok, cfg) {}

Engine::Engine(const ServingLimits& limits, const ModelFactory& make, const Tokenizer& tok, const EngineConfig& cfg)
    : lim_(limits), tok_(tok), cfg_(cfg) {
  start(make);
}

void Engine::start(const ModelFactory& make) {
  if (cfg_.max_batch < 1 || cfg_.max_batch > 4096) fail("--max-batch must be in [1, 4096], got {}", cfg_.max_batch);
  if (cfg_.speculative_mtp && !lim_.has_mtp) fail("--speculative mtp needs a model with an MTP module");
  if (cfg_.kv_cache_tokens <= 0) cfg_.kv_cache_tokens = cfg_.max_batch * std::min<int64_t>(lim_.max_positions, 2048);
  sm_ = make(cfg_.kv_cache_tokens, cfg_.block_size);
  m_.kv_blocks_total = sm_->total_blocks();
  m_.kv_block_size = cfg_.block_size;
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

int64_t Engine::capacity_tokens() const { return sm_->total_blocks() * sm_->block_size(); }

std::shared_ptr<RequestStream> Engine::submit(EngineRequest req) {
  struct {
    int64_t vocab_size, max_position_embeddings;
  } mc{lim_.vocab_size, lim_.max_positions};
  if (req.prompt.empty()) fail("the prompt is empty");
  for (auto id : req.prompt)
    if (id < 0 || id >= mc.vocab_size) fail("token id {} is out of range for vocab_size {}", id, mc.vocab_size);
  if (req.max_tokens < (req.prompt_logprobs ? 0 : 1))
    fail("max_tokens must be at least {}, got {}", req.prompt_logprobs ? 0 : 1, req.max_tokens);
  if (req.logprobs < -1 || req.logprobs > 20) fail("logprobs must be in [0, 20], got {}", req.logprobs);
  for (auto& [id, b] : req.logit_bias)
    if (id < 0 || id >= mc.vocab_size || !(b >= -100 && b <= 100))
      fail("logit_bias: token {} must be in [0, {}) and its bias in [-100, 100]", id, mc.vocab_size);
  const int64_t need = int64_t(req.prompt.size()) + req.max_tokens;
  if (need > mc.max_position_embeddings)
    fail("this model's maximum context length is {} tokens; the prompt ({} tokens) plus max_tokens ({}) is {}",
         mc.max_position_embeddings, req.prompt.size(), req.max_tokens, need);
  if (need > capacity_tokens())
    fail("prompt plus max_tokens ({} tokens) exceeds the server's KV cache ({} tokens)", need, capacity_tokens());
  validate_sampling(req.sampling);
  auto s = std::make_unique<Seq>();
  s->out = std::make_shared<RequestStream>();
  s->out->prompt_tokens = int64_t(req.prompt.size());
  s->sampler = std::make_unique<Sampler>(req.sampling);
  s->decoder = std::make_unique<StreamDecoder>(tok_);
  s->processed = req.presence_penalty != 0 || req.frequency_penalty != 0 || !req.logit_bias.empty();
  for (auto& st : req.stop) s->max_stop = std::max(s->max_stop, st.size());
  s->req = std::move(req);
  s->t_submit = clk::now();
  auto out = s->out;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (int64_t(waiting_.size()) >= cfg_.max_queue) {
      ++m_.requests_rejected;
      throw OverloadedError(fmt::format("the server is at capacity ({} requests waiting); retry later", waiting_.size()));
    }
    ++m_.requests_total;
    m_.prompt_tokens_total += out->prompt_tokens;
    waiting_.push_back(std::move(s));
  }
  cv_.notify_all();
  return out;
}

EngineMetrics Engine::metrics() {
  std::lock_guard<std::mutex> g(mu_);
  EngineMetrics m = m_;
  m.waiting = int64_t(waiting_.size());
  return m;
}

bool Engine::emit_text(Seq& s, const std::string& piece) {
  s.text += piece;
  // A stop string ends the output before it; text that could still grow into one is held back.
  if (s.max_stop > 0) {
    const size_t from = s.sent > s.max_stop ? s.sent - s.max_stop : 0;
    size_t cut = std::string::npos;
    for (auto& st : s.req.stop) {
      if (st.empty()) continue;
      size_t p = s.text.find(st, from);
      if (p != std::string::npos) cut = std::min(cut, p);
    }
    if (cut != std::string::npos) {
      if (cut > s.sent) s.push_text(s.text.substr(s.sent, cut - s.sent));
      s.sent = cut;
      return true;
    }
    size_t safe = s.text.size() >= s.max_stop - 1 ? s.text.size() - (s.max_stop - 1) : 0;
    while (safe > s.sent && safe < s.text.size() && (uint8_t(s.text[safe]) & 0xC0) == 0x80) --safe;  // UTF-8 boundary
    if (safe > s.sent) {
      s.push_text(s.text.substr(s.sent, safe - s.sent));
      s.sent = safe;
    }
    return false;
  }
  if (s.text.size() > s.sent) {
    s.push_text(s.text.substr(s.sent));
    s.sent = s.text.size();
  }
  return false;
}

void Engine::finish(Seq& s, const std::string& reason) {
  if (s.done) return;
  s.done = true;
  EngineEvent ev;
  if (reason == "length") {
    std::string rest = s.decoder->flush();
    s.text += rest;
    if (s.max_stop > 0) {  // the held-back tail, unless it completes a stop string
      for (auto& st : s.req.stop) {
        size_t p = st.empty() ? std::string::npos : s.text.find(st, s.sent);
        if (p != std::string::npos) s.text.resize(p);
      }
    }
    if (s.text.size() > s.sent) ev.text = s.text.substr(s.sent);
  }
  ev.done = true;
  ev.finish_reason = reason;
  s.push(std::move(ev));
  sm_->release(s.cache);
  sm_->release(s.mtp_cache);
  std::lock_guard<std::mutex> g(mu_);
  m_.kv_blocks_used = sm_->total_blocks() - sm_->free_blocks();
  if (m_.running > 0) --m_.running;
  if (reason == "cancelled") ++m_.requests_cancelled;
  else ++m_.requests_finished;
  m_.request_seconds_sum += std::chrono::duration<double>(clk::now() - s.t_submit).count();
}

void Engine::loop() {
  std::vector<std::unique_ptr<Seq>> running;
  for (;;) {
    {
      std::unique_lock<std::mutex> g(mu_);
      cv_.wait(g, [&] { return stop_ || !waiting_.empty() || !running.empty(); });
      if (stop_) break;
      // Admission: reserve every block a request can need, so a running sequence never waits for memory.
      while (!waiting_.empty() && int64_t(running.size()) < cfg_.max_batch) {
        Seq& s = *waiting_.front();
        if (s.out->cancelled()) {
          s.out->push(final_event("cancelled", ""));
          ++m_.requests_cancelled;
          waiting_.pop_front();
          continue;
        }
        const int64_t need = int64_t(s.req.prompt.size()) + s.req.max_tokens + 1;  // +1: a rejected draft's row
        // Speculative verification compares raw argmaxes: only for plain greedy requests.
        s.spec = cfg_.speculative_mtp && s.req.sampling.temperature <= 0 && !s.processed && s.req.logprobs < 0 &&
                 !s.req.prompt_logprobs;
        if (sm_->free_blocks() < sm_->blocks_for(need) * (s.spec ? 2 : 1)) break;
        sm_->reserve(s.cache, need);
        if (s.spec) sm_->reserve(s.mtp_cache, need);
        running.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
      }
      m_.running = int64_t(running.size());
      m_.kv_blocks_used = sm_->total_blocks() - sm_->free_blocks();
    }
    for (auto& s : running)
      if (s->out->cancelled()) finish(*s, "cancelled");
    running.erase(std::remove_if(running.begin(), running.end(), [](auto& s) { return s->done; }), running.end());
    if (running.empty()) continue;
    try {
      step(running);
    } catch (const std::exception& e) {
      for (auto& s : running) {
        s->out->push(final_event("error", e.what()));
        s->done = true;
        sm_->release(s->cache);
        sm_->release(s->mtp_cache);
      }
    }
    running.erase(std::remove_if(running.begin(), running.end(), [](auto& s) { return s->done; }), running.end());
  }
  for (auto& s : running) s->out->push(final_event("cancelled", "server shutting down"));
}

bool Engine::accept_token(Seq& s, int32_t tok) {
  const int32_t eos = lim_.eos_token_id;
  s.last = tok;
  ++s.generated;
  if (s.processed) ++s.counts[tok];
  s.out->completion_tokens = s.generated;
  if (s.generated == 1) s.t_first = clk::now();
  if (tok == eos && !s.req.ignore_eos) {
    std::string rest = s.decoder->flush();
    if (!rest.empty() && emit_text(s, rest)) {
      finish(s, "stop");
      return false;
    }
    if (s.text.size() > s.sent) s.push_text(s.text.substr(s.sent)), s.sent = s.text.size();
    finish(s, "stop");
    return false;
  }
  if (emit_text(s, s.decoder->push(tok))) {
    finish(s, "stop");
    return false;
  }
  if (s.generated >= s.req.max_tokens) {
    finish(s, "length");
    return false;
  }
  return true;
}

void Engine::run_mtp(std::vector<Seq*>& seqs) {
  // One batched pass of MTP module 1 over every sequence's pending rows; each sequence's last row drafts.
  std::vector<BatchSeq> batch;
  std::vector<Seq*> who;
  const int64_t V = lim_.vocab_size;
  std::vector<float> h;
  for (Seq* s : seqs) {
    if (s->done || s->mtp_tokens.empty()) continue;
    BatchSeq b;
    b.cache = &s->mtp_cache;
    b.tokens = s->mtp_tokens;
    for (auto& row : s->mtp_h) h.insert(h.end(), row.begin(), row.end());
    batch.push_back(std::move(b));
    who.push_back(s);
  }
  for (Seq* s : seqs) s->mtp_tokens.clear(), s->mtp_h.clear();
  if (batch.empty()) return;
  Tensor logits = sm_->mtp_logits(batch, h);
  int64_t row = 0;
  for (size_t i = 0; i < who.size(); ++i) {
    row += int64_t(batch[i].tokens.size());
    who[i]->draft = Sampler::argmax(logits.f32() + (row - 1) * V, V);
  }
}

// Applies the request's penalties and logit bias, samples, and scores the chosen token when asked.
int32_t Engine::sample_next(Seq& s, const float* logits) {
  const int64_t V = lim_.vocab_size;
  const float* l = logits;
  if (s.processed) {
    s.row.assign(logits, logits + V);
    float* r = s.row.data();
    for (auto& [id, c] : s.counts) r[id] -= float(s.req.frequency_penalty * double(c) + s.req.presence_penalty);
    for (auto& [id, b] : s.req.logit_bias) r[id] += b;
    l = r;
  }
  const int32_t tok = s.sampler->sample(l, V);
  if (s.req.logprobs >= 0) s.pending_lp.push_back(score_token(l, V, tok, s.req.logprobs));
  return tok;
}

void Engine::step(std::vector<std::unique_ptr<Seq>>& running) {
  auto t0 = clk::now();
  std::vector<BatchSeq> batch;
  std::vector<Seq*> who;
  int64_t budget = cfg_.prefill_chunk, tokens = 0;
  bool any_spec = false;
  for (auto& sp : running) {
    Seq& s = *sp;
    BatchSeq b;
    b.cache = &s.cache;
    if (s.fed < s.req.prompt.size()) {
      if (budget <= 0) continue;  // this sequence's prefill waits for the next step
      const size_t n = std::min<size_t>(s.req.prompt.size() - s.fed, size_t(budget));
      b.tokens.assign(s.req.prompt.begin() + s.fed, s.req.prompt.begin() + s.fed + n);
      b.all_logits = s.req.prompt_logprobs;
      budget -= int64_t(n);
    } else if (s.spec && s.draft >= 0) {
      b.tokens = {s.last, s.draft};  // verify the draft in the same pass
      b.all_logits = true;
      sm_->mark_draft(s.cache);
    } else {
      b.tokens = {s.last};
    }
    any_spec |= s.spec;
    tokens += int64_t(b.tokens.size());
    batch.push_back(std::move(b));
    who.push_back(&s);
  }
  if (batch.empty()) return;
  ForwardOptions fo;
  fo.keep_hidden = any_spec;
  ForwardResult r = sm_->forward(batch, fo);
  const int64_t V = lim_.vocab_size, H = lim_.hidden_row;
  Tensor hidden = any_spec ? r.hidden : Tensor();
  auto hrow = [&](int64_t row) { return std::vector<float>(hidden.f32() + row * H, hidden.f32() + (row + 1) * H); };
  int64_t generated = 0, drafted = 0, accepted = 0, lrow = 0, hbase = 0;
  double ttft = 0;
  std::vector<Seq*> spec_seqs;
  for (size_t i = 0; i < who.size(); ++i) {
    Seq& s = *who[i];
    const int64_t n = int64_t(batch[i].tokens.size());
    const float* logits = r.logits.f32() + lrow * V;
    lrow += batch[i].all_logits ? n : 1;
    const int64_t h0 = hbase;
    hbase += n;
    const int64_t before = s.generated;
    if (s.fed < s.req.prompt.size()) {
      // Prefill chunk. MTP row j consumes token j+1 with the hidden state at j: the previous chunk's last row
      // now has its token, and this chunk's rows but the last have theirs.
      const size_t fed0 = s.fed;
      s.fed += size_t(n);
      if (s.req.prompt_logprobs) {
        // Row j of the chunk predicts prompt token fed0 + j + 1; the last row of the prompt predicts the output.
        if (fed0 == 0) s.prompt_lp.push_back(score_token(logits, V, -1, 0)), s.prompt_lp.back().id = s.req.prompt[0];
        // Rows are independent: score them on every core (a log-softmax over V each).
        const int64_t rows = std::min<int64_t>(n, int64_t(s.req.prompt.size()) - int64_t(fed0) - 1);
        const size_t base = s.prompt_lp.size();
        s.prompt_lp.resize(base + size_t(std::max<int64_t>(rows, 0)));
#pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < rows; ++j)
          s.prompt_lp[base + size_t(j)] =
              score_token(logits + j * V, V, s.req.prompt[fed0 + j + 1], std::max<int64_t>(s.req.logprobs, 0));
        logits += (n - 1) * V;  // the sampler reads the last row
        if (s.fed == s.req.prompt.size()) {
          EngineEvent ev;
          ev.prompt_tokens = std::move(s.prompt_lp);
          s.out->push(std::move(ev));
          if (s.req.max_tokens == 0) {
            finish(s, "length");
            continue;
          }
        }
      }
      if (s.spec) {
        if (!s.pending_h.empty()) s.mtp_tokens.push_back(s.req.prompt[fed0]), s.mtp_h.push_back(s.pending_h);
        for (int64_t j = 0; j + 1 < n; ++j) s.mtp_tokens.push_back(s.req.prompt[fed0 + j + 1]), s.mtp_h.push_back(hrow(h0 + j));
        s.pending_h = hrow(h0 + n - 1);
      }
      if (s.fed < s.req.prompt.size()) {
        if (s.spec) spec_seqs.push_back(&s);
        continue;
      }
      const int32_t tok = sample_next(s, logits);
      if (accept_token(s, tok) && s.spec) {
        s.mtp_tokens.push_back(tok), s.mtp_h.push_back(s.pending_h);
        s.pending_h.clear();
      }
    } else if (batch[i].all_logits) {
      // Verify: the main model's token after `last`, compared with the draft.
      ++drafted;
      const int32_t g1 = Sampler::argmax(logits, V);
      if (g1 == s.draft) {
        ++accepted;
        const int32_t g2 = Sampler::argmax(logits + V, V);
        if (accept_token(s, g1) && accept_token(s, g2))
          s.mtp_tokens = {g1, g2}, s.mtp_h = {hrow(h0), hrow(h0 + 1)};
      } else {
        sm_->reject_draft(s.cache);  // the cache as if the draft had not been fed
        if (accept_token(s, g1)) s.mtp_tokens = {g1}, s.mtp_h = {hrow(h0)};
      }
      s.draft = -1;
    } else {
      const int32_t tok = sample_next(s, logits);
      if (accept_token(s, tok) && s.spec) s.mtp_tokens = {tok}, s.mtp_h = {hrow(h0)};
    }
    generated += s.generated - before;
    if (before == 0 && s.generated > 0) ttft += std::chrono::duration<double>(s.t_first - s.t_submit).count();
    if (s.spec && !s.done) spec_seqs.push_back(&s);
  }
  run_mtp(spec_seqs);
  std::lock_guard<std::mutex> g(mu_);
  m_.steps_total += 1;
  m_.batch_tokens_sum += tokens;
  m_.batch_seqs_sum += int64_t(batch.size());
  m_.batch_seqs_max = std::max<int64_t>(m_.batch_seqs_max, int64_t(batch.size()));
  m_.generation_tokens_total += generated;
  m_.ttft_seconds_sum += ttft;
  m_.spec_drafted += drafted;
  m_.spec_accepted += accepted;
  m_.step_seconds_sum += std::chrono::duration<double>(clk::now() - t0).count();
}

}  // namespace dsv3
