#include "eval/sandbox.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>

#include "core/error.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

std::string find_python() {
  for (const char* p : {"/usr/bin/python3", "/usr/local/bin/python3"})
    if (access(p, X_OK) == 0) return p;
  return "python3";  // found through PATH by execvp
}

// Whether `unshare -rn true` (user + network namespace; -n alone when root) succeeds here.
bool probe_unshare(bool root) {
  pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    int devnull = open("/dev/null", O_WRONLY);
    if (devnull >= 0) dup2(devnull, 1), dup2(devnull, 2);
    if (root) execlp("unshare", "unshare", "-n", "true", (char*)nullptr);
    else execlp("unshare", "unshare", "-rn", "true", (char*)nullptr);
    _exit(127);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

void set_limit(int what, rlim_t v, rlim_t hard = 0) {
  rlimit r{v, hard ? hard : v};
  setrlimit(what, &r);
}

}  // namespace

SandboxInfo sandbox_info() {
  static std::once_flag once;
  static SandboxInfo info;
  std::call_once(once, [] {
    info.python = find_python();
    info.network_isolated = std::getenv("DSV3_SANDBOX_NO_UNSHARE") == nullptr && probe_unshare(geteuid() == 0);
  });
  return info;
}

SandboxResult run_python(const std::string& program, const SandboxLimits& lim) {
  const SandboxInfo info = sandbox_info();
  std::string tmpl = (fs::temp_directory_path() / "dsv3-sandbox-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) fail("cannot create a temporary directory for the sandbox");
  const fs::path dir = tmpl;
  {
    std::ofstream f(dir / "program.py", std::ios::binary);
    f << program;
    if (!f) fail("cannot write the sandbox program in {}", dir.string());
  }
  int pipefd[2];
  if (pipe(pipefd) != 0) fail("pipe failed");
  const auto t0 = std::chrono::steady_clock::now();
  pid_t pid = fork();
  if (pid < 0) fail("fork failed");
  if (pid == 0) {
    setpgid(0, 0);
    dup2(pipefd[1], 1);
    dup2(pipefd[1], 2);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, 0);
    for (int fd = 3; fd < 1024; ++fd) close(fd);
    if (chdir(dir.c_str()) != 0) _exit(126);
    // SIGXCPU at the soft limit, SIGKILL a second later should the program catch it.
    const rlim_t cpu = rlim_t(std::max(1.0, std::ceil(lim.cpu_seconds)));
    set_limit(RLIMIT_CPU, cpu, cpu + 1);
    set_limit(RLIMIT_AS, rlim_t(lim.memory_bytes));
    set_limit(RLIMIT_FSIZE, rlim_t(lim.file_bytes));
    set_limit(RLIMIT_NOFILE, 64);
    set_limit(RLIMIT_CORE, 0);
    if (geteuid() != 0) set_limit(RLIMIT_NPROC, 64);  // per user: as root it would not bind
    const char* py = info.python.c_str();
    if (info.network_isolated) {
      if (geteuid() == 0) execlp("unshare", "unshare", "-n", py, "-I", "-B", "program.py", (char*)nullptr);
      else execlp("unshare", "unshare", "-rn", py, "-I", "-B", "program.py", (char*)nullptr);
    } else {
      execlp(py, py, "-I", "-B", "program.py", (char*)nullptr);
    }
    _exit(127);
  }
  close(pipefd[1]);
  setpgid(pid, pid);  // also from the parent: no race with the kill below
  fcntl(pipefd[0], F_SETFL, O_NONBLOCK);
  SandboxResult r;
  int st = 0;
  rusage usage{};
  bool exited = false;
  char buf[4096];
  for (;;) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (elapsed > lim.wall_seconds) {
      r.timed_out = true;
      kill(-pid, SIGKILL);
    }
    pollfd p{pipefd[0], POLLIN, 0};
    poll(&p, 1, 50);
    for (;;) {
      ssize_t n = read(pipefd[0], buf, sizeof buf);
      if (n <= 0) break;
      if (int64_t(r.output.size()) < lim.output_bytes)
        r.output.append(buf, size_t(std::min<int64_t>(n, lim.output_bytes - int64_t(r.output.size()))));
    }
    if (!exited && wait4(pid, &st, WNOHANG, &usage) == pid) exited = true;
    if (exited) break;
  }
  kill(-pid, SIGKILL);  // whatever the program left running
  close(pipefd[0]);
  std::error_code ec;
  fs::remove_all(dir, ec);
  if (WIFEXITED(st)) {
    r.exit_code = WEXITSTATUS(st);
    r.passed = r.exit_code == 0 && !r.timed_out;
  } else if (WIFSIGNALED(st)) {
    r.signal = WTERMSIG(st);
    const double cpu_used = double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
                            1e-6 * double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
    if (r.signal == SIGXCPU || (r.signal == SIGKILL && cpu_used >= std::floor(lim.cpu_seconds))) r.timed_out = true;
  }
  return r;
}

}  // namespace dsv3
