// dsv3._core.Model: load, logits, loglikelihood, generate (whole and streaming).
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <thread>

#include "bindings.h"
#include "core/error.h"
#include "model/generate.h"
#include "model/logprobs.h"
#include "model/sequence_logits.h"

namespace dsv3::py {

namespace {

using IdArray = nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

std::vector<int32_t> ids_of(const IdArray& a, int64_t& B, int64_t& T) {
  B = int64_t(a.shape(0)), T = int64_t(a.shape(1));
  if (B < 1 || T < 1) fail("input_ids must be [B, T] with B, T >= 1, got [{}, {}]", B, T);
  return std::vector<int32_t>(a.data(), a.data() + B * T);
}

GenerateOptions gen_options(PyModel& pm, int64_t max_new, double temperature, int64_t top_k, double top_p,
                            uint64_t seed, bool ignore_eos, const std::vector<int32_t>& stop_ids, bool absorb,
                            const std::string& speculative) {
  GenerateOptions go;
  go.sampling.temperature = temperature;
  go.sampling.top_k = top_k;
  go.sampling.top_p = top_p;
  go.sampling.seed = seed;
  validate_sampling(go.sampling);
  if (max_new < 0 || max_new > (int64_t(1) << 24)) fail("max_new_tokens must be in [0, 16777216], got {}", max_new);
  if (speculative != "none" && speculative != "mtp") fail("speculative must be 'mtp' or None, got '{}'", speculative);
  go.max_new_tokens = max_new;
  go.absorb_decode = absorb;
  go.speculative_mtp = speculative == "mtp";
  go.stop_ids = stop_ids;
  if (!ignore_eos) go.stop_ids.push_back(int32_t(pm.lm.model->config().eos_token_id));
  return go;
}

nb::dict stats_dict(const GenerateStats& st) {
  nb::dict d;
  d["prompt_tokens"] = st.prompt_tokens;
  d["new_tokens"] = st.new_tokens;
  d["finish_reason"] = st.finish_reason;
  d["prefill_tokens_per_s"] = st.prefill_s > 0 ? double(st.prompt_tokens) / st.prefill_s : 0.0;
  d["decode_tokens_per_s"] = st.decode_s > 0 && st.new_tokens > 1 ? double(st.new_tokens - 1) / st.decode_s : 0.0;
  d["drafted"] = st.drafted;
  d["accepted"] = st.accepted;
  return d;
}

// Streaming generation: generate() runs on its own thread and queues text pieces; Python pulls them with the
// GIL released while it waits (checking for Ctrl-C every 50 ms). Closing or dropping the stream cancels the
// generation at the next token and joins the thread.
class TokenStream {
 public:
  TokenStream(PyModel& pm, std::vector<int32_t> prompt, GenerateOptions go)
      : pm_(pm), lock_(pm.acquire("a generate(stream=True) iterator is open")), dec_(pm.tokenizer()) {
    thread_ = std::thread([this, prompt = std::move(prompt), go = std::move(go)] {
      try {
        GenerateStats st;
        generate(*pm_.lm.model, prompt, go, &st, [this](int32_t t) {
          std::string piece = dec_.push(t);
          std::lock_guard<std::mutex> g(mu_);
          ids_.push_back(t);
          if (!piece.empty()) q_.push_back(std::move(piece));
          cv_.notify_all();
          return !cancel_;
        });
        std::string rest = dec_.flush();
        std::lock_guard<std::mutex> g(mu_);
        if (!rest.empty()) q_.push_back(std::move(rest));
        stats_ = st;
      } catch (...) {
        std::lock_guard<std::mutex> g(mu_);
        error_ = std::current_exception();
      }
      std::lock_guard<std::mutex> g(mu_);
      done_ = true;
      cv_.notify_all();
    });
  }
  ~TokenStream() { close(); }

  std::string next() {
    for (;;) {
      {
        nb::gil_scoped_release nogil;
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait_for(lk, std::chrono::milliseconds(50), [&] { return !q_.empty() || done_; });
        if (!q_.empty()) {
          std::string s = std::move(q_.front());
          q_.pop_front();
          return s;
        }
        if (done_) {
          if (error_) {
            auto e = error_;
            error_ = nullptr;
            lk.unlock();
            join();
            std::rethrow_exception(e);
          }
          lk.unlock();
          join();
          throw nb::stop_iteration();
        }
      }
      if (interrupted()) {
        close();
        throw nb::python_error();
      }
    }
  }

  void close() {
    {
      std::lock_guard<std::mutex> g(mu_);
      cancel_ = true;
    }
    nb::gil_scoped_release nogil;
    join();
  }

  std::vector<int32_t> ids() {
    std::lock_guard<std::mutex> g(mu_);
    return ids_;
  }
  nb::object stats() {
    std::lock_guard<std::mutex> g(mu_);
    if (!done_ || error_) return nb::none();
    return stats_dict(stats_);
  }

