// The CPU inner loop of fused_adan_, compiled once per instruction set:
// adan_cpu.cpp includes it as the portable build (namespace `base`),
// adan_cpu_avx2.cpp as the AVX2+FMA+F16C build (`avx2`), adan_cpu_avx512.cpp
// as the AVX-512 builds (`avx512`, and `avx512_bf16` with ADAN_CPU_NATIVE_BF16),
// picked at run time.  Everything defined here lives in those namespaces or
// depends on the CPU_CAPABILITY-namespaced Vectorized types, so the builds
// never share (ODR-merge) a function.  A storage type gets every build by
// specialising Io<T> (or update_range_t) here or in a header included here.
#pragma once

#ifndef ADAN_CPU_NS
#error "define ADAN_CPU_NS before including adan_cpu_kernel.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "adan_cpu_types.h"
#include "adan_quant.h"

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
// fp32 vectors, with ATen's conversions (Io<T> below, unless specialised).
template <typename T>
struct AtenIo {
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
template <typename T>
struct Io : AtenIo<T> {};

// 16-bit -> fp32 for 2*kW values (n < 2*kW at a tensor's end, missing ones read as 0), faster than
// ATen's conversions; stores keep ATen's (rounding with a NaN test) except where noted below.
// - bf16: one load, its 64-bit quarters reordered so that the in-lane unpacks with zero yield values
//   0..kW-1 and kW..2kW-1 in order, each bf16 moved into the upper half of its fp32 lane.  Three
//   instructions per 2*kW values where ATen's conversion takes five (a second load of the low half, an
//   extract, two zero extensions, two shifts): 5-18% off the bf16-state loop on Zen 4, depending on the
//   build (csrc/README.md); llvm-mca's Ice Lake-SP model predicts 1.66 -> 1.51 cycles per element for
//   the AVX-512 build.
// - fp16: the conversion reads memory, two vcvtph2ps per 2*kW values instead of a whole-vector load, an
//   extract and two conversions.  Exact, as ATen's: every fp16 value, subnormals included, is an fp32 value.
#if defined(CPU_CAPABILITY_AVX512)
// The 2*kW 16-bit values at ptr, or the n < 2*kW there zero-padded.
template <typename T>
C10_ALWAYS_INLINE __m512i load_16bit_bits(const T* ptr, int64_t n) {
  return n >= 2 * kW ? _mm512_loadu_si512(ptr) : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ULL << n) - 1), ptr);
}
C10_ALWAYS_INLINE void load_16bit(const c10::BFloat16* ptr, int64_t n, fVec& a, fVec& b) {
  const __m512i v = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7), load_16bit_bits(ptr, n));
  a = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), v));
  b = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), v));
}
C10_ALWAYS_INLINE void load_16bit(const c10::Half* ptr, int64_t n, fVec& a, fVec& b) {
  if (n >= 2 * kW) {  // the conversions read memory
    a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ptr)));
    b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ptr + kW)));
  } else {
    const __m512i v = load_16bit_bits(ptr, n);
    a = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
    b = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// The 2*kW 16-bit values at ptr, or the n < 2*kW there zero-padded (AVX2 has no 16-bit masked load).  The
// clamp tells GCC that n is in range: inlined into the 8-bit loop it warns of a negative n otherwise.
template <typename T>
C10_ALWAYS_INLINE __m256i load_16bit_bits(const T* ptr, int64_t n) {
  if (n >= 2 * kW) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ptr));
  alignas(32) T tmp[2 * kW] = {};
  std::memcpy(tmp, ptr, std::clamp<int64_t>(n, 0, 2 * kW) * sizeof(T));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
}
C10_ALWAYS_INLINE void load_16bit(const c10::BFloat16* ptr, int64_t n, fVec& a, fVec& b) {
  const __m256i v = _mm256_permute4x64_epi64(load_16bit_bits(ptr, n), 0xd8);
  a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
  b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
}
C10_ALWAYS_INLINE void load_16bit(const c10::Half* ptr, int64_t n, fVec& a, fVec& b) {
  if (n >= 2 * kW) {  // the conversions read memory
    a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr)));
    b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr + kW)));
  } else {
    const __m256i v = load_16bit_bits(ptr, n);
    a = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
    b = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// A 16-bit type whose loads this build does itself (load_16bit above); stores stay ATen's.
template <typename T>
struct Io16 : AtenIo<T> {
  static C10_ALWAYS_INLINE void load(const T* ptr, int64_t n, fVec& a, fVec& b) { load_16bit(ptr, n, a, b); }
};
template <>
struct Io<c10::Half> : Io16<c10::Half> {};
template <>
struct Io<c10::BFloat16> : Io16<c10::BFloat16> {
#ifdef ADAN_CPU_NATIVE_BF16
  // AVX512-BF16: one vcvtne2ps2bf16 rounds 32 floats (round to nearest even, as ATen's integer
  // sequence does, which the other builds keep); unlike that sequence it reads and writes subnormals
  // as zero (DAZ/FTZ), a change below 1.2e-38 in absolute value.
  static C10_ALWAYS_INLINE void store(c10::BFloat16* ptr, int64_t n, const fVec& a, const fVec& b) {
    const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a in the low half
    if (n >= 2 * kW) {
      _mm512_storeu_si512(ptr, v);
    } else {
      _mm512_mask_storeu_epi16(ptr, static_cast<__mmask32>((1ULL << n) - 1), v);
    }
  }
#endif
};
#endif

// bf16 stores of values that hold no NaN: round to nearest even on the integer bits (ATen's sequence)
// without its NaN test and blend, 2 of its 7 instructions per vector.  update_block takes them for a
// group of states whose new parameter values hold no NaN: a NaN in any new state reaches the parameter
// (adan_cpu_lowmem.h, BlockFlag).  The AVX512-BF16 build rounds with its own instruction instead.
#if defined(CPU_CAPABILITY_AVX512) && !defined(ADAN_CPU_NATIVE_BF16)
constexpr bool kNoNanBf16Store = true;
C10_ALWAYS_INLINE __m512i bf16_bits(__m512 a) {  // the rounded bf16 in each lane's low half
  const __m512i x = _mm512_castps_si512(a);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb), 16);
}
C10_ALWAYS_INLINE bool no_nan(const fVec& a, const fVec& b) { return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) == 0; }
C10_ALWAYS_INLINE void store_bf16_no_nan(c10::BFloat16* ptr, int64_t n, const fVec& a, const fVec& b) {
  // packus interleaves the 128-bit lanes of a and b; the permutation puts a's before b's.
  const __m512i v = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7),
                                             _mm512_packus_epi32(bf16_bits(a), bf16_bits(b)));
  if (n >= 2 * kW) {
    _mm512_storeu_si512(ptr, v);
  } else {
    _mm512_mask_storeu_epi16(ptr, static_cast<__mmask32>((1ULL << n) - 1), v);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kNoNanBf16Store = true;
C10_ALWAYS_INLINE __m256i bf16_bits(__m256 a) {
  const __m256i x = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
}
C10_ALWAYS_INLINE bool no_nan(const fVec& a, const fVec& b) {
  return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)) == 0;
}
C10_ALWAYS_INLINE void store_bf16_no_nan(c10::BFloat16* ptr, int64_t n, const fVec& a, const fVec& b) {
  const __m256i v = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(a), bf16_bits(b)), 0xd8);
  if (n >= 2 * kW) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptr), v);
  } else {
    alignas(32) c10::BFloat16 tmp[2 * kW];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
    std::memcpy(ptr, tmp, n * sizeof(c10::BFloat16));
  }
}
#else  // the portable build, and AVX512-BF16's own conversion: never called
constexpr bool kNoNanBf16Store = false;
C10_ALWAYS_INLINE bool no_nan(const fVec&, const fVec&) { return false; }
C10_ALWAYS_INLINE void store_bf16_no_nan(c10::BFloat16*, int64_t, const fVec&, const fVec&) {}
#endif

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

