// The tokenizer against Hugging Face references (tests/data, produced by tokenizers 0.23.2 and transformers
// 5.17.0 on DeepSeek-V3's own tokenizer), round trips, arbitrary bytes, streaming, and clear errors for
// malformed tokenizer files.
#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/regex.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_files.h"
#include "tokenizer/utf8.h"

using dsv3::Tokenizer;

namespace {

const Tokenizer& deepseek() {
  static const Tokenizer tok = Tokenizer::load("deepseek-v3");
  return tok;
}

std::vector<nlohmann::ordered_json> read_jsonl(const std::string& name) {
  std::ifstream in(std::string(DSV3_TEST_DATA) + "/" + name);
  EXPECT_TRUE(in.good()) << "missing " << name;
  std::vector<nlohmann::ordered_json> out;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::ordered_json::parse(line));
  return out;
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const dsv3::InputError& e) {
    return e.what();
  }
  return "";
}

std::string random_utf8(std::mt19937& rng, int max_chars) {
  std::string s;
  const int n = std::uniform_int_distribution<int>(0, max_chars)(rng);
  for (int i = 0; i < n; ++i) {
    const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
    char32_t cp;
    if (kind < 4) cp = std::uniform_int_distribution<int>(0x20, 0x7E)(rng);
    else if (kind < 5) cp = std::uniform_int_distribution<int>(0, 0x20)(rng);
    else if (kind < 8) cp = std::uniform_int_distribution<int>(0x80, 0xFFFF)(rng);
    else cp = std::uniform_int_distribution<int>(0x10000, 0x10FFFF)(rng);
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
    dsv3::utf8::append(s, cp);
  }
  return s;
}

}  // namespace

TEST(Tokenizer, FixtureIds) {
  const auto refs = read_jsonl("tokenizer_refs.jsonl");
  ASSERT_GE(refs.size(), 50u);
  for (const auto& r : refs) {
    const std::string text = r["text"].get<std::string>();
    EXPECT_EQ(deepseek().encode(text), r["ids"].get<std::vector<int32_t>>()) << text;
    EXPECT_EQ(deepseek().encode(text, true), r["ids_with_special"].get<std::vector<int32_t>>()) << text;
    EXPECT_EQ(deepseek().decode(r["ids"].get<std::vector<int32_t>>()), r["decoded"].get<std::string>()) << text;
  }
}

TEST(Tokenizer, FixtureChatTemplate) {
  const auto refs = read_jsonl("chat_refs.jsonl");
  ASSERT_GE(refs.size(), 6u);
  for (const auto& r : refs)
    EXPECT_EQ(deepseek().apply_chat_template(r["messages"], r["add_generation_prompt"].get<bool>()),
              r["text"].get<std::string>());
}

TEST(Tokenizer, Metadata) {
  const Tokenizer& t = deepseek();
  EXPECT_EQ(t.bos_id(), 0);
  EXPECT_EQ(t.eos_id(), 1);
  EXPECT_TRUE(t.add_bos_token());
  EXPECT_EQ(t.vocab_size(), 128815u);
  EXPECT_EQ(t.token_id("<｜User｜>"), 128803);
  EXPECT_EQ(t.token_id("no such token"), std::nullopt);
  EXPECT_EQ(t.id_to_token(19923), "Hello");
  EXPECT_TRUE(t.is_special(0));
  EXPECT_FALSE(t.is_special(128803));  // DeepSeek-V3 marks the chat tokens as not special
  EXPECT_EQ(t.token_to_piece(223), " ");
  EXPECT_EQ(t.encode_with_bos("Hello"), (std::vector<int32_t>{0, 19923}));
  EXPECT_EQ(t.decode({0, 19923, 1}, /*skip_special=*/true), "Hello");
}

TEST(Tokenizer, RoundTripValidUtf8) {
  std::mt19937 rng(42);
  std::vector<std::string> texts = {"", " ", "\n\n\t  x", "Ⅻ ½ ²³ ١٢٣ 😀👍🏽🇺🇸", std::string(3000, 'a'), std::string(2000, ' ')};
  for (int i = 0; i < 400; ++i) texts.push_back(random_utf8(rng, 80));
  const auto batch = deepseek().encode_batch(texts);
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto ids = deepseek().encode(texts[i]);
    EXPECT_EQ(batch[i], ids);
    EXPECT_EQ(deepseek().decode(ids), texts[i]);
  }
}

