// Pieces of `dsv3 eval` and the server's output handling, each against a naive version: the chat output
// parser (tool calls, R1 thinking) fed whole and split at every byte, token logprobs against a direct
// log-softmax, pass@k against binomial coefficients, rolling perplexity windows, answer extraction, the
// lm-evaluation-harness context/continuation split, and the code sandbox's limits.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <set>

#include "eval/pass_at_k.h"
#include "eval/perplexity.h"
#include "eval/sandbox.h"
#include "eval/tasks.h"
#include "serve/chat_output.h"
#include "serve/engine.h"

using namespace dsv3;

namespace {

const std::string kCall1 =
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>";
const std::string kCall2 = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n{\"a\": 1, \"b\": 2}\n```<｜tool▁call▁end｜>";

// Feeds text in pieces cut at the given byte positions and merges the deltas.
ChatDelta parse_split(const std::string& text, bool tools, bool reasoning, const std::vector<size_t>& cuts) {
  ChatOutputParser p(tools, reasoning);
  ChatDelta all;
  size_t at = 0;
  auto add = [&](ChatDelta d) {
    all.reasoning += d.reasoning;
    all.content += d.content;
    for (auto& t : d.tool_calls) all.tool_calls.push_back(t);
  };
  for (size_t c : cuts) {
    add(p.feed(text.substr(at, c - at)));
    at = c;
  }
  add(p.feed(text.substr(at)));
  add(p.finish());
  return all;
}

void expect_same(const ChatDelta& a, const ChatDelta& b) {
  EXPECT_EQ(a.reasoning, b.reasoning);
  EXPECT_EQ(a.content, b.content);
  ASSERT_EQ(a.tool_calls.size(), b.tool_calls.size());
  for (size_t i = 0; i < a.tool_calls.size(); ++i) {
    EXPECT_EQ(a.tool_calls[i].name, b.tool_calls[i].name);
    EXPECT_EQ(a.tool_calls[i].arguments, b.tool_calls[i].arguments);
  }
}

}  // namespace

TEST(ChatOutput, ParsesDeepSeekToolCalls) {
  const std::string text = "Let me check." + std::string("<｜tool▁calls▁begin｜>") + kCall1 + "\n" + kCall2 + "<｜tool▁calls▁end｜>";
  ChatDelta d = parse_split(text, true, false, {});
  EXPECT_EQ(d.content, "Let me check.");
  ASSERT_EQ(d.tool_calls.size(), 2u);
  EXPECT_EQ(d.tool_calls[0].name, "get_weather");
  EXPECT_EQ(d.tool_calls[0].arguments, "{\"city\": \"Paris\"}");
  EXPECT_EQ(d.tool_calls[1].name, "add");
  EXPECT_EQ(d.tool_calls[1].arguments, "{\"a\": 1, \"b\": 2}");
  EXPECT_NE(d.tool_calls[0].id, d.tool_calls[1].id);
  // Streaming: every split point (two cuts) gives the same result.
  for (size_t i = 0; i <= text.size(); i += 3)
    for (size_t j = i; j <= text.size(); j += 7) expect_same(parse_split(text, true, false, {i, j}), d);
  // Without tool parsing the markers are plain content.
  EXPECT_EQ(parse_split(text, false, false, {}).content, text);
}

TEST(ChatOutput, UnfinishedOrMalformedCallsStayAsContent) {
  const std::string cut = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\"";
  ChatDelta d = parse_split(cut, true, false, {10, 40});
  EXPECT_TRUE(d.tool_calls.empty());
  EXPECT_NE(d.content.find("{\"a\""), std::string::npos);
  // Text that only looks like the start of a marker is content once it cannot be one.
  ChatDelta e = parse_split("a <｜tool b", true, false, {5});
  EXPECT_EQ(e.content, "a <｜tool b");
}

TEST(ChatOutput, SplitsR1Thinking) {
  const std::string text = "<think>\nStep 1. 2 + 2 = 4.\n</think>\n\nThe answer is 4.";
  ChatDelta d = parse_split(text, false, true, {});
  EXPECT_EQ(d.reasoning, "\nStep 1. 2 + 2 = 4.\n");
  EXPECT_EQ(d.content, "The answer is 4.");
  for (size_t i = 0; i <= text.size(); ++i) expect_same(parse_split(text, false, true, {i}), d);
  // R1 templates open <think> in the prompt: the output starts inside the thinking.
  ChatDelta e = parse_split("hmm</think>ok", false, true, {2});
  EXPECT_EQ(e.reasoning, "hmm");
  EXPECT_EQ(e.content, "ok");
  // Thinking then a tool call.
  ChatDelta f = parse_split("plan</think>" + std::string("<｜tool▁calls▁begin｜>") + kCall2 + "<｜tool▁calls▁end｜>", true, true, {});
  EXPECT_EQ(f.reasoning, "plan");
  ASSERT_EQ(f.tool_calls.size(), 1u);
  EXPECT_EQ(f.tool_calls[0].name, "add");
}

TEST(Logprobs, ScoreTokenMatchesNaiveLogSoftmax) {
  std::vector<float> l = {1.5f, -2.0f, 3.25f, 3.25f, 0.0f, -7.0f, 2.0f};
  double mx = 3.25, s = 0;
  for (float v : l) s += std::exp(double(v) - mx);
  TokenLogprob t = score_token(l.data(), int64_t(l.size()), 4, 3);
  EXPECT_NEAR(t.logprob, 0.0 - mx - std::log(s), 1e-6);
  ASSERT_EQ(t.top.size(), 3u);
  EXPECT_EQ(t.top[0].first, 2);  // ties: the lower id first
  EXPECT_EQ(t.top[1].first, 3);
  EXPECT_EQ(t.top[2].first, 6);
  EXPECT_NEAR(t.top[2].second, 2.0 - mx - std::log(s), 1e-6);
  EXPECT_TRUE(std::isnan(score_token(l.data(), 7, -1, 0).logprob));
}

TEST(Eval, PassAtKMatchesBinomials) {
  auto C = [](int64_t n, int64_t k) {
    double r = 1;
    for (int64_t i = 1; i <= k; ++i) r = r * double(n - k + i) / double(i);
    return r;
  };
  for (int64_t n = 1; n <= 20; ++n)
    for (int64_t c = 0; c <= n; ++c)
      for (int64_t k = 1; k <= n; ++k) {
        const double naive = n - c < k ? 1.0 : 1.0 - C(n - c, k) / C(n, k);
        EXPECT_NEAR(pass_at_k(n, c, k), naive, 1e-12) << n << " " << c << " " << k;
      }
  EXPECT_DOUBLE_EQ(pass_at_k(10, 3, 1), 0.3);
}

TEST(Eval, RollingWindowsPredictEveryTokenOnceWithMostContext) {
  std::vector<int32_t> doc;
  for (int i = 0; i < 23; ++i) doc.push_back(100 + i);
  for (int64_t ctx : {2, 4, 7, 30})
    for (int64_t stride : {1, 3, 100}) {
      auto w = rolling_windows(doc, 7, ctx, stride);
      std::vector<int> seen(doc.size(), 0);
      for (auto& r : w) {
        ASSERT_LE(int64_t(r.tokens.size()), ctx);
        ASSERT_GE(r.score_from, 1u);
        // The window is a contiguous piece of [7] + doc; find where it starts from its last token.
        const int64_t end = r.tokens.back() - 100 + 1;  // index in doc one past the last token
        for (size_t j = r.score_from; j < r.tokens.size(); ++j) {
          const int64_t pos = end - int64_t(r.tokens.size() - j);
          ASSERT_EQ(r.tokens[j], doc[size_t(pos)]);
          ++seen[size_t(pos)];
        }
        // As much context as fits: a window shorter than ctx starts at the prefix.
        if (int64_t(r.tokens.size()) < ctx) EXPECT_EQ(r.tokens[0], 7);
      }
      for (int s : seen) EXPECT_EQ(s, 1) << "ctx " << ctx << " stride " << stride;
    }
}

TEST(Eval, AnswerExtractionAndNormalization) {
  EXPECT_EQ(extract_answer("so 3 + 4 = 7\n#### 1,234.", "#### *(-?[0-9.,]+)"), "1234");
  EXPECT_EQ(extract_answer("The total is $18.", "#### *(-?[0-9.,]+)"), "18");
  EXPECT_EQ(extract_answer("first 5 then -12", "#### *(-?[0-9.,]+)"), "-12");
  EXPECT_EQ(extract_answer("no digits", "#### *(-?[0-9.,]+)"), "");
  EXPECT_EQ(normalize_answer("  $1,000. "), "1000");
}

TEST(Eval, TemplateRendering) {
  nlohmann::json d = {{"question", "2+2?"}, {"n", 3}};
  EXPECT_EQ(render_template("Q: {question} ({n}) {{x}}", d), "Q: 2+2? (3) {x}");
  EXPECT_THROW(render_template("{missing}", d), InputError);
}

TEST(Sandbox, PassFailTimeoutMemoryAndNetwork) {
  SandboxLimits lim;
  lim.wall_seconds = 5;
  lim.cpu_seconds = 3;
  lim.memory_bytes = int64_t(512) << 20;
  EXPECT_TRUE(run_python("assert 1 + 1 == 2\nprint('ok')\n", lim).passed);
  SandboxResult f = run_python("assert 1 + 1 == 3\n", lim);
  EXPECT_FALSE(f.passed);
  EXPECT_NE(f.output.find("AssertionError"), std::string::npos);
  lim.wall_seconds = 2;
  SandboxResult t = run_python("while True:\n    pass\n", lim);
  EXPECT_FALSE(t.passed);
  EXPECT_TRUE(t.timed_out);
  lim.wall_seconds = 10;
  SandboxResult m = run_python("x = bytearray(2 << 30)\n", lim);  // 2 GiB > 512 MiB address space
  EXPECT_FALSE(m.passed);
  EXPECT_NE(m.output.find("MemoryError"), std::string::npos);
  // Files land in a temporary directory that is removed afterwards.
  EXPECT_TRUE(run_python("open('x.txt', 'w').write('hi')\nimport os\nassert os.path.exists('x.txt')\n", lim).passed);
  if (!sandbox_info().network_isolated) GTEST_SKIP() << "no network namespace here: the sandbox runs with the network";
  // A port that listens on this machine's loopback: reachable from here, not from inside the sandbox.
  int s = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(s, (sockaddr*)&a, sizeof a), 0);
  ASSERT_EQ(listen(s, 4), 0);
  socklen_t len = sizeof a;
  getsockname(s, (sockaddr*)&a, &len);
  const int port = ntohs(a.sin_port);
  const std::string prog = "import socket\ntry:\n    socket.create_connection(('127.0.0.1', " + std::to_string(port) +
                           "), timeout=2)\n    raise SystemExit(3)\nexcept OSError:\n    pass\n";
  SandboxResult n = run_python(prog, lim);
  close(s);
  EXPECT_TRUE(n.passed) << "exit " << n.exit_code << ": " << n.output;
}