// Calls f(first, low) with both flags as std::bool_constant: the loops below take a parameter's first
// step (no gradient difference) and the momentum weights' lerp formula (adan_lerp) as template
// arguments, decided once per call instead of once per vector.
template <typename F>
C10_ALWAYS_INLINE void with_loop_flags(bool first, const AdanCoeffs& c, F&& f) {
  const bool low = adan_low_weights(c);
  if (first) {
    low ? f(std::true_type(), std::true_type()) : f(std::true_type(), std::false_type());
  } else {
    low ? f(std::false_type(), std::true_type()) : f(std::false_type(), std::false_type());
  }
}

#include "adan_cpu_lowmem.h"

// 2*kW elements (cnt of them at a tensor's end) of one tensor; comp: its Kahan compensation or null.
template <typename P, typename S, bool kFirst, bool kLow>
C10_ALWAYS_INLINE void update_block(P* p, const P* g, S* m, S* n, S* d, S* neg, P* comp, int64_t cnt,
                                    const AdanCoeffs& c) {
  fVec p0, p1, g0, g1, m0, m1, n0, n1, d0, d1, e0, e1;
  ParamIo<P>::load(p, comp, cnt, p0, p1);
  Io<P>::load(g, cnt, g0, g1);
  Io<S>::load(m, cnt, m0, m1);
  Io<S>::load(n, cnt, n0, n1);
  Io<S>::load(d, cnt, d0, d1);
  Io<S>::load(neg, cnt, e0, e1);
  adan_update<kLow>(p0, g0, m0, n0, d0, e0, c, kFirst);
  adan_update<kLow>(p1, g1, m1, n1, d1, e1, c, kFirst);
  ParamIo<P>::store(p, comp, cnt, p0, p1);
  if constexpr (kNoNanBf16Store && std::is_same_v<S, c10::BFloat16>) {
    if (no_nan(p0, p1)) {
      store_bf16_no_nan(m, cnt, m0, m1);
      store_bf16_no_nan(n, cnt, n0, n1);
      store_bf16_no_nan(d, cnt, d0, d1);
      store_bf16_no_nan(neg, cnt, e0, e1);
      return;
    }
  }
  Io<S>::store(m, cnt, m0, m1);
  Io<S>::store(n, cnt, n0, n1);
  Io<S>::store(d, cnt, d0, d1);
  Io<S>::store(neg, cnt, e0, e1);
}

