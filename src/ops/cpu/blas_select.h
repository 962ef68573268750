#pragma once
// OpenBLAS picks its kernels from the CPU model when it loads. Releases older than the CPU (Debian 12 ships
// 0.3.21) do not know new models and fall back to the generic "Prescott" SSE3 kernels, 3-5x slower than the
// AVX2/AVX-512 ones the CPU can run. The only switch is OPENBLAS_CORETYPE, read when the library loads, so a
// process that finds the fallback sets it and starts again (the CLI re-executes itself; the Python package
// asks a child process before it loads the extension).
#include <string>

namespace dsv3 {

// The OPENBLAS_CORETYPE to set ("SkylakeX" or "Haswell") when the loaded OpenBLAS fell back to generic kernels
// on a CPU with AVX2 + FMA; "" when its choice stands.
std::string blas_coretype_fix();

}  // namespace dsv3
