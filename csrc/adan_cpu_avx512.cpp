// The AVX-512 builds of the CPU inner loop (AVX512 F/BW/DQ/VL with the AVX2
// set, ATen's AVX512 Vectorized types): namespace `avx512`, and `avx512_bf16`
// when adan_cpu_avx512_bf16.cpp includes this file with ADAN_CPU_NATIVE_BF16
// (bf16 states and parameters converted with AVX512-BF16 instructions).  As in
// adan_cpu_avx2.cpp, GCC's target pragma chooses the instructions (setuptools
// has no per-file flags) and adan_cpu.cpp calls a build only when the CPU has
// them.  Other compilers get the portable loop.
#include "adan_cpu_types.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#ifdef ADAN_CPU_NATIVE_BF16
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
#define __AVX512BF16__ 1
#define ADAN_CPU_NS avx512_bf16
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#define ADAN_CPU_NS avx512
#endif
// GCC's pragma does not define the feature macros that ATen's and Sleef's
// headers test; the instructions are enabled for everything below.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512DQ__ 1
#define __AVX512VL__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
// GCC 12's _mm256_undefined_si256 (inside _mm512_cvtps_ph) initialises itself
// on purpose; its -Wmaybe-uninitialized there is noise.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "adan_cpu_kernel.h"
#else
namespace adan_plugin {
#ifdef ADAN_CPU_NATIVE_BF16
namespace avx512_bf16 {
#else
namespace avx512 {
#endif
void update_range(const CpuTensor&, int64_t, int64_t, const AdanCoeffs&, CpuDtype, CpuDtype) {}
}  // namespace
}  // namespace adan_plugin
#endif
