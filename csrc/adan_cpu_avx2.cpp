// The AVX2 + FMA + F16C build of the CPU inner loop.  Setuptools compiles
// every source of an extension with the same flags, so the instruction set is
// chosen here with GCC's target pragma (before any header, so the Vectorized
// types below are ATen's AVX2 ones); adan_cpu.cpp calls it only when the CPU
// has these instructions.  Other compilers get the portable loop.
#include "adan_cpu_types.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
// GCC's pragma does not define the feature macros that ATen's and Sleef's
// headers test; the instructions are enabled for everything below.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define ADAN_CPU_NS avx2
#include "adan_cpu_kernel.h"
#else
namespace adan_plugin {
namespace avx2 {
void update_range(const CpuTensor&, int64_t, int64_t, const AdanCoeffs&, CpuDtype, CpuDtype) {}
}  // namespace avx2
}  // namespace adan_plugin
#endif
