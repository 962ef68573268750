#include "train/stop_signal.h"

#include <csignal>

namespace dsv3 {

namespace {
std::atomic<bool> g_requested{false};  // lock-free, so the handler may set it
void on_sigint(int) {
  g_requested = true;
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C kills at once
}
}  // namespace

std::atomic<bool>& training_stop_requested() { return g_requested; }

SigintStop::SigintStop(bool install) : installed_(install) {
  g_requested = false;
  if (installed_) previous_ = std::signal(SIGINT, on_sigint);
}

SigintStop::~SigintStop() {
  if (installed_) std::signal(SIGINT, previous_);
}

}  // namespace dsv3
