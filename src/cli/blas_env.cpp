// The CLI's start-up environment. OPENBLAS_CORETYPE: see ops/cpu/blas_select.h (set, then re-execute once).
// The same re-execution sets OMP_WAIT_POLICY=passive for the training commands (unless set): their OpenMP
// regions alternate with OpenBLAS' and, when other processes share the cores, spinning idle threads cost
// 5-10x (measured: 900 vs 5,000 tokens/s on 2 busy cores); on idle cores passive costs a few percent.
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "cli/common.h"
#include "ops/cpu/blas_select.h"

namespace dsv3::cli {

void select_blas_kernels(char** argv) {
  if (std::getenv("DSV3_NO_BLAS_REEXEC")) return;
  bool changed = false;
  if (!std::getenv("OPENBLAS_CORETYPE")) {
    const std::string fix = blas_coretype_fix();
    if (!fix.empty()) {
      setenv("OPENBLAS_CORETYPE", fix.c_str(), 1);
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
