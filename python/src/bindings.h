#pragma once
// Shared pieces of the dsv3._core extension: the model handle Python holds, the busy lock that keeps one
// computation per model at a time, and the helpers that move results to NumPy and watch for Ctrl-C.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "core/tensor.h"
#include "model/loader.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::py {

namespace nb = nanobind;

struct PyModel;

// Marks a model busy for as long as it lives (or until release()). A flag rather than a mutex: a stream or a
// server may be released from another Python thread than the one that started it.
class BusyLock {
 public:
  BusyLock(PyModel& m, const char* what);
  BusyLock(BusyLock&& o) noexcept : m_(o.m_) { o.m_ = nullptr; }
  BusyLock& operator=(BusyLock&&) = delete;
  ~BusyLock() { release(); }
  void release();

 private:
  PyModel* m_;
};

// A loaded model directory. The engine's Model is not re-entrant (scratch buffers, one backend stream), so
// every computation holds a BusyLock for its duration: a second one started meanwhile (another Python thread,
// or while serve() runs on the model) raises instead of racing.
struct PyModel {
  LoadedModel lm;
  std::string dir, tokenizer_path;
  std::atomic<bool> busy{false};
  std::atomic<const char*> holder{""};  // what holds it (a string literal), for the message
  std::mutex tok_mu;
  std::optional<Tokenizer> tok;

  // The model's tokenizer (tokenizer_for_model, loaded on first use; InputError when there is none usable).
  const Tokenizer& tokenizer();
  // Marks the model busy or throws dsv3::Error naming what holds it.
  BusyLock acquire(const char* what) { return BusyLock(*this, what); }
};

// A NumPy array over a host tensor's memory without a copy: the capsule keeps the tensor's storage alive.
nb::ndarray<nb::numpy, float> to_numpy_f32(Tensor t);

// With the GIL held: true when a signal handler raised (KeyboardInterrupt is then set as the error).
inline bool interrupted() { return PyErr_CheckSignals() != 0; }

void bind_model(nb::module_& m);
void bind_tokenizer(nb::module_& m);
void bind_train(nb::module_& m);
void bind_serve(nb::module_& m);

}  // namespace dsv3::py
