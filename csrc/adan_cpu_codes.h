// The 8-bit codes of the CPU inner loop, per instruction set: codes loaded as
// fp32 vectors (load_codes) and a block's new values quantized to codes
// (quantize_signed_run, quantize_sq_run), the maps of adan_quant.h.  Included
// by adan_cpu_lowmem.h inside the per-ISA namespace of adan_cpu_kernel.h.
#pragma once


// Codes <-> fp32 vectors, 2*kW codes at a time (cnt < 2*kW at a tensor's end:
// missing codes read as 0 and are not written).  Q is int8_t or uint8_t.
#if defined(CPU_CAPABILITY_AVX512)
template <typename Q>
C10_ALWAYS_INLINE fVec codes_to_float(__m128i b) {
  return _mm512_cvtepi32_ps(std::is_signed_v<Q> ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
}
template <typename Q>
C10_ALWAYS_INLINE void load_codes(const Q* q, int64_t cnt, fVec& a, fVec& b) {
  if (cnt >= 2 * kW) {
    a = codes_to_float<Q>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    b = codes_to_float<Q>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kW)));
  } else {
    const int64_t ca = std::min<int64_t>(cnt, kW), cb = std::max<int64_t>(cnt - kW, 0);
    a = codes_to_float<Q>(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ca) - 1), q));
    b = codes_to_float<Q>(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << cb) - 1), q + kW));
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
template <typename Q>
C10_ALWAYS_INLINE fVec codes_to_float(__m128i b) {
  return _mm256_cvtepi32_ps(std::is_signed_v<Q> ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
}
template <typename Q>
C10_ALWAYS_INLINE void load_codes(const Q* q, int64_t cnt, fVec& a, fVec& b) {
  if (cnt >= 2 * kW) {  // 8-byte loads, which the conversions take as memory operands
    a = codes_to_float<Q>(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    b = codes_to_float<Q>(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + kW)));
  } else {
    alignas(16) Q tmp[2 * kW] = {};
    std::memcpy(tmp, q, cnt);
    const __m128i v = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    a = codes_to_float<Q>(v);
    b = codes_to_float<Q>(_mm_srli_si128(v, 8));
  }
}
// store_codes: c holds integer-valued floats in [-255, 255], written as codes.  min_or_top(v, top):
// min(v, top), and top where v is NaN.  sqrt_estimate(v): sqrt(v) within kLevelSlack (v >= 0, 0 for 0);
// the AVX-512 build has its own quantizer on mask registers (level_codes16 below).
template <typename Q>
C10_ALWAYS_INLINE void store_codes(Q* q, int64_t cnt, const fVec& a, const fVec& b) {
  // Saturating packs are exact here (codes fit their type); packus for uint8 codes up to 255.
  const __m256i ia = _mm256_cvttps_epi32(a), ib = _mm256_cvttps_epi32(b);
  const __m128i wa = _mm_packs_epi32(_mm256_castsi256_si128(ia), _mm256_extracti128_si256(ia, 1));
  const __m128i wb = _mm_packs_epi32(_mm256_castsi256_si128(ib), _mm256_extracti128_si256(ib, 1));
  const __m128i v = std::is_signed_v<Q> ? _mm_packs_epi16(wa, wb) : _mm_packus_epi16(wa, wb);
  if (cnt >= 2 * kW) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), v);
  } else {
    alignas(16) Q tmp[2 * kW];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), v);
    std::memcpy(q, tmp, cnt);
  }
}
C10_ALWAYS_INLINE fVec min_or_top(const fVec& v, const fVec& top) { return _mm256_min_ps(v, top); }
C10_ALWAYS_INLINE fVec sqrt_estimate(const fVec& v) {  // relative error <= 1.5 * 2^-12: <= 0.094 at 255
  return _mm256_mul_ps(v, _mm256_rsqrt_ps(_mm256_max_ps(v, _mm256_set1_ps(1e-30f))));
}
#else
template <typename Q>
C10_ALWAYS_INLINE void load_codes(const Q* q, int64_t cnt, fVec& a, fVec& b) {
  float tmp[2 * kW] = {};
  for (int64_t j = 0; j < std::min<int64_t>(cnt, 2 * kW); ++j) tmp[j] = static_cast<float>(q[j]);
  a = fVec::loadu(tmp);
  b = fVec::loadu(tmp + kW);
}
template <typename Q>
C10_ALWAYS_INLINE void store_codes(Q* q, int64_t cnt, const fVec& a, const fVec& b) {
  float tmp[2 * kW];
  a.store(tmp);
  b.store(tmp + kW);
  for (int64_t j = 0; j < std::min<int64_t>(cnt, 2 * kW); ++j) q[j] = static_cast<Q>(static_cast<int>(tmp[j]));
}
C10_ALWAYS_INLINE fVec min_or_top(const fVec& v, const fVec& top) { return fVec::blendv(top, v, v < top); }
C10_ALWAYS_INLINE fVec sqrt_estimate(const fVec& v) { return v.sqrt(); }
#endif


