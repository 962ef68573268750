#pragma once
// Benchmark tasks read from JSONL, one document per line:
//   multiple choice (MMLU / C-Eval style): {"question", "choices": [...] (or fields "A".."Z"), "answer": index,
//     letter or the choice's text}; each choice is scored as the continuation `target_delimiter + choice`
//     of the rendered prompt; acc takes the best log-likelihood, acc_norm the best per character of the choice
//     (lm-evaluation-harness' definitions);
//   generation (GSM8K style): {"question", "answer"}; the output is cut at stop strings, an answer is extracted
//     by regex (first group) and compared with the reference's (its text after "####" when present), both
//     normalized (commas, "$" and trailing "." removed, whitespace trimmed): exact match;
//   code (HumanEval style): {"task_id", "prompt", "test", "entry_point"}; every sample `prompt + completion +
//     test + check(entry_point)` runs in the sandbox; pass@k by the unbiased estimator.
// Prompts come from a template where {field} is the document's field ({{ and }} are braces).
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eval/sandbox.h"
#include "eval/scorer.h"
#include "tokenizer/tokenizer.h"

namespace dsv3 {

std::vector<nlohmann::json> read_jsonl(const std::string& path, int64_t limit);  // InputError names the line
std::string render_template(const std::string& tmpl, const nlohmann::json& doc);    // InputError on a missing field

// lm-evaluation-harness' split of (context, continuation) into tokens: trailing whitespace of the context moves
// to the continuation, the whole text is encoded, and the continuation is what follows the context's tokens.
// Left-truncated to `context_len` tokens. bos: encode with BOS (add_bos_token).
ScoreRequest encode_pair(const Tokenizer& tok, const std::string& context, const std::string& continuation,
                         bool bos, int64_t context_len);

struct McOptions {
  std::string prompt_template = "Question: {question}\nAnswer:";
  std::string target_delimiter = " ";
  bool bos = true;
};
struct McItem {
  std::vector<double> loglik;
  std::vector<bool> greedy;
  int64_t gold = -1, pred = -1, pred_norm = -1;
};
nlohmann::json eval_multiple_choice(Scorer& sc, const Tokenizer& tok, const std::vector<nlohmann::json>& docs,
                                    const McOptions& o, int64_t context_len, std::vector<McItem>* items,
                                    const Progress& progress);

struct GenOptions {
  std::string prompt_template = "Question: {question}\nAnswer:";
  std::vector<std::string> stop = {"\n\n", "Question:"};
  std::string answer_regex = "#### *(-?[0-9.,]+)";  // tried first; then the last number in the output
  int64_t max_tokens = 256;
  bool bos = true;
};
std::string normalize_answer(std::string s);
std::string extract_answer(const std::string& output, const std::string& regex);  // "" when nothing matches
nlohmann::json eval_generation(Scorer& sc, const Tokenizer& tok, const std::vector<nlohmann::json>& docs,
                               const GenOptions& o, int64_t context_len, std::vector<nlohmann::json>* samples,
                               const Progress& progress);

struct CodeOptions {
  int64_t samples = 1;             // per task (n)
  std::vector<int64_t> ks = {1};   // pass@k for each k <= samples
  SamplingParams sampling;         // temperature 0 when samples == 1, else the given one
  int64_t max_tokens = 384;
  std::vector<std::string> stop = {"\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"};
  SandboxLimits limits;
  bool bos = true;
  bool references = false;         // run each task's canonical_solution instead of generating (checks the harness)
};
nlohmann::json eval_code(Scorer& sc, const Tokenizer& tok, const std::vector<nlohmann::json>& docs,
                         const CodeOptions& o, int64_t context_len, std::vector<nlohmann::json>* samples,
                         const Progress& progress);

}  // namespace dsv3