 private:
  void join() {
    if (thread_.joinable()) thread_.join();
    lock_.release();
  }
  PyModel& pm_;
  BusyLock lock_;
  StreamDecoder dec_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> q_;
  std::vector<int32_t> ids_;
  GenerateStats stats_;
  std::exception_ptr error_;
  bool done_ = false, cancel_ = false;
};

}  // namespace

void bind_model(nb::module_& m) {
  nb::class_<PyModel>(m, "Model")
      .def("__init__",
           [](PyModel* self, const std::string& path, const std::string& device, const std::string& dtype,
              const std::string& tokenizer) {
             new (self) PyModel();
             self->dir = path;
             self->tokenizer_path = tokenizer;
             nb::gil_scoped_release nogil;
             self->lm = open_model(path, device, dtype);
           },
           nb::arg("path"), nb::arg("device") = "cpu", nb::arg("dtype") = "auto", nb::arg("tokenizer") = "")
      .def_prop_ro("vocab_size", [](PyModel& pm) { return pm.lm.model->config().vocab_size; })
      .def_prop_ro("max_position_embeddings", [](PyModel& pm) { return pm.lm.model->config().max_position_embeddings; })
      .def_prop_ro("eos_token_id", [](PyModel& pm) { return int64_t(pm.lm.model->config().eos_token_id); })
      .def_prop_ro("mtp_modules", [](PyModel& pm) { return pm.lm.model->config().num_nextn_predict_layers; })
      .def("tokenizer", [](PyModel& pm) { return pm.tokenizer(); })
      .def_prop_ro("device", [](PyModel& pm) { return pm.lm.backend->name(); })
      .def_prop_ro("weights_dtype", [](PyModel& pm) { return std::string(dtype_name(pm.lm.model->weights().flat.dtype)); })
      .def_prop_ro("total_params", [](PyModel& pm) { return pm.lm.model->total_params(); })
      .def_prop_ro("active_params", [](PyModel& pm) { return pm.lm.model->active_params(); })
      .def("logits",
           [](PyModel& pm, const IdArray& a, bool with_mtp) {
             int64_t B, T;
             std::vector<int32_t> ids = ids_of(a, B, T);
             auto lk = pm.acquire("logits");
             SequenceLogits r;
             {
               nb::gil_scoped_release nogil;
               r = sequence_logits(*pm.lm.model, *pm.lm.backend, ids, B, T);
             }
             nb::list out;
             out.append(to_numpy_f32(std::move(r.logits)));
             if (with_mtp)
               for (auto& t : r.mtp) out.append(to_numpy_f32(std::move(t)));
             return out;
           },
           nb::arg("ids"), nb::arg("mtp") = false)
      .def("token_logprobs",
           [](PyModel& pm, const IdArray& a) {
             int64_t B, T;
             std::vector<int32_t> ids = ids_of(a, B, T);
             if (T < 2) fail("loglikelihood needs sequences of at least 2 tokens, got {}", T);
             auto lk = pm.acquire("loglikelihood");
             auto* lp = new std::vector<double>();
             {
               nb::gil_scoped_release nogil;
               SequenceLogits r = sequence_logits(*pm.lm.model, *pm.lm.backend, ids, B, T);
               *lp = token_logprobs(r.logits, ids, B, T);
             }
             nb::capsule owner(lp, [](void* p) noexcept { delete static_cast<std::vector<double>*>(p); });
             size_t shape[2] = {size_t(B), size_t(T - 1)};
             return nb::ndarray<nb::numpy, double>(lp->data(), 2, shape, owner);
           },
           nb::arg("ids"))
      .def("generate",
           [](PyModel& pm, const std::vector<int32_t>& prompt, int64_t max_new, double temperature, int64_t top_k,
              double top_p, uint64_t seed, bool ignore_eos, const std::vector<int32_t>& stop_ids, bool absorb,
              const std::string& speculative) {
             GenerateOptions go = gen_options(pm, max_new, temperature, top_k, top_p, seed, ignore_eos, stop_ids,
                                              absorb, speculative);
             auto lk = pm.acquire("generate");
             GenerateStats st;
             std::vector<int32_t> ids;
             bool stopped = false;
             {
               nb::gil_scoped_release nogil;
               // Between tokens: take the GIL back briefly to see whether Ctrl-C was pressed.
               ids = generate(*pm.lm.model, prompt, go, &st, [&](int32_t) {
                 nb::gil_scoped_acquire gil;
                 stopped = interrupted();
                 return !stopped;
               });
             }
             if (stopped) throw nb::python_error();  // KeyboardInterrupt, set by the signal check
             return nb::make_tuple(ids, stats_dict(st));
           },
           nb::arg("prompt"), nb::arg("max_new_tokens"), nb::arg("temperature"), nb::arg("top_k"), nb::arg("top_p"),
           nb::arg("seed"), nb::arg("ignore_eos"), nb::arg("stop_ids"), nb::arg("absorb"), nb::arg("speculative"))
      .def("stream",
           [](PyModel& pm, const std::vector<int32_t>& prompt, int64_t max_new, double temperature, int64_t top_k,
              double top_p, uint64_t seed, bool ignore_eos, const std::vector<int32_t>& stop_ids, bool absorb,
              const std::string& speculative) {
             GenerateOptions go = gen_options(pm, max_new, temperature, top_k, top_p, seed, ignore_eos, stop_ids,
                                              absorb, speculative);
             return new TokenStream(pm, prompt, go);
           },
           nb::arg("prompt"), nb::arg("max_new_tokens"), nb::arg("temperature"), nb::arg("top_k"), nb::arg("top_p"),
           nb::arg("seed"), nb::arg("ignore_eos"), nb::arg("stop_ids"), nb::arg("absorb"), nb::arg("speculative"),
           nb::keep_alive<0, 1>());

  nb::class_<TokenStream>(m, "TokenStream")
      .def("__iter__", [](nb::handle self) { return self; })
      .def("__next__", &TokenStream::next)
      .def("close", &TokenStream::close)
      .def_prop_ro("ids", &TokenStream::ids)
      .def_prop_ro("stats", &TokenStream::stats);
}

}  // namespace dsv3::py
