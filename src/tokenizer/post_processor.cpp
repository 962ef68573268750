#include "tokenizer/post_processor.h"

#include <fmt/format.h>

#include "core/error.h"

namespace dsv3 {
namespace {

std::vector<int32_t> template_special_ids(const nlohmann::json& j, const std::string& name, const std::string& where) {
  if (!j.contains("special_tokens") || !j["special_tokens"].is_object())
    fail("tokenizer.json: {}.special_tokens must be an object", where);
  const auto& st = j["special_tokens"];
  if (!st.contains(name) || !st[name].contains("ids") || !st[name]["ids"].is_array())
    fail("tokenizer.json: {}: special token {:?} used by the template has no \"ids\" in special_tokens", where, name);
  std::vector<int32_t> ids;
  for (const auto& id : st[name]["ids"]) {
    if (!id.is_number_integer()) fail("tokenizer.json: {}.special_tokens[{:?}].ids must be integers", where, name);
    ids.push_back(id.get<int32_t>());
  }
  return ids;
}

int32_t pair_id(const nlohmann::json& j, const char* key, const std::string& where) {
  // Bert/Roberta write cls and sep as ["[CLS]", 101].
  if (!j.contains(key) || !j[key].is_array() || j[key].size() != 2 || !j[key][1].is_number_integer())
    fail("tokenizer.json: {}.{} must be [token, id]", where, key);
  return j[key][1].get<int32_t>();
}

}  // namespace

SpecialsAround post_processor_from_json(const nlohmann::json& j, const std::string& where) {
  SpecialsAround out;
  if (j.is_null()) return out;
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    fail("tokenizer.json: {} must be null or an object with a \"type\"", where);
  const std::string type = j["type"].get<std::string>();
  if (type == "ByteLevel") return out;
  if (type == "TemplateProcessing") {
    if (!j.contains("single") || !j["single"].is_array()) fail("tokenizer.json: {}.single must be an array", where);
    bool seen_sequence = false;
    for (const auto& piece : j["single"]) {
      if (piece.contains("Sequence")) {
        seen_sequence = true;
      } else if (piece.contains("SpecialToken") && piece["SpecialToken"].contains("id") &&
                 piece["SpecialToken"]["id"].is_string()) {
        auto ids = template_special_ids(j, piece["SpecialToken"]["id"].get<std::string>(), where);
        auto& dst = seen_sequence ? out.suffix : out.prefix;
        dst.insert(dst.end(), ids.begin(), ids.end());
      } else {
        fail("tokenizer.json: {}.single has an entry that is neither Sequence nor SpecialToken: {}", where,
             piece.dump().substr(0, 80));
      }
    }
    return out;
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    out.prefix.push_back(pair_id(j, "cls", where));
    out.suffix.push_back(pair_id(j, "sep", where));
    return out;
  }
  if (type == "Sequence") {
    if (!j.contains("processors") || !j["processors"].is_array())
      fail("tokenizer.json: {}.processors must be an array", where);
    for (size_t i = 0; i < j["processors"].size(); ++i) {
      auto p = post_processor_from_json(j["processors"][i], fmt::format("{}.processors[{}]", where, i));
      // Each processor wraps the output of the previous one.
      p.prefix.insert(p.prefix.end(), out.prefix.begin(), out.prefix.end());
      out.prefix = std::move(p.prefix);
      out.suffix.insert(out.suffix.end(), p.suffix.begin(), p.suffix.end());
    }
    return out;
  }
  fail("tokenizer.json: {} type {:?} is not supported (dsv3 supports ByteLevel, TemplateProcessing, "
       "BertProcessing, RobertaProcessing, Sequence)", where, type);
}

DecoderKind decoder_from_json(const nlohmann::json& j) {
  if (j.is_null()) return DecoderKind::None;
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    fail("tokenizer.json: decoder must be null or an object with a \"type\"");
  const std::string type = j["type"].get<std::string>();
  if (type == "ByteLevel") return DecoderKind::ByteLevel;
  if (type == "Sequence" && j.contains("decoders") && j["decoders"].is_array() && j["decoders"].size() == 1)
    return decoder_from_json(j["decoders"][0]);
  fail("tokenizer.json: decoder type {:?} is not supported (dsv3 supports ByteLevel)", type);
}

}  // namespace dsv3
