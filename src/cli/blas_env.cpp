// OpenBLAS picks its kernels from the CPU model at load time. Releases older than the CPU (Debian 12 ships
// 0.3.21) do not know new models and fall back to the generic "Prescott" SSE3 kernels, 3-5x slower than the
// AVX2/AVX-512 ones the CPU can run. The only switch is OPENBLAS_CORETYPE, read when the library loads, so
// when the fallback happened on an AVX2 CPU we set it and re-execute ourselves once.
// The same re-execution sets OMP_WAIT_POLICY=passive for the training commands (unless set): their OpenMP
// regions alternate with OpenBLAS' and, when other processes share the cores, spinning idle threads cost
// 5-10x (measured: 900 vs 5,000 tokens/s on 2 busy cores); on idle cores passive costs a few percent.
#include <cblas.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <string>

#include "cli/common.h"

namespace dsv3::cli {

void select_blas_kernels(char** argv) {
  if (std::getenv("DSV3_NO_BLAS_REEXEC")) return;
  bool changed = false;
  if (!std::getenv("OPENBLAS_CORETYPE")) {
    std::string core = openblas_get_corename();
    for (auto& c : core) c = char(std::tolower(static_cast<unsigned char>(c)));
    const bool generic = core == "prescott" || core == "core2" || core == "penryn" || core == "dunnington" ||
                         core == "nehalem" || core == "unknown" || core.empty();
    if (generic && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      setenv("OPENBLAS_CORETYPE", __builtin_cpu_supports("avx512f") ? "SkylakeX" : "Haswell", 1);
      changed = true;
    }
  }
  const std::string cmd = argv[0] && argv[1] ? argv[1] : "";
  // serve too: its HTTP threads share the cores with the engine's OpenMP team between steps.
  if ((cmd == "train" || cmd == "grads" || cmd == "serve") && !std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    changed = true;
  }
  if (!changed) return;
  setenv("DSV3_NO_BLAS_REEXEC", "1", 1);
  execv("/proc/self/exe", argv);  // returns only on failure: then we simply run with the defaults
}

}  // namespace dsv3::cli
