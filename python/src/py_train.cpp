// dsv3._core.train: the trainer of `dsv3 train`, with a Python callback per step and Ctrl-C between steps.
#include <nanobind/stl/string.h>

#include <optional>

#include "bindings.h"
#include "core/error.h"
#include "train/trainer.h"

namespace dsv3::py {

namespace {

using json = nlohmann::json;

// The options given from Python (long names, as `dsv3 train` spells them), checked one by one so that an
// unknown name or a value of the wrong type is refused naming the option.
json checked_options(const std::string& given_json) {
  json given = json::parse(given_json);
  const json known = TrainArgs().to_json();
  for (auto it = given.begin(); it != given.end(); ++it) {
    if (!known.contains(it.key())) {
      std::string names;
      for (auto k = known.begin(); k != known.end(); ++k) names += (names.empty() ? "" : ", ") + k.key();
      fail("unknown training option '{}' (known: {})", it.key(), names);
    }
    try {
      TrainArgs::from_json(json{{it.key(), it.value()}});
    } catch (const json::exception&) {
      fail("training option '{}' has the wrong type: {} (default: {})", it.key(), it.value().dump(),
           known[it.key()].dump());
    }
  }
  return given;
}

}  // namespace

void bind_train(nb::module_& m) {
  m.def(
      "train",
      [](const std::string& given_json, const std::string& resume, int64_t stop_after, bool report,
         nb::object on_step) {
        json given = checked_options(given_json);
        TrainArgs args = resume.empty() ? TrainArgs::from_json(given) : resume_args(resume, given);
        args.stop_after = stop_after;
        args.report = report;
        nb::module_ json_mod = nb::module_::import_("json");
        std::optional<nb::python_error> py_error;  // from the callback or Ctrl-C, raised after the save
        TrainResult r;
        {
          nb::gil_scoped_release nogil;
          r = run_training(
              args,
              [&](const json& rec) {
                nb::gil_scoped_acquire gil;
                if (interrupted()) {
                  py_error.emplace();
                  return false;
                }
                if (on_step.is_none()) return true;
                try {
                  nb::object res = on_step(json_mod.attr("loads")(rec.dump()));
                  return !(res.is_valid() && !res.is_none() && res.ptr() == Py_False);
                } catch (nb::python_error& e) {
                  py_error.emplace(std::move(e));
                  return false;
                }
              },
              /*handle_sigint=*/false);
        }
        if (py_error) throw std::move(*py_error);
        nb::dict d;
        d["step"] = r.step;
        d["interrupted"] = r.interrupted;
        d["checkpoint"] = r.checkpoint;
        return d;
      },
      nb::arg("options_json"), nb::arg("resume"), nb::arg("stop_after"), nb::arg("report"), nb::arg("on_step").none());
}

}  // namespace dsv3::py
