#include "tokenizer/normalizer.h"

#include <vector>

#include "core/error.h"
#include "tokenizer/regex.h"
#include "tokenizer/utf8.h"

namespace dsv3 {
namespace {

class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts) : parts_(std::move(parts)) {}
  void normalize(std::string& text) const override {
    for (const auto& p : parts_) p->normalize(text);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(Regex re, std::string content) : re_(std::move(re)), content_(std::move(content)) {}
  void normalize(std::string& text) const override {
    std::string out;
    size_t prev = 0;
    re_.for_each_match(text, [&](size_t b, size_t e) {
      out.append(text, prev, b - prev);
      out += content_;
      prev = e;
    });
    out.append(text, prev, std::string::npos);
    text.swap(out);
  }

 private:
  Regex re_;
  std::string content_;
};

class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void normalize(std::string& text) const override {
    if (!text.empty()) text.insert(0, prefix_);
  }

 private:
  std::string prefix_;
};

class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& text) const override {
    size_t b = 0, e = text.size();
    if (left_) {
      while (b < e) {
        size_t len = 0;
        const char32_t cp = utf8::decode(text, b, len);
        if (!utf8::is_white_space(cp) || utf8::valid_seq_len(text, b) == 0) break;
        b += len;
      }
    }
    if (right_) {
      while (e > b) {
        size_t s = e - 1;
        while (s > b && (static_cast<unsigned char>(text[s]) & 0xC0) == 0x80) --s;
        size_t len = 0;
        const char32_t cp = utf8::decode(text, s, len);
        if (s + len != e || !utf8::is_white_space(cp) || utf8::valid_seq_len(text, s) == 0) break;
        e = s;
      }
    }
    text = text.substr(b, e - b);
  }

 private:
  bool left_, right_;
};

const nlohmann::json& field(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key)) fail("tokenizer.json: {} has no \"{}\"", where, key);
  return j[key];
}

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const nlohmann::json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    fail("tokenizer.json: {} must be null or an object with a \"type\"", where);
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    const auto& list = field(j, "normalizers", where);
    if (!list.is_array()) fail("tokenizer.json: {}.normalizers must be an array", where);
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (size_t i = 0; i < list.size(); ++i)
      if (auto n = make_normalizer(list[i], fmt::format("{}.normalizers[{}]", where, i))) parts.push_back(std::move(n));
    if (parts.empty()) return nullptr;
    if (parts.size() == 1) return std::move(parts[0]);
    return std::make_unique<SequenceNormalizer>(std::move(parts));
  }
  if (type == "Replace") {
    const auto& content = field(j, "content", where);
    if (!content.is_string()) fail("tokenizer.json: {}.content must be a string", where);
    return std::make_unique<ReplaceNormalizer>(pattern_from_json(field(j, "pattern", where), where),
                                               content.get<std::string>());
  }
  if (type == "Prepend") {
    const auto& p = field(j, "prepend", where);
    if (!p.is_string()) fail("tokenizer.json: {}.prepend must be a string", where);
    return std::make_unique<PrependNormalizer>(p.get<std::string>());
  }
  if (type == "Strip") {
    return std::make_unique<StripNormalizer>(j.value("strip_left", true), j.value("strip_right", true));
  }
  fail("tokenizer.json: {} type {:?} is not supported (dsv3 supports Sequence, Replace, Prepend, Strip)", where,
       type);
}

}  // namespace dsv3
