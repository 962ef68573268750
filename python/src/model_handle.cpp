// PyModel helpers and the zero-copy NumPy wrapping shared by the bindings.
#include "bindings.h"
#include "core/error.h"
#include "tokenizer/model_tokenizer.h"

namespace dsv3::py {

const Tokenizer& PyModel::tokenizer() {
  std::lock_guard<std::mutex> g(tok_mu);
  if (!tok) tok = tokenizer_for_model(dir, tokenizer_path, lm.model->config().vocab_size);
  return *tok;
}

BusyLock::BusyLock(PyModel& m, const char* what) : m_(&m) {
  bool expected = false;
  if (!m.busy.compare_exchange_strong(expected, true)) {
    m_ = nullptr;
    throw Error(fmt::format("the model is busy ({}); one call at a time per Model: stop the server or finish the "
                            "stream first, or load a second Model", m.holder.load()));
  }
  m.holder = what;
}

void BusyLock::release() {
  if (m_) m_->busy = false;
  m_ = nullptr;
}

nb::ndarray<nb::numpy, float> to_numpy_f32(Tensor t) {
  DSV3_CHECK(t.device == Device::CPU && t.dtype == DType::F32, "expected a host fp32 tensor");
  auto* keep = new Tensor(std::move(t));
  nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<Tensor*>(p); });
  std::vector<size_t> shape(keep->shape.begin(), keep->shape.end());
  return nb::ndarray<nb::numpy, float>(keep->data, shape.size(), shape.data(), owner);
}

}  // namespace dsv3::py