TEST(Tokenizer, AnyBytesEncode) {
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) {
    std::string bytes(std::uniform_int_distribution<int>(1, 200)(rng), '\0');
    for (char& c : bytes) c = char(std::uniform_int_distribution<int>(0, 255)(rng));
    std::vector<int32_t> ids;
    ASSERT_NO_THROW(ids = deepseek().encode(bytes));
    EXPECT_EQ(deepseek().decode_bytes(ids), bytes);  // byte-level BPE keeps every byte
    const std::string text = deepseek().decode(ids);
    EXPECT_TRUE(dsv3::utf8::is_valid(text));
    EXPECT_EQ(text, dsv3::utf8::to_valid_lossy(bytes));
  }
}

TEST(Tokenizer, LossyUtf8LikeRust) {
  using dsv3::utf8::to_valid_lossy;
  EXPECT_EQ(to_valid_lossy("\xF0\x9F\x98"), "\xEF\xBF\xBD");                     // truncated: one U+FFFD
  EXPECT_EQ(to_valid_lossy("\xE2\x28\xA1"), "\xEF\xBF\xBD(\xEF\xBF\xBD");       // bad continuation
  EXPECT_EQ(to_valid_lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: 3 parts
  EXPECT_EQ(to_valid_lossy("a\xC0\xAF"), "a\xEF\xBF\xBD\xEF\xBF\xBD");          // overlong
  EXPECT_EQ(dsv3::utf8::complete_prefix_len("ab\xF0\x9F\x98"), 2u);
  EXPECT_EQ(dsv3::utf8::complete_prefix_len("ab\xF0\x9F\x98\x80"), 6u);
  EXPECT_EQ(dsv3::utf8::complete_prefix_len("ab\xFF"), 3u);
}

TEST(Tokenizer, StreamDecoderHoldsBackPartialCharacters) {
  const std::string text = "héllo 😀🎉 世界, done";
  const auto ids = deepseek().encode(text);
  dsv3::StreamDecoder stream(deepseek());
  std::string out;
  for (int32_t id : ids) {
    const std::string piece = stream.push(id);
    EXPECT_TRUE(dsv3::utf8::is_valid(piece));
    EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos);
    out += piece;
  }
  out += stream.flush();
  EXPECT_EQ(out, text);
}

TEST(Tokenizer, LocatesFiles) {
  const auto files = dsv3::locate_tokenizer("deepseek-v3");
  EXPECT_NE(files.tokenizer_json.find("tokenizer.json"), std::string::npos);
  EXPECT_NE(files.config_json.find("tokenizer_config.json"), std::string::npos);
  const std::string dir = dsv3::bundled_tokenizer_dir();
  EXPECT_EQ(Tokenizer::load(dir + "/tokenizer.json").encode("hello world"), (std::vector<int32_t>{33310, 2058}));
  EXPECT_NE(error_of([] { Tokenizer::load("/no/such/tokenizer"); }).find("not found"), std::string::npos);
}

TEST(Tokenizer, OnigurumaEmptyMatchRule) {
  dsv3::Regex re("a*", "test");
  std::vector<std::pair<size_t, size_t>> got;
  re.for_each_match("baaac", [&](size_t b, size_t e) { got.emplace_back(b, e); });
  EXPECT_EQ(got, (std::vector<std::pair<size_t, size_t>>{{0, 0}, {1, 4}, {5, 5}}));
  // \s follows Oniguruma (no U+180E); \p{S} knows Unicode 16 emoji such as U+1FA77.
  size_t b = 0, e = 0;
  EXPECT_FALSE(dsv3::Regex("\\s", "t").search("\xE1\xA0\x8E", 0, b, e));
  EXPECT_TRUE(dsv3::Regex("\\p{S}", "t").search("\xF0\x9F\xA9\xB7", 0, b, e));
}

namespace {

// A valid minimal tokenizer.json, modified per case.
nlohmann::json minimal() {
  return nlohmann::json::parse(R"({
    "added_tokens": [{"id": 3, "content": "<s>", "special": true, "normalized": false}],
    "normalizer": null,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "post_processor": null,
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}})");
}

