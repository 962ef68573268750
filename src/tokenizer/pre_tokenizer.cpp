#include "tokenizer/pre_tokenizer.h"

#include <algorithm>

#include <fmt/format.h>

#include "core/error.h"

namespace dsv3 {
namespace {

// GPT-2's pattern, used by ByteLevel when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

SplitBehavior parse_behavior(const nlohmann::json& j, const std::string& where) {
  if (!j.is_string()) fail("tokenizer.json: {}.behavior must be a string", where);
  const std::string b = j.get<std::string>();
  if (b == "Removed") return SplitBehavior::Removed;
  if (b == "Isolated") return SplitBehavior::Isolated;
  if (b == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (b == "Contiguous") return SplitBehavior::Contiguous;
  fail("tokenizer.json: {}.behavior {:?} is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, "
       "Contiguous", where, b);
}

bool get_bool(const nlohmann::json& j, const char* key, bool dflt, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_boolean()) fail("tokenizer.json: {}.{} must be true or false", where, key);
  return j[key].get<bool>();
}

struct Span {
  size_t b, e;
  bool match;
};

}  // namespace

std::unique_ptr<PreTokenizer> PreTokenizer::from_json(const nlohmann::json& j) {
  if (j.is_null()) return nullptr;
  auto pt = std::unique_ptr<PreTokenizer>(new PreTokenizer());
  pt->add_stage(j, "pre_tokenizer");
  for (size_t i = 0; i + 1 < pt->stages_.size(); ++i)
    if (pt->stages_[i].kind == Stage::ByteLevel)
      fail("tokenizer.json: pre_tokenizer: a ByteLevel followed by other pre-tokenizers is not supported "
           "(they would see byte-level characters); dsv3 supports ByteLevel as the last step");
  pt->byte_level_ = !pt->stages_.empty() && pt->stages_.back().kind == Stage::ByteLevel;
  return pt;
}

void PreTokenizer::add_stage(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string())
    fail("tokenizer.json: {} must be an object with a \"type\"", where);
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    if (!j.contains("pretokenizers") || !j["pretokenizers"].is_array())
      fail("tokenizer.json: {}.pretokenizers must be an array", where);
    for (size_t i = 0; i < j["pretokenizers"].size(); ++i)
      add_stage(j["pretokenizers"][i], fmt::format("{}.pretokenizers[{}]", where, i));
    return;
  }
  Stage st;
  if (type == "Split") {
    st.kind = Stage::Split;
    if (!j.contains("pattern")) fail("tokenizer.json: {} (Split) has no \"pattern\"", where);
    st.re = std::make_unique<Regex>(pattern_from_json(j["pattern"], where));
    if (!j.contains("behavior")) fail("tokenizer.json: {} (Split) has no \"behavior\"", where);
    st.behavior = parse_behavior(j["behavior"], where);
    st.invert = get_bool(j, "invert", false, where);
  } else if (type == "ByteLevel") {
    st.kind = Stage::ByteLevel;
    st.add_prefix_space = get_bool(j, "add_prefix_space", true, where);
    if (get_bool(j, "use_regex", true, where)) st.re = std::make_unique<Regex>(kGpt2Pattern, where);
  } else {
    fail("tokenizer.json: {} type {:?} is not supported (dsv3 supports Sequence, Split, ByteLevel)", where, type);
  }
  stages_.push_back(std::move(st));
}

void PreTokenizer::split(std::string_view text, FunctionRef<void(std::string_view)> sink, bool exact_unicode) const {
  if (text.empty()) return;
  run(0, text, sink, exact_unicode);
}

void PreTokenizer::run(size_t stage, std::string_view piece, FunctionRef<void(std::string_view)> sink,
                       bool exact) const {
  if (piece.empty()) return;
  if (stage == stages_.size()) {
    sink(piece);
    return;
  }
  const Stage& st = stages_[stage];
  std::string prefixed;  // must outlive run_split below, which reads the prefixed piece
  if (st.kind == Stage::ByteLevel) {
    if (st.add_prefix_space && piece.front() != ' ') {
      prefixed.reserve(piece.size() + 1);
      prefixed += ' ';
      prefixed.append(piece);
      piece = prefixed;
    }
    if (!st.re) {
      run(stage + 1, piece, sink, exact);
      return;
    }
  }
  run_split(st, stage, piece, sink, exact);
}

void PreTokenizer::run_split(const Stage& st, size_t stage, std::string_view piece,
                             FunctionRef<void(std::string_view)> sink, bool exact) const {
  const SplitBehavior behavior = st.kind == Stage::ByteLevel ? SplitBehavior::Isolated : st.behavior;
  auto emit = [&](size_t b, size_t e) {
    if (e > b) run(stage + 1, piece.substr(b, e - b), sink, exact);
  };
  if (behavior == SplitBehavior::Isolated) {
    // Isolated keeps every span, match or not, so it can stream without collecting (the hot path).
    size_t prev = 0;
    st.re->for_each_match(
        piece,
        [&](size_t b, size_t e) {
          emit(prev, b);
          emit(b, e);
          prev = e;
        },
        exact);
    emit(prev, piece.size());
    return;
  }
  // The other behaviors follow Hugging Face's NormalizedString::split over (span, is_match) pairs that cover
  // the piece, empty matches included.
  std::vector<Span> spans;
  size_t prev = 0;
  st.re->for_each_match(
      piece,
      [&](size_t b, size_t e) {
        if (prev != b) spans.push_back({prev, b, false});
        spans.push_back({b, e, true});
        prev = e;
      },
      exact);
  if (prev != piece.size()) spans.push_back({prev, piece.size(), false});
  if (st.invert)
    for (auto& s : spans) s.match = !s.match;

  std::vector<Span> out;  // match = "remove"
  switch (behavior) {
    case SplitBehavior::Removed:
      out = spans;
      break;
    case SplitBehavior::Contiguous: {
      bool prev_match = false;
      for (const auto& s : spans) {
        if (s.match == prev_match && !out.empty()) out.back().e = s.e;
        else out.push_back({s.b, s.e, false});
        prev_match = s.match;
      }
      break;
    }
    case SplitBehavior::MergedWithPrevious: {
      bool prev_match = false;
      for (const auto& s : spans) {
        if (s.match && !prev_match && !out.empty()) out.back().e = s.e;
        else out.push_back({s.b, s.e, false});
        prev_match = s.match;
      }
      break;
    }
    case SplitBehavior::MergedWithNext: {
      bool prev_match = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->match && !prev_match && !out.empty()) out.back().b = it->b;
        else out.push_back({it->b, it->e, false});
        prev_match = it->match;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
    case SplitBehavior::Isolated:
      break;
  }
  for (const auto& s : out)
    if (!s.match) emit(s.b, s.e);
}

}  // namespace dsv3
