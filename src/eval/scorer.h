#pragma once
// What `dsv3 eval` asks of a model, run through the serving engine (the same continuous batching, chunked
// prefill and latent cache as `dsv3 serve`): log-likelihoods of token sequences (prompt logprobs) and greedy
// or sampled generations. Requests are kept in flight up to the engine's queue, results come back in order.
#include <functional>
#include <string>
#include <vector>

#include "serve/engine.h"

namespace dsv3 {

struct ScoreRequest {
  std::vector<int32_t> tokens;  // context + continuation
  size_t score_from = 1;        // logprobs of tokens[score_from ..] are summed (>= 1: token 0 has no prediction)
};

struct ScoreResult {
  double logprob = 0;           // sum of log p(token | the tokens before it)
  bool greedy = true;           // every scored token was the argmax
  int64_t tokens = 0;           // tokens scored
};

struct GenRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int64_t max_tokens = 256;
  std::vector<std::string> stop;
};

using Progress = std::function<void(int64_t done, int64_t total)>;

class Scorer {
 public:
  explicit Scorer(Engine& engine, int64_t in_flight = 64) : engine_(engine), in_flight_(in_flight) {}
  std::vector<ScoreResult> score(const std::vector<ScoreRequest>& reqs, const Progress& progress = {});
  std::vector<std::string> generate(const std::vector<GenRequest>& reqs, const Progress& progress = {});

 private:
  Engine& engine_;
  int64_t in_flight_;
};

// A live progress line on stderr ("name  120/400  30%  12.3/s  ETA 25s"), only when stderr is a terminal
// unless forced; finish() ends the line.
class ProgressLine {
 public:
  ProgressLine(std::string name, bool enabled);
  void operator()(int64_t done, int64_t total);
  void finish();

 private:
  std::string name_;
  bool enabled_;
  double t0_;
  double last_ = -1;
};

}  // namespace dsv3