std::string load_error(const nlohmann::json& j, const std::string& config = "") {
  return error_of([&] { Tokenizer::from_json_text(j.dump(), config, "test.json"); });
}

}  // namespace

TEST(Tokenizer, MinimalLoads) {
  const Tokenizer t = Tokenizer::from_json_text(minimal().dump(), "", "test.json");
  EXPECT_EQ(t.encode("abab<s>a"), (std::vector<int32_t>{2, 2, 3, 0}));
}

TEST(Tokenizer, MalformedFilesGiveClearErrors) {
  auto with = [](const char* key, const nlohmann::json& v) {
    auto j = minimal();
    j[key] = v;
    return j;
  };
  auto model_with = [](const char* key, const nlohmann::json& v) {
    auto j = minimal();
    j["model"][key] = v;
    return j;
  };
  EXPECT_NE(error_of([] { Tokenizer::from_json_text("{not json", "", "x.json"); }).find("not valid JSON"), std::string::npos);
  auto no_model = minimal();
  no_model.erase("model");
  EXPECT_NE(load_error(no_model).find("no \"model\""), std::string::npos);
  EXPECT_NE(load_error(model_with("type", "Unigram")).find("model type \"Unigram\" is not supported"), std::string::npos);
  EXPECT_NE(load_error(model_with("merges", {"a c"})).find("\"c\" is not in model.vocab"), std::string::npos);
  EXPECT_NE(load_error(model_with("merges", {"a b c"})).find("model.merges[0]"), std::string::npos);
  EXPECT_NE(load_error(model_with("vocab", {{"a", "zero"}})).find("integer id"), std::string::npos);
  EXPECT_NE(load_error(model_with("vocab", {{"a", 0}, {"b", 1}, {"ab", 2000000000}})).find("ids must stay close"),
            std::string::npos);
  EXPECT_NE(load_error(with("pre_tokenizer", {{"type", "Whitespace"}})).find("\"Whitespace\" is not supported"),
            std::string::npos);
  const nlohmann::json bad_regex = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  EXPECT_NE(load_error(with("pre_tokenizer", bad_regex)).find("does not compile"), std::string::npos);
  const nlohmann::json bad_behavior = {{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Sideways"}};
  EXPECT_NE(load_error(with("pre_tokenizer", bad_behavior)).find("behavior \"Sideways\""), std::string::npos);
  EXPECT_NE(load_error(with("normalizer", {{"type", "NFC"}})).find("\"NFC\" is not supported"), std::string::npos);
  EXPECT_NE(load_error(with("decoder", {{"type", "WordPiece"}})).find("decoder type \"WordPiece\""), std::string::npos);
  EXPECT_NE(load_error(with("post_processor", {{"type", "Magic"}})).find("\"Magic\" is not supported"), std::string::npos);
  EXPECT_NE(load_error(with("added_tokens", "nope")).find("added_tokens"), std::string::npos);
  EXPECT_NE(load_error(minimal(), "{bad").find("tokenizer_config.json is not valid JSON"), std::string::npos);
  EXPECT_NE(load_error(minimal(), R"({"bos_token": "<missing>"})").find("bos_token \"<missing>\""), std::string::npos);
  // Every message names the file it came from.
  EXPECT_EQ(load_error(model_with("type", "WordPiece")).rfind("test.json: ", 0), 0u);
}

TEST(Tokenizer, MalformedTemplateFailsOnUseOnly) {
  const std::string config = R"({"bos_token": "<s>", "chat_template": "{% for m in messages %}{{ m.content }}"})";
  const Tokenizer t = Tokenizer::from_json_text(minimal().dump(), config, "test.json");
  EXPECT_EQ(t.encode("ab"), (std::vector<int32_t>{2}));  // plain tokenization still works
  const std::string err = error_of([&] { t.apply_chat_template(nlohmann::ordered_json::array(), false); });
  EXPECT_NE(err.find("chat template does not parse"), std::string::npos) << err;
  EXPECT_NE(err.find("endfor"), std::string::npos) << err;
  const Tokenizer no_template = Tokenizer::from_json_text(minimal().dump(), "", "test.json");
  EXPECT_NE(error_of([&] { no_template.apply_chat_template(nlohmann::ordered_json::array(), true); }).find("no chat template"),
            std::string::npos);
}
