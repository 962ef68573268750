// OpenBLAS picks its kernels from the CPU model at load time. Releases older than the CPU (Debian 12 ships
// 0.3.21) do not know new models and fall back to the generic "Prescott" SSE3 kernels, 3-5x slower than the
// AVX2/AVX-512 ones the CPU can run. The only switch is OPENBLAS_CORETYPE, read when the library loads, so
// when the fallback happened on an AVX2 CPU we set it and re-execute ourselves once.
#include <cblas.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <string>

#include "cli/common.h"

namespace dsv3::cli {

void select_blas_kernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") || std::getenv("DSV3_NO_BLAS_REEXEC")) return;
  std::string core = openblas_get_corename();
  for (auto& c : core) c = char(std::tolower(static_cast<unsigned char>(c)));
  const bool generic = core == "prescott" || core == "core2" || core == "penryn" || core == "dunnington" ||
                       core == "nehalem" || core == "unknown" || core.empty();
  if (!generic || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return;
  setenv("OPENBLAS_CORETYPE", __builtin_cpu_supports("avx512f") ? "SkylakeX" : "Haswell", 1);
  setenv("DSV3_NO_BLAS_REEXEC", "1", 1);
  execv("/proc/self/exe", argv);  // returns only on failure: then we simply run with the generic kernels
}

}  // namespace dsv3::cli
