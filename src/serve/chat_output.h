#pragma once
// Splits a chat model's output text into what OpenAI's chat API returns: `reasoning_content` (DeepSeek-R1
// thinking, `<think>...</think>`), `content`, and `tool_calls` parsed from DeepSeek-V3's tool-call format:
//   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
//   ... more calls ... <｜tool▁calls▁end｜>
// It works on streamed text: feed() returns what became certain (text that could still be the start of a
// marker is held back; a tool call is returned once its end marker arrives), finish() returns the rest.
// Feeding a text whole or in any pieces gives the same concatenated result.
#include <string>
#include <vector>

namespace dsv3 {

struct ToolCall {
  std::string id, name, arguments;  // arguments: the JSON text the model wrote
};

struct ChatDelta {
  std::string reasoning, content;
  std::vector<ToolCall> tool_calls;
  bool empty() const { return reasoning.empty() && content.empty() && tool_calls.empty(); }
};

class ChatOutputParser {
 public:
  // tools: parse tool calls. reasoning: the output starts in thinking (R1 templates open <think> themselves;
  // a leading "<think>" in the output is dropped) and switches to content after "</think>".
  ChatOutputParser(bool tools, bool reasoning);
  ChatDelta feed(const std::string& text);
  ChatDelta finish();
  int64_t tool_calls_seen() const { return calls_; }

 private:
  enum class State { ThinkStart, Think, ContentStart, Content, Tools, After };
  void run(ChatDelta& d, bool final);
  bool tools_;
  State st_;
  std::string buf_;
  int64_t calls_ = 0;
};

}  // namespace dsv3
