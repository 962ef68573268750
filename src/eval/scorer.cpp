#include "eval/scorer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>

#include <fmt/format.h>

#include "core/error.h"

namespace dsv3 {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Reads a stream to its end; the events' text and tokens are appended. Throws on an engine error.
void drain(RequestStream& s, std::string* text, std::vector<TokenLogprob>* prompt) {
  EngineEvent ev;
  for (;;) {
    if (!s.next(&ev, std::chrono::milliseconds(1000))) continue;
    if (text) *text += ev.text;
    if (prompt)
      for (auto& t : ev.prompt_tokens) prompt->push_back(std::move(t));
    if (ev.done) {
      if (!ev.error.empty()) fail("the engine failed: {}", ev.error);
      return;
    }
  }
}

// Submits requests keeping at most `window` in flight, handing each finished stream to `take` in order.
template <class Make, class Take>
void pipeline(int64_t n, int64_t window, Make make, Take take, const Progress& progress) {
  std::deque<std::shared_ptr<RequestStream>> live;
  int64_t next = 0, done = 0;
  while (done < n) {
    while (next < n && int64_t(live.size()) < window) live.push_back(make(next++));
    take(done, *live.front());
    live.pop_front();
    ++done;
    if (progress) progress(done, n);
  }
}

}  // namespace

std::vector<ScoreResult> Scorer::score(const std::vector<ScoreRequest>& reqs, const Progress& progress) {
  std::vector<ScoreResult> out(reqs.size());
  pipeline(
      int64_t(reqs.size()), in_flight_,
      [&](int64_t i) {
        const ScoreRequest& r = reqs[size_t(i)];
        if (r.score_from < 1 || r.score_from > r.tokens.size()) fail("request {}: nothing to score", i);
        EngineRequest e;
        e.prompt = r.tokens;
        e.max_tokens = 0;
        e.prompt_logprobs = true;
        e.logprobs = 1;  // the top token tells whether the scored token was the greedy choice
        return engine_.submit(std::move(e));
      },
      [&](int64_t i, RequestStream& s) {
        std::vector<TokenLogprob> lp;
        drain(s, nullptr, &lp);
        const ScoreRequest& r = reqs[size_t(i)];
        if (lp.size() != r.tokens.size()) fail("request {}: {} prompt logprobs for {} tokens", i, lp.size(), r.tokens.size());
        ScoreResult& res = out[size_t(i)];
        for (size_t j = r.score_from; j < lp.size(); ++j) {
          res.logprob += lp[j].logprob;
          res.greedy = res.greedy && !lp[j].top.empty() && lp[j].top[0].first == lp[j].id;
          ++res.tokens;
        }
      },
      progress);
  return out;
}

std::vector<std::string> Scorer::generate(const std::vector<GenRequest>& reqs, const Progress& progress) {
  std::vector<std::string> out(reqs.size());
  pipeline(
      int64_t(reqs.size()), in_flight_,
      [&](int64_t i) {
        const GenRequest& g = reqs[size_t(i)];
        EngineRequest e;
        e.prompt = g.prompt;
        e.sampling = g.sampling;
        e.max_tokens = g.max_tokens;
        e.stop = g.stop;
        return engine_.submit(std::move(e));
      },
      [&](int64_t i, RequestStream& s) { drain(s, &out[size_t(i)], nullptr); }, progress);
  return out;
}

ProgressLine::ProgressLine(std::string name, bool enabled) : name_(std::move(name)), enabled_(enabled), t0_(now_s()) {}

void ProgressLine::operator()(int64_t done, int64_t total) {
  if (!enabled_) return;
  const double t = now_s();
  if (done < total && t - last_ < 0.2) return;
  last_ = t;
  const double rate = done / std::max(1e-9, t - t0_);
  const double eta = rate > 0 ? (total - done) / rate : 0;
  std::fprintf(stderr, "\r%s  %lld/%lld  %3.0f%%  %.1f/s  ETA %.0fs   ", name_.c_str(), (long long)done,
               (long long)total, 100.0 * done / std::max<int64_t>(total, 1), rate, eta);
  std::fflush(stderr);
}

void ProgressLine::finish() {
  if (enabled_) std::fprintf(stderr, "\n");
}

}  // namespace dsv3
