#pragma once
// Runs untrusted generated code (HumanEval-style checks) in a child process: its own process group and
// temporary directory, rlimits on CPU seconds, address space, file size, open files and (when not root)
// processes, a wall-clock timeout after which the group is killed, and no network when the kernel lets an
// unprivileged user namespace be made (`unshare -rn`); where it cannot, the code runs with the network of the
// caller and SandboxInfo says so (run evaluations of untrusted models inside a container then).
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

struct SandboxLimits {
  double cpu_seconds = 10;
  double wall_seconds = 20;
  int64_t memory_bytes = int64_t(1) << 30;  // RLIMIT_AS
  int64_t file_bytes = int64_t(16) << 20;   // RLIMIT_FSIZE
  int64_t output_bytes = 64 << 10;          // stdout + stderr kept for the report
};

struct SandboxResult {
  bool passed = false;       // exit status 0
  bool timed_out = false;
  int exit_code = -1;        // -1 when killed by a signal
  int signal = 0;
  std::string output;        // stdout and stderr (first output_bytes)
};

struct SandboxInfo {
  bool network_isolated = false;  // `unshare -rn` works here
  std::string python;             // the interpreter used
};

SandboxInfo sandbox_info();
// Runs `python3 -I -B program.py` (program written to a fresh temporary directory that is the working directory).
SandboxResult run_python(const std::string& program, const SandboxLimits& lim);

}  // namespace dsv3
