#pragma once
// Ctrl-C during training: the run finishes its step, saves its checkpoint and stops (the trainers print how to
// resume); a second Ctrl-C kills at once. Shared by the V3 and V4 trainers.
#include <atomic>

namespace dsv3 {

// The stop request of the running training: set by SIGINT while a SigintStop is installed, or by the trainer
// itself (a callback asking to stop, another rank's Ctrl-C).
std::atomic<bool>& training_stop_requested();

// Clears the request; with install, SIGINT sets it (and restores the default action) until this object ends,
// when the previous handler comes back.
class SigintStop {
 public:
  explicit SigintStop(bool install);
  ~SigintStop();
  SigintStop(const SigintStop&) = delete;
  SigintStop& operator=(const SigintStop&) = delete;

 private:
  bool installed_;
  void (*previous_)(int) = nullptr;
};

}  // namespace dsv3
