// Plain types shared by the CPU driver (adan_cpu.cpp) and the per-ISA inner
// loops (adan_cpu_kernel.h); no inline code, so nothing here is compiled twice.
#pragma once

#include <cstdint>

namespace adan_plugin {

struct AdanCoeffs;

enum class CpuDtype { kFloat, kBFloat16, kHalf };

struct CpuTensor {
  void *p, *g, *m, *n, *d, *neg;
  int64_t numel;
  bool first;
};

// One range [begin, end) of one tensor, per instruction set.
namespace base {
void update_range(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c, CpuDtype p, CpuDtype s);
}
namespace avx2 {
void update_range(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c, CpuDtype p, CpuDtype s);
}

}  // namespace adan_plugin
