// dsv3._core: the C++ engine as a Python extension (nanobind). Thin bindings over the library the dsv3 binary
// links; the Python-facing API (argument conversion, docs) is python/dsv3/__init__.py.
#include <cblas.h>

#include <nanobind/stl/string.h>

#include "bindings.h"
#include "core/error.h"
#include "ops/cpu/blas_select.h"
#include "serve/engine.h"
#include "tokenizer/tokenizer_files.h"

namespace nb = nanobind;

NB_MODULE(_core, m) {
  m.doc() = "dsv3 engine bindings (use the dsv3 package, not this module directly)";
  // dsv3.Error for engine failures; dsv3.InputError (also a ValueError) for bad input: files, configs, arguments.
  static PyObject* error = PyErr_NewException("dsv3.Error", PyExc_RuntimeError, nullptr);
  nb::object bases = nb::make_tuple(nb::handle(error), nb::handle(PyExc_ValueError));
  static PyObject* input_error = PyErr_NewException("dsv3.InputError", bases.ptr(), nullptr);
  static PyObject* overloaded = PyErr_NewException("dsv3.OverloadedError", error, nullptr);
  m.attr("Error") = nb::handle(error);
  m.attr("InputError") = nb::handle(input_error);
  m.attr("OverloadedError") = nb::handle(overloaded);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const dsv3::InputError& e) {
      PyErr_SetString(input_error, e.what());
    } catch (const dsv3::OverloadedError& e) {
      PyErr_SetString(overloaded, e.what());
    } catch (const dsv3::Error& e) {
      PyErr_SetString(error, e.what());
    }
  });
  m.def("set_bundled_tokenizer_dir", &dsv3::set_bundled_tokenizer_dir,
        "Where the bundled deepseek-v3 tokenizer is (the package sets it on import).");
  m.def("blas_core", [] { return std::string(openblas_get_corename()); },
        "The OpenBLAS kernel family in use (OPENBLAS_CORETYPE decides it when the library loads).");
  m.def("blas_coretype_fix", &dsv3::blas_coretype_fix,
        "The OPENBLAS_CORETYPE to set before loading when OpenBLAS fell back to generic kernels, else ''.");
  dsv3::py::bind_model(m);
  dsv3::py::bind_tokenizer(m);
  dsv3::py::bind_train(m);
  dsv3::py::bind_serve(m);
}
