#pragma once
// The tokenizer the engine uses: a byte-level BPE tokenizer read from Hugging Face's tokenizer.json (plus
// tokenizer_config.json for BOS/EOS and the chat template) that produces exactly the ids Hugging Face
// tokenizers produces, decodes exactly as it decodes, and renders the model's chat template exactly as
// transformers does.
//
//   auto tok = dsv3::Tokenizer::load("deepseek-v3");           // bundled, or a file, or a model directory
//   auto ids = tok.encode("Hello, world!");                      // [19923, 14, 2058, 3]
//   std::string text = tok.decode(ids);
//   std::string prompt = tok.apply_chat_template(messages, /*add_generation_prompt=*/true);
//
// A Tokenizer is immutable after loading; copies share it and every method is safe to call from many
// threads at once.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsv3 {

class Tokenizer {
 public:
  // path_or_name: a tokenizer.json file, a directory holding tokenizer.json (and optionally
  // tokenizer_config.json), or "deepseek-v3" for the tokenizer bundled with dsv3.
  static Tokenizer load(const std::string& path_or_name);
  // From the texts of tokenizer.json and tokenizer_config.json (config may be empty). `source` names the
  // origin in error messages.
  static Tokenizer from_json_text(const std::string& tokenizer_json, const std::string& config_json,
                                  const std::string& source);

  // Token ids of text. Any bytes are accepted (invalid UTF-8 included). add_special adds what
  // tokenizer.json's post-processor adds, like Hugging Face tokenizers' add_special_tokens=True (for
  // DeepSeek-V3 that is nothing: its post-processor is ByteLevel).
  std::vector<int32_t> encode(std::string_view text, bool add_special = false) const;
  // Appends the ids of text (no special tokens added) to out.
  void encode_append(std::string_view text, std::vector<int32_t>& out) const;
  // BOS (when tokenizer_config.json says add_bos_token) followed by encode(text): the ids transformers'
  // LlamaTokenizerFast gives, which is how DeepSeek-V3 documents are fed to the model.
  std::vector<int32_t> encode_with_bos(std::string_view text) const;
  // encode() of every text, spread over OpenMP threads (one document per task).
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts, bool add_special = false) const;

  // Text of ids, as Hugging Face tokenizers' decode: unknown ids are skipped, special tokens too when
  // skip_special, and invalid UTF-8 (a multi-byte character cut between tokens) becomes U+FFFD.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;
  // The raw bytes of ids, without the UTF-8 repair (for streaming: see StreamDecoder).
  std::string decode_bytes(const std::vector<int32_t>& ids, bool skip_special = false) const;
  // The bytes one token stands for (may be part of a UTF-8 character). Empty for an unknown id.
  std::string token_to_piece(int32_t id) const;
  // The token's string in the vocabulary (for byte-level BPE, its byte-level spelling, e.g. "Ġhello").
  std::optional<std::string> id_to_token(int32_t id) const;
  std::optional<int32_t> token_id(std::string_view token) const;
  bool is_special(int32_t id) const;

  int32_t bos_id() const;  // -1 when tokenizer_config.json names no BOS token
  int32_t eos_id() const;  // -1 when tokenizer_config.json names no EOS token
  bool add_bos_token() const;
  // One past the largest id (model vocabulary and added tokens).
  size_t vocab_size() const;

  // The chat template text from tokenizer_config.json ("" when there is none).
  const std::string& chat_template() const;
  // Renders the chat template for OpenAI-style messages exactly as transformers' apply_chat_template
  // (jinja2 with trim_blocks and lstrip_blocks). extra holds more template variables (for example
  // "tools"); bos_token, eos_token, pad_token and unk_token come from tokenizer_config.json. Throws
  // InputError when the tokenizer has no template or the template fails on these messages.
  std::string apply_chat_template(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                  const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;
  std::string apply_chat_template(const nlohmann::json& messages, bool add_generation_prompt) const;

  // Where it was loaded from (for messages).
  const std::string& source() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Incremental detokenization for streaming: feed ids as they are generated and get back only whole
// UTF-8 text; bytes of a character split across tokens are held back until the character is complete.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true) : tok_(tok), skip_special_(skip_special) {}
  // Text that became complete with this token (possibly empty).
  std::string push(int32_t id);
  // Whatever is still held back, with invalid bytes replaced by U+FFFD (call at the end of the stream).
  std::string flush();

 private:
  Tokenizer tok_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace dsv3