// A block's codes from its new values x[0, len) (in the stack buffer; for exp_avg_sq its square
// roots u) and the factor s = cmax^2 / A.  Every vector build settles quant::quant_level's c (the
// integer with (c - 1/2)^2 <= v < (c + 1/2)^2) with one comparison from an estimate of sqrt(v) within
// quant::kLevelSlack, as quant_level does (adan_quant.h has the argument).
using quant::kLevelSlack;
#if defined(CPU_CAPABILITY_AVX512)
// On mask registers (ATen's Vectorized comparisons and blends expand masks into vectors and back);
// 16 values per call, returned as their 16 code bytes.  rsqrt14 (14 bits) keeps the divider free for
// the update's sqrt and division.  level_floor: c0 from v and r = rsqrt14 of v (or of a floor of v);
// level_up: the mask where c = c0 + 1.
C10_ALWAYS_INLINE __m512 level_floor(__m512 v, __m512 r) {
  return _mm512_roundscale_ps(_mm512_fmadd_ps(v, r, _mm512_set1_ps(0.5f - kLevelSlack)),
                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}
C10_ALWAYS_INLINE __mmask16 level_up(__m512 v, __m512 c0) {
  return _mm512_cmp_ps_mask(v, _mm512_fmadd_ps(c0, c0, _mm512_add_ps(c0, _mm512_set1_ps(0.25f))), _CMP_GE_OQ);
}
template <bool kSq>
C10_ALWAYS_INLINE __m128i level_codes16(__m512 x, __m512 s, std::false_type /*finite*/) {
  constexpr int cmax = kSq ? quant::kUnsignedMax : quant::kSignedMax;
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 mag = kSq ? x : _mm512_abs_ps(x);  // u = sqrt(n) >= 0 (or NaN)
  const __m512 v = _mm512_min_ps(_mm512_mul_ps(mag, s), _mm512_set1_ps(static_cast<float>(cmax * cmax)));
  // rsqrt14 of a floor, not of v: 0 or a subnormal v would give inf, and 0 * inf is NaN.
  const __m512 c0 = level_floor(v, _mm512_rsqrt14_ps(_mm512_max_ps(v, _mm512_set1_ps(1e-30f))));
  __m512 c = _mm512_mask_add_ps(c0, level_up(v, c0), c0, one);
  if constexpr (kSq) {  // a positive n gets code 1 at least
    c = _mm512_mask_max_ps(c, _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), c, one);
    return _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(c));
  } else {  // x's sign (a NaN, whatever its sign bit: +cmax)
    const __m512i ci = _mm512_cvttps_epi32(c);
    return _mm512_cvtepi32_epi8(
        _mm512_mask_sub_epi32(ci, _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), _mm512_setzero_si512(), ci));
  }
}
// The same codes for a block whose values are all finite (BlockFlag), the common case, in
// fewer and narrower instructions: v = |x| * s is then finite and at most cmax^2 (1 + 2^-22), whose
// level is still cmax, so no clamp; c0 goes to bytes first and the increment and x's sign are applied
// to the 16 bytes.  v = 0 gives rsqrt14 = inf and a NaN c0 (a subnormal v may give an inf c0): both
// convert to the integer 0x80000000, whose low byte is 0, v's level, and compare below every
// threshold; a positive u still gets code 1 (exp_avg_sq), and -0 negates to 0.
template <bool kSq>
C10_ALWAYS_INLINE __m128i level_codes16(__m512 x, __m512 s, std::true_type /*finite*/) {
  const __m512 mag = kSq ? x : _mm512_abs_ps(x);
  const __m512 v = _mm512_mul_ps(mag, s);
  const __m512 c0 = level_floor(v, _mm512_rsqrt14_ps(v));
  __m128i b = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(c0));
  b = _mm_mask_add_epi8(b, level_up(v, c0), b, _mm_set1_epi8(1));
  if constexpr (kSq) {
    return _mm_mask_max_epu8(b, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), b, _mm_set1_epi8(1));
  } else {
    return _mm_mask_sub_epi8(b, _mm512_movepi32_mask(_mm512_castps_si512(x)), _mm_setzero_si128(), b);
  }
}
template <bool kSq, bool kFinite, typename Q>
C10_ALWAYS_INLINE void quantize_run(const float* x, int64_t len, float s, Q* q) {
  const __m512 vs = _mm512_set1_ps(s);
  const std::integral_constant<bool, kFinite> finite;
  int64_t j = 0;
  for (; j + kW <= len; j += kW)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), level_codes16<kSq>(_mm512_loadu_ps(x + j), vs, finite));
  if (j < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - j)) - 1);
    _mm_mask_storeu_epi8(q + j, m, level_codes16<kSq>(_mm512_maskz_loadu_ps(m, x + j), vs, finite));
  }
}
inline void quantize_signed_run(const float* x, int64_t len, float s, int8_t* q, bool finite) {
  finite ? quantize_run<false, true>(x, len, s, q) : quantize_run<false, false>(x, len, s, q);
}
inline void quantize_sq_run(const float* u, int64_t len, float s, uint8_t* q, bool finite) {
  finite ? quantize_run<true, true>(u, len, s, q) : quantize_run<true, false>(u, len, s, q);
}
#else
// quant::quant_level on a vector: v = min(m * s, cmax^2) (NaN: cmax^2), then the settling above.
// Returns the level as a float.
C10_ALWAYS_INLINE fVec quant_levels(const fVec& magnitude, const fVec& s, const fVec& cmax_sq) {
  const fVec v = min_or_top(magnitude * s, cmax_sq);
  const fVec c0 = (sqrt_estimate(v) + fVec(0.5f - kLevelSlack)).floor();
  const fVec hi = c0 * c0 + (c0 + fVec(0.25f));
  return c0 + ((v >= hi) & fVec(1.0f));
}

