#include "eval/perplexity.h"

#include <cmath>

#include "core/error.h"

namespace dsv3 {

double PerplexityResult::perplexity() const { return tokens ? std::exp(-logprob / double(tokens)) : NAN; }
double PerplexityResult::bits_per_byte() const { return bytes ? -logprob / std::log(2.0) / double(bytes) : NAN; }

std::vector<ScoreRequest> rolling_windows(const std::vector<int32_t>& doc, int32_t prefix, int64_t context,
                                          int64_t stride) {
  if (context < 2) fail("the context must hold at least 2 tokens, got {}", context);
  stride = std::min(std::max<int64_t>(stride, 1), context - 1);
  // full = [prefix] + doc; token full[p] (p >= 1) is predicted from full[0 .. p).
  std::vector<int32_t> full;
  full.reserve(doc.size() + 1);
  full.push_back(prefix);
  full.insert(full.end(), doc.begin(), doc.end());
  std::vector<ScoreRequest> out;
  const int64_t n = int64_t(full.size());
  for (int64_t a = 1; a < n; a += stride) {  // predict full[a .. b)
    const int64_t b = std::min(n, a + stride);
    const int64_t start = std::max<int64_t>(0, b - context);  // the window is full[start .. b), <= context tokens
    ScoreRequest r;
    r.tokens.assign(full.begin() + start, full.begin() + b);
    r.score_from = size_t(a - start);
    out.push_back(std::move(r));
  }
  return out;
}

PerplexityResult perplexity(Scorer& sc, const std::vector<std::vector<int32_t>>& docs, const std::vector<int64_t>& bytes,
                            int32_t prefix, int64_t context, int64_t stride, const Progress& progress) {
  std::vector<ScoreRequest> all;
  PerplexityResult r;
  for (size_t d = 0; d < docs.size(); ++d) {
    if (docs[d].empty()) continue;
    auto w = rolling_windows(docs[d], prefix, context, stride);
    all.insert(all.end(), std::make_move_iterator(w.begin()), std::make_move_iterator(w.end()));
    r.tokens += int64_t(docs[d].size());
    r.bytes += bytes[d];
    ++r.documents;
  }
  if (all.empty()) fail("no tokens to score (the documents are empty)");
  r.windows = int64_t(all.size());
  int64_t scored = 0;
  for (auto& s : sc.score(all, progress)) r.logprob += s.logprob, scored += s.tokens;
  if (scored != r.tokens) fail("internal: scored {} tokens of {}", scored, r.tokens);
  return r;
}

}  // namespace dsv3
