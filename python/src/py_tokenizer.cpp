// dsv3._core.Tokenizer: encode / decode / chat template over the engine's byte-level BPE tokenizer.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "core/error.h"

namespace dsv3::py {

namespace {

nlohmann::ordered_json parse_json_arg(const std::string& text, const char* what) {
  try {
    return nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail("{} is not JSON-serializable: {}", what, e.what());
  }
}

}  // namespace

void bind_tokenizer(nb::module_& m) {
  nb::class_<Tokenizer>(m, "Tokenizer")
      .def("__init__", [](Tokenizer* self, const std::string& path) { new (self) Tokenizer(Tokenizer::load(path)); },
           nb::arg("path") = "deepseek-v3")
      .def("encode",
           [](const Tokenizer& t, const std::string& text, bool add_special, bool add_bos) {
             std::vector<int32_t> ids;
             {
               nb::gil_scoped_release nogil;
               ids = t.encode(text, add_special);
             }
             // As `dsv3 tokenize --add-bos`: BOS first when tokenizer_config.json asks for it.
             if (add_bos && t.add_bos_token() && t.bos_id() >= 0) ids.insert(ids.begin(), t.bos_id());
             return ids;
           },
           nb::arg("text"), nb::arg("add_special") = false, nb::arg("add_bos") = false)
      .def("encode_batch",
           [](const Tokenizer& t, const std::vector<std::string>& texts, bool add_special) {
             nb::gil_scoped_release nogil;
             return t.encode_batch(texts, add_special);
           },
           nb::arg("texts"), nb::arg("add_special") = false)
      .def("decode",
           [](const Tokenizer& t, const std::vector<int64_t>& ids, bool skip_special) {
             // Out-of-range ids are unknown ids, which decoding skips (as Hugging Face does).
             std::vector<int32_t> v;
             v.reserve(ids.size());
             for (int64_t x : ids) v.push_back(x < 0 || x > INT32_MAX ? -1 : int32_t(x));
             return t.decode(v, skip_special);
           },
           nb::arg("ids"), nb::arg("skip_special") = false)
      .def("apply_chat_template_json",
           [](const Tokenizer& t, const std::string& messages, bool add_generation_prompt, const std::string& extra) {
             return t.apply_chat_template(parse_json_arg(messages, "messages"), add_generation_prompt,
                                          parse_json_arg(extra, "template variables"));
           },
           nb::arg("messages"), nb::arg("add_generation_prompt"), nb::arg("extra"))
      .def("token_to_id", &Tokenizer::token_id, nb::arg("token"))
      .def("id_to_token", &Tokenizer::id_to_token, nb::arg("id"))
      .def("is_special", &Tokenizer::is_special, nb::arg("id"))
      .def_prop_ro("bos_id", &Tokenizer::bos_id)
      .def_prop_ro("eos_id", &Tokenizer::eos_id)
      .def_prop_ro("add_bos_token", &Tokenizer::add_bos_token)
      .def_prop_ro("vocab_size", &Tokenizer::vocab_size)
      .def_prop_ro("chat_template", &Tokenizer::chat_template)
      .def_prop_ro("source", &Tokenizer::source);
}

}  // namespace dsv3::py
