#pragma once
// tokenizer.json normalizers: the text rewrite applied to the parts of the input that are not added
// tokens, before pre-tokenization. DeepSeek-V3's is an empty Sequence (identity). Supported: Sequence,
// Replace, Prepend, Strip. Unicode normalization forms and case mapping need tables dsv3 does not carry,
// so they are rejected by name instead of being approximated.
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

namespace dsv3 {

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& text) const = 0;
};

// nullptr when the normalizer is absent or does nothing (null, or a Sequence of nothing).
// `where` names the JSON location for error messages.
std::unique_ptr<Normalizer> make_normalizer(const nlohmann::json& j, const std::string& where = "normalizer");

}  // namespace dsv3
