#pragma once
// tokenizer.json post-processors, for a single sequence with add_special = true: which ids go before and
// after the encoded text. ByteLevel adds none (it only adjusts offsets, which dsv3 does not report);
// TemplateProcessing, BertProcessing and RobertaProcessing add their special tokens; Sequence composes.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsv3 {

struct SpecialsAround {
  std::vector<int32_t> prefix;
  std::vector<int32_t> suffix;
};

SpecialsAround post_processor_from_json(const nlohmann::json& j, const std::string& where = "post_processor");

// tokenizer.json decoders dsv3 runs: ByteLevel (tokens -> bytes -> lossy UTF-8) and none (Hugging Face
// then joins the tokens with spaces).
enum class DecoderKind { None, ByteLevel };

DecoderKind decoder_from_json(const nlohmann::json& j);

}  // namespace dsv3
