// Plain types shared by the CPU driver (adan_cpu.cpp) and the per-ISA inner
// loops (adan_cpu_kernel.h); no inline code, so nothing here is compiled twice.
#pragma once

#include <cstdint>
#include <string>

namespace adan_plugin {

struct AdanCoeffs;

// kQ8: 8-bit block-quantized states (adan_quant.h); as a parameter dtype never.
enum class CpuDtype { kFloat, kBFloat16, kHalf, kQ8 };

struct CpuTensor {
  void *p, *g, *m, *n, *d, *neg;
  float* scale[4];  // kQ8 states: per-block scales of m, n, d, neg (else null)
  void* comp;       // kahan_sum: compensation of a 16-bit parameter (else null)
  int64_t numel;
  bool first;
};

// One range [begin, end) of one tensor, per instruction set (adan_cpu.cpp
// picks one at run time; each is adan_cpu_kernel.h compiled for that set).
#define ADAN_CPU_DECLARE_UPDATE_RANGE(ns)                                                                \
  namespace ns {                                                                                         \
  void update_range(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c, CpuDtype p,     \
                    CpuDtype s);                                                                         \
  }
ADAN_CPU_DECLARE_UPDATE_RANGE(base)         // portable (ATen's default Vectorized)
ADAN_CPU_DECLARE_UPDATE_RANGE(avx2)         // AVX2 + FMA + F16C
ADAN_CPU_DECLARE_UPDATE_RANGE(avx512)       // AVX512 F/BW/DQ/VL (+ the AVX2 set)
ADAN_CPU_DECLARE_UPDATE_RANGE(avx512_bf16)  // the same + AVX512-BF16 conversions
#undef ADAN_CPU_DECLARE_UPDATE_RANGE

// Which build fused_adan_cpu runs ("base", "avx2", "avx512", "avx512_bf16"):
// the best the CPU has, capped by ADAN_PLUGIN_CPU_ISA (adan_cpu.cpp); test op
// `_cpu_isa`.  Raises on an ADAN_PLUGIN_CPU_ISA that names no build.
std::string cpu_isa_name();

}  // namespace adan_plugin
