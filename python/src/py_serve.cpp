// dsv3._core.Server: the OpenAI-compatible server of `dsv3 serve`, run in-process on its own thread.
#include <nanobind/stl/string.h>

#include <chrono>
#include <exception>
#include <memory>
#include <thread>

#include "bindings.h"
#include "core/error.h"
#include "serve/http_server.h"

namespace dsv3::py {

namespace {

class Server {
 public:
  Server(PyModel& pm, const std::string& host, int port, const std::string& name, const EngineConfig& ec,
         int64_t default_max_tokens)
      : pm_(pm), lock_(pm.acquire("serve() is running on it")), tok_(pm.tokenizer()) {
    so_.host = host;
    so_.port = port;
    so_.model_name = name.empty() ? default_served_name(pm.dir) : name;
    so_.default_max_tokens = default_max_tokens;
    so_.handle_signals = false;  // Python keeps its own SIGINT handler; wait() watches for it
    so_.control = &control_;
    check_serve_options(latent_serving_limits(pm.lm.model->config()), ec, so_);
    engine_ = std::make_unique<Engine>(*pm.lm.model, tok_, ec);
    thread_ = std::thread([this] {
      try {
        run_server(*engine_, tok_, so_);
      } catch (...) {
        error_ = std::current_exception();
      }
      done_ = true;
    });
    // Wait until the port is bound (or binding failed) so that port and url are valid on return.
    nb::gil_scoped_release nogil;
    while (!done_ && control_.port() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    if (done_) {
      thread_.join();
      engine_.reset();
      if (error_) std::rethrow_exception(error_);
      throw Error("the server stopped before it listened");
    }
  }
  ~Server() { stop(); }

  void stop() {
    nb::gil_scoped_release nogil;
    if (thread_.joinable()) {
      // httplib ignores a stop() that comes before its accept loop starts: repeat until the thread returns.
      while (!done_) {
        control_.stop();
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      thread_.join();
    }
    engine_.reset();  // joins the scheduler thread and frees the cache
    lock_.release();
  }

  // Blocks until the server stops; Ctrl-C stops it and raises KeyboardInterrupt.
  void wait() {
    for (;;) {
      {
        nb::gil_scoped_release nogil;
        for (int i = 0; i < 20 && !done_; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      if (done_) return;
      if (interrupted()) {
        stop();
        throw nb::python_error();
      }
    }
  }

  int port() const { return control_.port(); }
  bool running() const { return !done_; }
  const std::string& host() const { return so_.host; }
  const std::string& model_name() const { return so_.model_name; }
  int64_t capacity_tokens() const { return engine_ ? engine_->capacity_tokens() : 0; }

 private:
  PyModel& pm_;
  BusyLock lock_;
  Tokenizer tok_;
  ServerOptions so_;
  ServerControl control_;
  std::unique_ptr<Engine> engine_;
  std::thread thread_;
  std::exception_ptr error_;
  std::atomic<bool> done_{false};
};

}  // namespace

void bind_serve(nb::module_& m) {
  nb::class_<Server>(m, "Server")
      .def("__init__",
           [](Server* self, PyModel& pm, const std::string& host, int port, const std::string& name, int64_t max_batch,
              int64_t kv_cache_tokens, int64_t max_queue, int64_t prefill_chunk, int64_t default_max_tokens,
              bool speculative_mtp) {
             EngineConfig ec;
             ec.max_batch = max_batch;
             ec.kv_cache_tokens = kv_cache_tokens;
             ec.max_queue = max_queue;
             ec.prefill_chunk = prefill_chunk;
             ec.speculative_mtp = speculative_mtp;
             new (self) Server(pm, host, port, name, ec, default_max_tokens);
           },
           nb::arg("model"), nb::arg("host"), nb::arg("port"), nb::arg("served_model_name"), nb::arg("max_batch"),
           nb::arg("kv_cache_tokens"), nb::arg("max_queue"), nb::arg("prefill_chunk"), nb::arg("default_max_tokens"),
           nb::arg("speculative_mtp"), nb::keep_alive<1, 2>())
      .def("stop", &Server::stop)
      .def("wait", &Server::wait)
      .def_prop_ro("port", &Server::port)
      .def_prop_ro("host", &Server::host)
      .def_prop_ro("running", &Server::running)
      .def_prop_ro("model_name", &Server::model_name)
      .def_prop_ro("capacity_tokens", &Server::capacity_tokens);
}

}  // namespace dsv3::py
