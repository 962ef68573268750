#include "ops/cpu/blas_select.h"

#include <cblas.h>

#include <cctype>

namespace dsv3 {

std::string blas_coretype_fix() {
  std::string core = openblas_get_corename();
  for (auto& c : core) c = char(std::tolower(static_cast<unsigned char>(c)));
  const bool generic = core == "prescott" || core == "core2" || core == "penryn" || core == "dunnington" ||
                       core == "nehalem" || core == "unknown" || core.empty();
  if (!generic || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return "";
  return __builtin_cpu_supports("avx512f") ? "SkylakeX" : "Haswell";
}

}  // namespace dsv3
