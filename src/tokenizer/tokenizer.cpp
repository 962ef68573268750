#include "tokenizer/tokenizer.h"

#include <algorithm>

#include "core/error.h"
#include "tokenizer/added_vocab.h"
#include "tokenizer/bpe.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/normalizer.h"
#include "tokenizer/post_processor.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/regex.h"
#include "tokenizer/tokenizer_files.h"
#include "tokenizer/utf8.h"

namespace dsv3 {

struct Tokenizer::Impl {
  std::string source;
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<BpeModel> model;
  AddedVocabulary added;
  SpecialsAround specials;
  DecoderKind decoder = DecoderKind::None;
  size_t vocab_size = 0;
  std::vector<std::string> token_text;  // [vocab_size] the token's string (added tokens first, as HF looks up)
  std::vector<std::string> piece;       // [vocab_size] bytes the decoder makes of it
  std::vector<uint8_t> known;           // [vocab_size] 1 when some token has this id
  std::vector<uint8_t> special;         // [vocab_size] 1 when the token's string is a special added token

  // From tokenizer_config.json.
  int32_t bos = -1, eos = -1;
  bool add_bos = false;
  nlohmann::ordered_json special_token_strings = nlohmann::ordered_json::object();  // bos_token, eos_token, ...
  std::string chat_template_source;
  std::unique_ptr<ChatTemplate> chat_template;
  std::string chat_template_error;  // why it did not compile, reported when it is used

  void encode_pieces(std::string_view text, std::vector<int32_t>& out) const {
    auto to_model = [&](std::string_view word) { model->encode(word, out); };
    auto normalized_part = [&](std::string_view part, int32_t id) {
      if (id >= 0) out.push_back(id);
      else if (pre_tokenizer) pre_tokenizer->split(part, to_model, Regex::needs_exact_unicode(part));
      else model->encode(part, out);
    };
    added.split(text, /*normalized_set=*/false, [&](std::string_view part, int32_t id) {
      if (id >= 0) {
        out.push_back(id);
        return;
      }
      if (!normalizer) {
        added.split(part, true, normalized_part);
        return;
      }
      std::string norm(part);
      normalizer->normalize(norm);
      added.split(norm, true, normalized_part);
    });
  }

  void append_piece(int32_t id, bool skip_special, std::string& out) const {
    if (id < 0 || size_t(id) >= vocab_size || !known[id]) return;  // Hugging Face skips unknown ids too
    if (skip_special && special[id]) return;
    out += piece[id];
  }
};

namespace {

nlohmann::json parse_json(const std::string& text, const std::string& what) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    fail("{} is not valid JSON: {}", what, e.what());
  }
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& path_or_name) {
  const TokenizerFiles files = locate_tokenizer(path_or_name);
  const std::string config = files.config_json.empty() ? std::string() : read_text_file(files.config_json);
  return from_json_text(read_text_file(files.tokenizer_json), config, files.tokenizer_json);
}

Tokenizer Tokenizer::from_json_text(const std::string& tokenizer_json, const std::string& config_json,
                                    const std::string& source) {
  auto impl = std::make_shared<Impl>();
  impl->source = source;
  try {
    const nlohmann::json j = parse_json(tokenizer_json, "tokenizer.json");
    if (!j.is_object()) fail("tokenizer.json must be a JSON object");
    if (!j.contains("model")) fail("tokenizer.json has no \"model\"");
    auto get = [&](const char* key) -> const nlohmann::json& {
      static const nlohmann::json null_value;
      return j.contains(key) ? j[key] : null_value;
    };
    impl->normalizer = make_normalizer(get("normalizer"));
    impl->pre_tokenizer = PreTokenizer::from_json(get("pre_tokenizer"));
    impl->model = std::make_unique<BpeModel>(BpeModel::from_json(j["model"]));
    impl->model->set_byte_level_input(impl->pre_tokenizer && impl->pre_tokenizer->byte_level());
    impl->added.load(get("added_tokens"), *impl->model, impl->normalizer.get());
    impl->specials = post_processor_from_json(get("post_processor"));
    impl->decoder = decoder_from_json(get("decoder"));

    impl->vocab_size = size_t(std::max(impl->model->max_id(), impl->added.max_id()) + 1);
    const size_t n = impl->vocab_size;
    impl->token_text.assign(n, std::string());
    impl->piece.assign(n, std::string());
    impl->known.assign(n, 0);
    impl->special.assign(n, 0);
    for (size_t id = 0; id < n; ++id) {
      const AddedToken* a = impl->added.by_id(int32_t(id));
      const std::string* t = a ? &a->content : impl->model->id_to_token(int32_t(id));
      if (!t) continue;
      // Hugging Face gives a normalized added token back in its normalized form (and, as that form is not
      // the special token's content, does not skip it as special when decoding).
      std::string normalized;
      if (a && a->normalized && impl->normalizer) {
        normalized = a->content;
        impl->normalizer->normalize(normalized);
        t = &normalized;
      }
      impl->known[id] = 1;
      impl->token_text[id] = *t;
      impl->special[id] = impl->added.is_special_content(*t);
      if (impl->decoder == DecoderKind::ByteLevel) {
        // Hugging Face's ByteLevel decoder keeps a token whose characters are not all byte-level ones as is.
        auto bytes = byte_level::decode(*t);
        impl->piece[id] = bytes ? *bytes : *t;
      } else {
        impl->piece[id] = *t;
      }
    }
    for (int32_t id : impl->specials.prefix)
      if (id < 0 || size_t(id) >= n) fail("tokenizer.json: post_processor adds id {} which is not in the vocabulary", id);
    for (int32_t id : impl->specials.suffix)
      if (id < 0 || size_t(id) >= n) fail("tokenizer.json: post_processor adds id {} which is not in the vocabulary", id);
  } catch (const InputError& e) {
    fail("{}: {}", source, e.what());
  }

  if (!config_json.empty()) {
    try {
      const nlohmann::json cfg = parse_json(config_json, "tokenizer_config.json");
      if (!cfg.is_object()) fail("tokenizer_config.json must be a JSON object");
      if (cfg.contains("add_bos_token") && !cfg["add_bos_token"].is_null()) {
        if (!cfg["add_bos_token"].is_boolean()) fail("tokenizer_config.json: add_bos_token must be true or false");
        impl->add_bos = cfg["add_bos_token"].get<bool>();
      }
      const ChatTemplateConfig ct = ChatTemplateConfig::from_config(cfg);
      impl->special_token_strings = ct.special_tokens;
      impl->chat_template_source = ct.source;
      Tokenizer partial(impl);
      for (const auto& [key, value] : ct.special_tokens.items()) {
        const auto id = partial.token_id(value.get<std::string>());
        if (!id) fail("tokenizer_config.json: {} {:?} is not a token of tokenizer.json", key, value.get<std::string>());
        if (key == "bos_token") impl->bos = *id;
        if (key == "eos_token") impl->eos = *id;
      }
    } catch (const InputError& e) {
      fail("{}: {}", source, e.what());
    }
    if (!impl->chat_template_source.empty()) {
      // A broken template must not stop plain tokenization; it is reported when the template is used.
      try {
        impl->chat_template = std::make_unique<ChatTemplate>(impl->chat_template_source);
      } catch (const InputError& e) {
        impl->chat_template_error = e.what();
      }
    }
  }
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special) out = impl_->specials.prefix;
  impl_->encode_pieces(text, out);
  if (add_special) out.insert(out.end(), impl_->specials.suffix.begin(), impl_->specials.suffix.end());
  return out;
}

