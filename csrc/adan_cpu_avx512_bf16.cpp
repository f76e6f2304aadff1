// The AVX-512 build with AVX512-BF16 conversions (namespace `avx512_bf16`):
// the same source as adan_cpu_avx512.cpp, a second translation unit because
// the instruction set is per file.
#define ADAN_CPU_NATIVE_BF16 1
#include "adan_cpu_avx512.cpp"
