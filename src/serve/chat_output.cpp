#include "serve/chat_output.h"

#include <atomic>
#include <ctime>

#include <fmt/format.h>

namespace dsv3 {

namespace {

const std::string kThinkOpen = "<think>", kThinkClose = "</think>";
const std::string kCallsBegin = "<｜tool▁calls▁begin｜>", kCallsEnd = "<｜tool▁calls▁end｜>";
const std::string kCallBegin = "<｜tool▁call▁begin｜>", kCallEnd = "<｜tool▁call▁end｜>", kSep = "<｜tool▁sep｜>";

// Length of the longest suffix of s that is a proper prefix of marker (text to hold back: it may become it).
size_t partial_suffix(const std::string& s, const std::string& marker) {
  for (size_t n = std::min(s.size(), marker.size() - 1); n > 0; --n)
    if (s.compare(s.size() - n, n, marker, 0, n) == 0) return n;
  return 0;
}

std::string new_call_id() {
  static std::atomic<uint64_t> n{0};
  return fmt::format("call_{:x}{:06x}", uint64_t(std::time(nullptr)), n.fetch_add(1));
}

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// One call's text between <｜tool▁call▁begin｜> and <｜tool▁call▁end｜>: TYPE<｜tool▁sep｜>NAME\n```json\nARGS\n```
// (the fence is optional). False when it does not have that shape.
bool parse_call(const std::string& body, ToolCall* c) {
  const size_t sep = body.find(kSep);
  if (sep == std::string::npos) return false;
  std::string rest = body.substr(sep + kSep.size());
  const size_t nl = rest.find('\n');
  c->name = trim(rest.substr(0, nl));
  std::string args = nl == std::string::npos ? "" : rest.substr(nl + 1);
  args = trim(args);
  if (args.rfind("```json", 0) == 0) args = args.substr(7);
  else if (args.rfind("```", 0) == 0) args = args.substr(3);
  if (args.size() >= 3 && args.compare(args.size() - 3, 3, "```") == 0) args.resize(args.size() - 3);
  c->arguments = trim(args);
  if (c->arguments.empty()) c->arguments = "{}";
  c->id = new_call_id();
  return !c->name.empty();
}

}  // namespace

ChatOutputParser::ChatOutputParser(bool tools, bool reasoning)
    : tools_(tools), st_(reasoning ? State::ThinkStart : State::Content) {}

ChatDelta ChatOutputParser::feed(const std::string& text) {
  buf_ += text;
  ChatDelta d;
  run(d, false);
  return d;
}

ChatDelta ChatOutputParser::finish() {
  ChatDelta d;
  run(d, true);
  return d;
}

void ChatOutputParser::run(ChatDelta& d, bool final) {
  for (;;) {
    switch (st_) {
      case State::ThinkStart: {  // drop a leading "<think>" (after whitespace) once it is certain
        const size_t ws = buf_.find_first_not_of(" \t\r\n");
        if (ws == std::string::npos && !final) return;
        if (ws != std::string::npos) {
          const size_t have = buf_.size() - ws;
          if (!final && have < kThinkOpen.size() && kThinkOpen.compare(0, have, buf_, ws, have) == 0) return;
          if (buf_.compare(ws, kThinkOpen.size(), kThinkOpen) == 0) buf_.erase(0, ws + kThinkOpen.size());
        }
        st_ = State::Think;
        continue;
      }
      case State::Think: {
        const size_t p = buf_.find(kThinkClose);
        if (p != std::string::npos) {
          d.reasoning += buf_.substr(0, p);
          buf_.erase(0, p + kThinkClose.size());
          st_ = State::ContentStart;
          continue;
        }
        const size_t hold = final ? 0 : partial_suffix(buf_, kThinkClose);
        d.reasoning += buf_.substr(0, buf_.size() - hold);
        buf_.erase(0, buf_.size() - hold);
        return;
      }
      case State::ContentStart: {  // the answer usually starts after blank lines; they are not content
        buf_.erase(0, std::min(buf_.size(), buf_.find_first_not_of("\r\n")));
        if (buf_.empty() && !final) return;
        st_ = State::Content;
        continue;
      }
      case State::Content: {
        const size_t p = tools_ ? buf_.find(kCallsBegin) : std::string::npos;
        if (p != std::string::npos) {
          d.content += buf_.substr(0, p);
          buf_.erase(0, p + kCallsBegin.size());
          st_ = State::Tools;
          continue;
        }
        const size_t hold = final || !tools_ ? 0 : partial_suffix(buf_, kCallsBegin);
        d.content += buf_.substr(0, buf_.size() - hold);
        buf_.erase(0, buf_.size() - hold);
        return;
      }
      case State::Tools: {
        // Whitespace between calls is skipped; a complete call is returned; the end marker closes the list.
        buf_.erase(0, std::min(buf_.size(), buf_.find_first_not_of(" \t\r\n")));
        if (buf_.compare(0, kCallsEnd.size(), kCallsEnd) == 0) {
          buf_.erase(0, kCallsEnd.size());
          st_ = State::After;
          continue;
        }
        if (buf_.compare(0, kCallBegin.size(), kCallBegin) == 0) {
          const size_t e = buf_.find(kCallEnd);
          if (e != std::string::npos) {
            ToolCall c;
            const std::string body = buf_.substr(kCallBegin.size(), e - kCallBegin.size());
            if (parse_call(body, &c)) {
              d.tool_calls.push_back(std::move(c));
              ++calls_;
            } else {
              d.content += kCallBegin + body + kCallEnd;  // not a call after all: keep the text
            }
            buf_.erase(0, e + kCallEnd.size());
            continue;
          }
        }
        const bool could_be_marker = kCallBegin.compare(0, buf_.size(), buf_, 0, kCallBegin.size()) == 0 ||
                                     kCallsEnd.compare(0, buf_.size(), buf_, 0, kCallsEnd.size()) == 0 ||
                                     buf_.compare(0, kCallBegin.size(), kCallBegin) == 0;
        if (!final && (buf_.empty() || could_be_marker)) return;
        // Anything else (an unfinished call at the end, or text that is no call): returned as content.
        d.content += buf_;
        buf_.clear();
        if (!final) st_ = State::Content;
        return;
      }
      case State::After:
        // Text after the tool calls (the model should stop here) is returned as content.
        d.content += buf_;
        buf_.clear();
        return;
    }
  }
}

}  // namespace dsv3