// Full blocks (constant count: no tail tests) then one partial block; the
// coefficients copied to a local, which the stores cannot alias, so their
// broadcasts stay in registers instead of being reloaded every iteration.
template <typename P, typename S, bool kFirst, bool kLow>
C10_ALWAYS_INLINE void update_loop(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& coeffs) {
  const AdanCoeffs c = coeffs;
  P* p = static_cast<P*>(t.p);
  const P* g = static_cast<const P*>(t.g);
  S* m = static_cast<S*>(t.m);
  S* n = static_cast<S*>(t.n);
  S* d = static_cast<S*>(t.d);
  S* neg = static_cast<S*>(t.neg);
  P* comp = static_cast<P*>(t.comp);
  int64_t i = begin;
  for (; i + 2 * kW <= end; i += 2 * kW)
    update_block<P, S, kFirst, kLow>(p + i, g + i, m + i, n + i, d + i, neg + i, comp ? comp + i : nullptr, 2 * kW,
                                     c);
  if (i < end)
    update_block<P, S, kFirst, kLow>(p + i, g + i, m + i, n + i, d + i, neg + i, comp ? comp + i : nullptr, end - i, c);
}

template <typename P, typename S>
void update_range_t(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c) {
  with_loop_flags(t.first, c, [&](auto first, auto low) {
    update_loop<P, S, decltype(first)::value, decltype(low)::value>(t, begin, end, c);
  });
}

template <typename P>
void update_range_p(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c, CpuDtype s) {
  switch (s) {
    case CpuDtype::kFloat: return update_range_t<P, float>(t, begin, end, c);
    case CpuDtype::kBFloat16: return update_range_t<P, c10::BFloat16>(t, begin, end, c);
    case CpuDtype::kHalf: return update_range_t<P, c10::Half>(t, begin, end, c);
    case CpuDtype::kQ8: return update_range_q8<P>(t, begin, end, c);
  }
}

void update_range(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c, CpuDtype p, CpuDtype s) {
  switch (p) {
    case CpuDtype::kFloat: return update_range_p<float>(t, begin, end, c, s);
    case CpuDtype::kBFloat16: return update_range_p<c10::BFloat16>(t, begin, end, c, s);
    case CpuDtype::kHalf: return update_range_p<c10::Half>(t, begin, end, c, s);
    case CpuDtype::kQ8: break;  // never a parameter dtype (refused by the op's checks)
  }
}

}  // namespace ADAN_CPU_NS
}  // namespace adan_plugin