inline void quantize_signed_clamped(const float* x, int64_t len, float s, int8_t* q) {
  const fVec vs(s), top(static_cast<float>(quant::kSignedMax * quant::kSignedMax)), zero(0.0f), sign_bit(-0.0f);
  for (int64_t j = 0; j < len; j += 2 * kW) {
    const int64_t cnt = std::min<int64_t>(2 * kW, len - j);
    fVec x0, x1;
    Io<float>::load(x + j, cnt, x0, x1);
    // The level of |x| with x's sign (-0.0 truncates to code 0; a NaN gets +cmax, as quantize_signed).
    const fVec c0 = quant_levels(x0.abs(), vs, top) | ((x0 < zero) & sign_bit);
    const fVec c1 = quant_levels(x1.abs(), vs, top) | ((x1 < zero) & sign_bit);
    store_codes(q + j, cnt, c0, c1);
  }
}
inline void quantize_sq_clamped(const float* u, int64_t len, float s, uint8_t* q) {
  const fVec vs(s), top(static_cast<float>(quant::kUnsignedMax * quant::kUnsignedMax)), zero(0.0f), one(1.0f);
  for (int64_t j = 0; j < len; j += 2 * kW) {
    const int64_t cnt = std::min<int64_t>(2 * kW, len - j);
    fVec x0, x1;
    Io<float>::load(u + j, cnt, x0, x1);
    // The level of u = sqrt(n); a positive n gets code 1 at least.
    fVec c0 = quant_levels(x0, vs, top), c1 = quant_levels(x1, vs, top);
    c0 = at::vec::maximum(c0, (x0 > zero) & one), c1 = at::vec::maximum(c1, (x1 > zero) & one);
    store_codes(q + j, cnt, c0, c1);
  }
}
#if defined(CPU_CAPABILITY_AVX2)
// The finite sequence of the AVX-512 build on 8 lanes: the level as an int32 (c0 converted, then the
// comparison's all-ones mask, -1, subtracted), x's sign by vpsignd (as an integer, +0 zeroes a code
// that is 0 anyway), the codes taken as the low byte of each lane (low_bytes16).  v = 0 (or a
// subnormal v, which rsqrtps reads as 0) gives a NaN or inf c0, converted to 0x80000000: low byte 0,
// below every threshold; a positive u still gets code 1 (exp_avg_sq: u's bits, as an unsigned
// integer, are nonzero exactly when u > 0).
//
// The signed maps take c0 without a floor or a conversion: f = fma(v, rsqrt(v), 2^23 - 1/2), rounded
// to nearest, is 2^23 + RN(e - 1/2) for the estimate e = v * rsqrt(v) once e >= 1/2 (from 2^23 on, fp32
// holds exactly the integers), and RN(e - 1/2) is the level c or c - 1 (e - 1/2 lies within
// kLevelSlack of sqrt(v) - 1/2, in [c - 1, c)); below, max(f, 2^23) makes it 0, the level or one
// below it again (e < 1/2 puts sqrt(v) under 1/2 + kLevelSlack).  f's bits are then 0x4B000000 + c0, so
// c0 is already the lane's low byte, and h = f - (2^23 - 1/2) = c0 + 1/2 exactly, whose square is the
// threshold.  v = 0 and subnormal v: 0 * inf is NaN and v * inf inf; vmaxps returns its second operand
// for a NaN, 2^23, and inf's bits 0x7F800000 have low byte 0; h * h is then inf or 1/4, above v.  A max, a
// subtraction and a multiplication replace c0's floor, its conversion and the threshold's add and
// multiply-add: on Zen 4 the AVX2 8-bit loop went from 6.1 to 5.6 cycles per element in a one-core
// harness (the op timed from Python, per-call cost excluded: 2% less).  exp_avg_sq keeps the sequence
// above: its code 1 for a positive u needs c as an integer.
template <bool kSq>
C10_ALWAYS_INLINE __m256i level_ints8(__m256 x, __m256 s) {
  const __m256 mag = kSq ? x : _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 v = _mm256_mul_ps(mag, s);
  if constexpr (kSq) {
    const __m256 c0 = _mm256_floor_ps(_mm256_fmadd_ps(v, _mm256_rsqrt_ps(v), _mm256_set1_ps(0.5f - kLevelSlack)));
    const __m256 up =
        _mm256_cmp_ps(v, _mm256_fmadd_ps(c0, c0, _mm256_add_ps(c0, _mm256_set1_ps(0.25f))), _CMP_GE_OQ);
    const __m256i c = _mm256_sub_epi32(_mm256_cvttps_epi32(c0), _mm256_castps_si256(up));
    return _mm256_max_epi32(c, _mm256_min_epu32(_mm256_castps_si256(x), _mm256_set1_epi32(1)));
  } else {
    const __m256 f = _mm256_max_ps(_mm256_fmadd_ps(v, _mm256_rsqrt_ps(v), _mm256_set1_ps(8388607.5f)),
                                   _mm256_set1_ps(8388608.0f));
    const __m256 h = _mm256_sub_ps(f, _mm256_set1_ps(8388607.5f));
    const __m256 up = _mm256_cmp_ps(v, _mm256_mul_ps(h, h), _CMP_GE_OQ);
    return _mm256_sign_epi32(_mm256_sub_epi32(_mm256_castps_si256(f), _mm256_castps_si256(up)),
                             _mm256_castps_si256(x));
  }
}
// The low byte of each of 16 int32 lanes, in order.
C10_ALWAYS_INLINE __m128i low_bytes16(__m256i a, __m256i b) {
  const __m256i pick_a = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i pick_b = _mm256_setr_epi8(-1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                          -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i ab = _mm256_or_si256(_mm256_shuffle_epi8(a, pick_a), _mm256_shuffle_epi8(b, pick_b));
  // dwords: a0-3 b0-3 . . | a4-7 b4-7 . .
  return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(ab, _mm256_setr_epi32(0, 4, 1, 5, 2, 3, 6, 7)));
}
// Reads whole 16-value groups of the block buffer (kQBlock floats: lanes past len hold stale values whose
// codes are not written).
template <bool kSq, typename Q>
C10_ALWAYS_INLINE void quantize_finite(const float* x, int64_t len, float s, Q* q) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 2 * kW <= len; j += 2 * kW) {
    const __m128i b = low_bytes16(level_ints8<kSq>(_mm256_loadu_ps(x + j), vs),
                                  level_ints8<kSq>(_mm256_loadu_ps(x + j + kW), vs));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), b);
  }
  if (j < len) {
    alignas(16) Q tmp[2 * kW];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), low_bytes16(level_ints8<kSq>(_mm256_loadu_ps(x + j), vs),
                                                                 level_ints8<kSq>(_mm256_loadu_ps(x + j + kW), vs)));
    std::memcpy(q + j, tmp, len - j);
  }
}
inline void quantize_signed_run(const float* x, int64_t len, float s, int8_t* q, bool finite) {
  finite ? quantize_finite<false>(x, len, s, q) : quantize_signed_clamped(x, len, s, q);
}
inline void quantize_sq_run(const float* u, int64_t len, float s, uint8_t* q, bool finite) {
  finite ? quantize_finite<true>(u, len, s, q) : quantize_sq_clamped(u, len, s, q);
}
#else
inline void quantize_signed_run(const float* x, int64_t len, float s, int8_t* q, bool /*finite*/) {
  quantize_signed_clamped(x, len, s, q);
}
inline void quantize_sq_run(const float* u, int64_t len, float s, uint8_t* q, bool /*finite*/) {
  quantize_sq_clamped(u, len, s, q);
}
#endif
#endif
