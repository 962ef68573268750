#pragma once
// The continuous-batching engine behind `dsv3 serve`. One scheduler thread owns the model: between forward
// steps it admits queued requests (when the paged latent cache has blocks for prompt + max_tokens), then runs
// one forward over every running sequence (decode steps and prefill chunks together), samples, streams text
// out, and retires finished or cancelled sequences, returning their blocks. HTTP threads only submit and read.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model/model.h"
#include "model/sampler.h"
#include "serve/serving_model.h"
#include "tokenizer/tokenizer.h"

namespace dsv3 {

struct EngineConfig {
  int64_t max_batch = 32;        // sequences running at once
  int64_t kv_cache_tokens = 0;   // pool capacity; 0: max_batch * min(context, 2048)
  int64_t block_size = 64;
  int64_t max_queue = 256;       // waiting requests beyond this are refused (HTTP 503)
  int64_t prefill_chunk = 512;   // prompt tokens fed per step across all sequences (chunked prefill)
  bool speculative_mtp = false;  // greedy requests draft with the MTP module and verify in the same step
};

struct EngineRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int64_t max_tokens = 16;        // 0 only with prompt_logprobs (score the prompt, generate nothing)
  std::vector<std::string> stop;  // stop strings (not included in the output)
  bool ignore_eos = false;
  int64_t logprobs = -1;          // per generated token: -1 off, k >= 0: its logprob plus the top k alternatives
  bool prompt_logprobs = false;   // logprobs of prompt tokens 1.. (token 0 has no prediction), top `logprobs` each
  // Logit processing before sampling (OpenAI semantics): logit -= frequency_penalty * count(generated token)
  // + presence_penalty * [count > 0], then logit += logit_bias[token]. Logprobs are log_softmax of these
  // processed logits (before temperature, top-k and top-p).
  double presence_penalty = 0, frequency_penalty = 0;
  std::vector<std::pair<int32_t, float>> logit_bias;
};

// One scored token: its logprob and the `top` most likely tokens at that position (descending).
struct TokenLogprob {
  int32_t id = -1;
  float logprob = 0;              // NaN for the first prompt token (nothing predicts it)
  std::vector<std::pair<int32_t, float>> top;
};

struct EngineEvent {
  std::string text;               // new text (complete UTF-8)
  int64_t new_tokens = 0;
  bool done = false;
  std::string finish_reason;      // stop | length | cancelled | error
  std::string error;
  std::vector<TokenLogprob> tokens;          // generated tokens since the last event (when logprobs >= 0)
  std::vector<TokenLogprob> prompt_tokens;   // every prompt token, once (when prompt_logprobs)
};

// log_softmax of one row of V logits at `id`, and the k most likely tokens (ties: lower id first).
TokenLogprob score_token(const float* logits, int64_t V, int32_t id, int64_t k);

// What a request's reader sees: a queue of events, and a way to cancel (client gone).
class RequestStream {
 public:
  // Waits up to `timeout` for the next event; false on timeout.
  bool next(EngineEvent* ev, std::chrono::milliseconds timeout);
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }
  int64_t prompt_tokens = 0;
  std::atomic<int64_t> completion_tokens{0};

 private:
  friend class Engine;
  void push(EngineEvent ev);
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<EngineEvent> q_;
  std::atomic<bool> cancelled_{false};
};

// Thrown by submit when the queue is full (the server answers 503 with this message).
struct OverloadedError : Error {
  using Error::Error;
};

struct EngineMetrics {
  int64_t requests_total = 0, requests_rejected = 0, requests_cancelled = 0, requests_finished = 0;
  int64_t prompt_tokens_total = 0, generation_tokens_total = 0;
  int64_t steps_total = 0, batch_tokens_sum = 0, batch_seqs_sum = 0, batch_seqs_max = 0;
  double step_seconds_sum = 0, request_seconds_sum = 0, ttft_seconds_sum = 0;
  int64_t running = 0, waiting = 0, kv_blocks_used = 0, kv_blocks_total = 0, kv_block_size = 0;
  int64_t spec_drafted = 0, spec_accepted = 0;  // MTP drafts verified and accepted
};

class Engine {
 public:
  // DeepSeek-V3 / R1 / V3.2 on the paged latent cache.
  Engine(Model& model, const Tokenizer& tok, const EngineConfig& cfg);
  // Any model behind the serving interface (DeepSeek-V4: V4ServingModel); the cache is made here from cfg.
  using ModelFactory = std::function<std::unique_ptr<ServingModel>(int64_t capacity_tokens, int64_t block_size)>;
  Engine(const ServingLimits& limits, const ModelFactory& make, const Tokenizer& tok, const EngineConfig& cfg);
  ~Engine();
  // Validates (InputError: too long, bad ids), queues (OverloadedError when full), starts streaming.
  std::shared_ptr<RequestStream> submit(EngineRequest req);
  EngineMetrics metrics();
  const ServingLimits& limits() const { return lim_; }
  int64_t capacity_tokens() const;

 private:
  struct Seq;
  void loop();
  void step(std::vector<std::unique_ptr<Seq>>& running);
  void finish(Seq& s, const std::string& reason);
  bool emit_text(Seq& s, const std::string& piece);  // true when a stop string ended the sequence
  bool accept_token(Seq& s, int32_t tok);            // emits one token; false when the sequence finished
  void run_mtp(std::vector<Seq*>& seqs);             // drafts for sequences with pending MTP rows
  int32_t sample_next(Seq& s, const float* logits);  // logit processing, sampling, logprobs

  void start(const ModelFactory& make);
  ServingLimits lim_;
  std::unique_ptr<ServingModel> sm_;
  Tokenizer tok_;
  EngineConfig cfg_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Seq>> waiting_;
  EngineMetrics m_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace dsv3
