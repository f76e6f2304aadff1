// The CPU inner loop of fused_adan_, compiled once per instruction set:
// adan_cpu.cpp includes it as the portable build (namespace `base`), and
// adan_cpu_avx2.cpp as the AVX2+FMA+F16C build (namespace `avx2`), picked at
// run time.  Everything defined here lives in those namespaces or depends on
// the CPU_CAPABILITY-namespaced Vectorized types, so the two builds never
// share (ODR-merge) a function.
#pragma once

#ifndef ADAN_CPU_NS
#error "define ADAN_CPU_NS before including adan_cpu_kernel.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>

#include "adan_cpu_types.h"

namespace adan_plugin {
// Found by the templated update in adan_math.h (declared before it).
C10_ALWAYS_INLINE at::vec::Vectorized<float> adan_sqrt(const at::vec::Vectorized<float>& x) {
  return x.sqrt();
}
}  // namespace adan_plugin

#include "adan_math.h"

namespace adan_plugin {
namespace ADAN_CPU_NS {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kW = fVec::size();

// Loads/stores 2*kW elements (or the n < 2*kW left at a tensor's end) as two
// fp32 vectors.
template <typename T>
struct Io {
  using bVec = at::vec::Vectorized<T>;
  static_assert(bVec::size() == 2 * kW, "a 16-bit vector holds two fp32 vectors");
  static C10_ALWAYS_INLINE void load(const T* ptr, int64_t n, fVec& a, fVec& b) {
    const bVec v = n >= 2 * kW ? bVec::loadu(ptr) : bVec::loadu(ptr, n);
    std::tie(a, b) = at::vec::convert_to_float<T>(v);
  }
  static C10_ALWAYS_INLINE void store(T* ptr, int64_t n, const fVec& a, const fVec& b) {
    const bVec v = at::vec::convert_from_float<T>(a, b);
    if (n >= 2 * kW) {
      v.store(ptr);
    } else {
      v.store(ptr, n);
    }
  }
};

template <>
struct Io<float> {
  static C10_ALWAYS_INLINE void load(const float* ptr, int64_t n, fVec& a, fVec& b) {
    if (n >= 2 * kW) {
      a = fVec::loadu(ptr);
      b = fVec::loadu(ptr + kW);
    } else {
      a = fVec::loadu(ptr, std::min(n, kW));
      b = n > kW ? fVec::loadu(ptr + kW, n - kW) : fVec(0.0f);
    }
  }
  static C10_ALWAYS_INLINE void store(float* ptr, int64_t n, const fVec& a, const fVec& b) {
    if (n >= 2 * kW) {
      a.store(ptr);
      b.store(ptr + kW);
    } else {
      a.store(ptr, std::min(n, kW));
      if (n > kW) b.store(ptr + kW, n - kW);
    }
  }
};

template <typename P, typename S>
void update_range_t(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c) {
  P* p = static_cast<P*>(t.p);
  const P* g = static_cast<const P*>(t.g);
  S* m = static_cast<S*>(t.m);
  S* n = static_cast<S*>(t.n);
  S* d = static_cast<S*>(t.d);
  S* neg = static_cast<S*>(t.neg);
  for (int64_t i = begin; i < end; i += 2 * kW) {
    const int64_t cnt = std::min<int64_t>(2 * kW, end - i);
    fVec p0, p1, g0, g1, m0, m1, n0, n1, d0, d1, e0, e1;
    Io<P>::load(p + i, cnt, p0, p1);
    Io<P>::load(g + i, cnt, g0, g1);
    Io<S>::load(m + i, cnt, m0, m1);
    Io<S>::load(n + i, cnt, n0, n1);
    Io<S>::load(d + i, cnt, d0, d1);
    Io<S>::load(neg + i, cnt, e0, e1);
    adan_update(p0, g0, m0, n0, d0, e0, c, t.first);
    adan_update(p1, g1, m1, n1, d1, e1, c, t.first);
    Io<P>::store(p + i, cnt, p0, p1);
    Io<S>::store(m + i, cnt, m0, m1);
    Io<S>::store(n + i, cnt, n0, n1);
    Io<S>::store(d + i, cnt, d0, d1);
    Io<S>::store(neg + i, cnt, e0, e1);
  }
}

template <typename P>
void update_range_p(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c, CpuDtype s) {
  switch (s) {
    case CpuDtype::kFloat: return update_range_t<P, float>(t, begin, end, c);
    case CpuDtype::kBFloat16: return update_range_t<P, c10::BFloat16>(t, begin, end, c);
    case CpuDtype::kHalf: return update_range_t<P, c10::Half>(t, begin, end, c);
  }
}

void update_range(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c, CpuDtype p, CpuDtype s) {
  switch (p) {
    case CpuDtype::kFloat: return update_range_p<float>(t, begin, end, c, s);
    case CpuDtype::kBFloat16: return update_range_p<c10::BFloat16>(t, begin, end, c, s);
    case CpuDtype::kHalf: return update_range_p<c10::Half>(t, begin, end, c, s);
  }
}

}  // namespace ADAN_CPU_NS
}  // namespace adan_plugin