void Tokenizer::encode_append(std::string_view text, std::vector<int32_t>& out) const { impl_->encode_pieces(text, out); }

std::vector<int32_t> Tokenizer::encode_with_bos(std::string_view text) const {
  std::vector<int32_t> out;
  if (impl_->add_bos && impl_->bos >= 0) out.push_back(impl_->bos);
  impl_->encode_pieces(text, out);
  return out;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts, bool add_special) const {
  std::vector<std::vector<int32_t>> out(texts.size());
  // Documents vary in length, so hand them out dynamically.
#pragma omp parallel for schedule(dynamic, 1)
  for (long i = 0; i < long(texts.size()); ++i) out[i] = encode(texts[i], add_special);
  return out;
}

std::string Tokenizer::decode_bytes(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string out;
  if (impl_->decoder == DecoderKind::None) {
    // Without a decoder Hugging Face joins the token strings with spaces.
    bool first = true;
    for (int32_t id : ids) {
      if (id < 0 || size_t(id) >= impl_->vocab_size || !impl_->known[id]) continue;
      if (skip_special && impl_->special[id]) continue;
      if (!first) out += ' ';
      out += impl_->token_text[id];
      first = false;
    }
    return out;
  }
  for (int32_t id : ids) impl_->append_piece(id, skip_special, out);
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  return utf8::to_valid_lossy(decode_bytes(ids, skip_special));
}

std::string Tokenizer::token_to_piece(int32_t id) const {
  std::string out;
  impl_->append_piece(id, false, out);
  return out;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->vocab_size || !impl_->known[id]) return std::nullopt;
  return impl_->token_text[id];
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  int32_t id = impl_->added.find(token);
  if (id < 0) id = impl_->model->token_to_id(token);
  if (id < 0) return std::nullopt;
  return id;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->vocab_size && impl_->special[id];
}

int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
bool Tokenizer::add_bos_token() const { return impl_->add_bos; }
size_t Tokenizer::vocab_size() const { return impl_->vocab_size; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template_source; }
const std::string& Tokenizer::source() const { return impl_->source; }

std::string Tokenizer::apply_chat_template(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                           const nlohmann::ordered_json& extra) const {
  if (!impl_->chat_template_error.empty()) fail("{}: chat template: {}", impl_->source, impl_->chat_template_error);
  if (!impl_->chat_template) fail("{}: the tokenizer has no chat template (tokenizer_config.json chat_template)", impl_->source);
  const auto ctx = chat_template_variables(messages, add_generation_prompt, impl_->special_token_strings, extra);
  return impl_->chat_template->render(ctx);
}

std::string Tokenizer::apply_chat_template(const nlohmann::json& messages, bool add_generation_prompt) const {
  return apply_chat_template(nlohmann::ordered_json::parse(messages.dump()), add_generation_prompt);
}

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_.decode_bytes({id}, skip_special_);
  const size_t n = utf8::complete_prefix_len(pending_);
  std::string out = utf8::to_valid_lossy(std::string_view(pending_).substr(0, n));
  pending_.erase(0, n);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = utf8::to_valid_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace dsv3
