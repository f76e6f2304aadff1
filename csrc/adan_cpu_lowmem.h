// The low-memory parts of the CPU inner loop: Kahan-compensated 16-bit
// parameters (kahan_sum) and 8-bit block-quantized states (state_dtype="8bit").
// Included by adan_cpu_kernel.h inside its per-ISA namespace, after Io (it
// includes this file's headers, adan_quant.h among them, outside the namespace).
#pragma once

// Loads a parameter as fp32, adding its Kahan compensation when it has one;
// stores it rounded and keeps what the rounding lost in the compensation.
// Only Io's interface is used, so the conversions stay those of Io.
template <typename P>
struct ParamIo {
  static C10_ALWAYS_INLINE void load(const P* p, const P* comp, int64_t cnt, fVec& a, fVec& b) {
    Io<P>::load(p, cnt, a, b);
    if constexpr (!std::is_same_v<P, float>) {
      if (comp != nullptr) {
        fVec ca, cb;
        Io<P>::load(comp, cnt, ca, cb);
        a = a + ca;
        b = b + cb;
      }
    }
  }
  static C10_ALWAYS_INLINE void store(P* p, P* comp, int64_t cnt, const fVec& a, const fVec& b) {
    Io<P>::store(p, cnt, a, b);
    if constexpr (!std::is_same_v<P, float>) {
      if (comp != nullptr) {
        fVec ra, rb;  // the stored (rounded) values; x - round(x) is exact in fp32
        Io<P>::load(p, cnt, ra, rb);
        Io<P>::store(comp, cnt, a - ra, b - rb);
      }
    }
  }
};

// ---------------------------------------------------------------- 8-bit states
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

// Hides a value from the optimizer so that it cannot contract the multiply that produced it into a
// later add (GCC contracts across statements): the dequantized states then enter the update exactly
// as the other builds and the CUDA code (which dequantize in their own statements) see them.
C10_ALWAYS_INLINE void opaque(fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 x = v;
  asm("" : "+v"(x));
  v = x;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 x = v;
  asm("" : "+x"(x));
  v = x;
#else
  (void)v;
#endif
}

// A block's largest |x|, NaN if any x is NaN (a NaN state keeps its block's scale NaN, as the
// spec's max does).  AVX-512: vrangeps (max of magnitudes, sign cleared: one instruction for abs and
// max) keeps an Inf but skips a NaN operand, so the update loop says instead whether a NaN can be in
// the block (BlockFlag below); such a block is rescanned exactly from the buffer and quantized with
// the clamped sequence, every other block with the shorter one for finite values.
// The exact maximum of buf[0, len), for blocks that BlockFlag cannot clear of NaN.
inline float exact_max(const float* buf, int64_t len) {
  float out = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    out = quant::max_nan(out, std::fabs(buf[j]));
    if (std::isnan(out)) break;
  }
  return out;
}

struct BlockMax {
  fVec acc = fVec(0.0f);
#if defined(CPU_CAPABILITY_AVX512)
  C10_ALWAYS_INLINE void add(const fVec& x) {
    acc = _mm512_range_ps(acc, x, 0x0B);  // imm[1:0] = 11: larger magnitude; imm[3:2] = 10: sign +
  }
  float get(const float* buf, int64_t len, bool finite) const {
    return finite ? _mm512_reduce_max_ps(acc) : exact_max(buf, len);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // vmaxps returns its second operand when either is NaN: with |x| first, a NaN is skipped as vrangeps
  // skips it, and an Inf kept.
  C10_ALWAYS_INLINE void add(const fVec& x) {
    acc = _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), acc);
  }
  float get(const float* buf, int64_t len, bool finite) const {
    if (!finite) return exact_max(buf, len);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
#else
  C10_ALWAYS_INLINE void add(const fVec& x) { acc = at::vec::maximum(acc, x.abs()); }
  float get(const float*, int64_t, bool) const {
    float lanes[kW];
    acc.store(lanes);
    float out = 0.0f;
    for (int64_t j = 0; j < kW; ++j) out = quant::max_nan(out, lanes[j]);
    return out;
  }
#endif
};

// Whether a block's new states can hold a NaN, from one sum over its new parameter values (fp32,
// before rounding to the parameter's dtype) instead of one per state: a NaN in any new state
// reaches the parameter, because IEEE NaN survives every operation of the update (adan_math.h:
// m, d and sqrt(n) enter p's update; -g and the gradient difference enter m, d and n; an old
// state's NaN or Inf scale dequantizes to NaN or Inf values that do the same), multiplications by
// zero included.  An Inf state need not reach p (sqrt(n) = Inf makes the update 0) but is kept by
// vrangeps, so the block's scale shows it.  A block is quantized with the finite sequence when the
// sum and the four scales are finite (a sum past fp32's range is a false alarm that costs only time;
// so is 0 / 0 in the lanes past a tensor's end, which hold zero states and gradients, when eps = 0).
// The other builds always take their one, clamped, sequence.
struct BlockFlag {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  fVec sum = fVec(0.0f);
  C10_ALWAYS_INLINE void add(const fVec& p) { sum = sum + p; }
#if defined(CPU_CAPABILITY_AVX512)
  bool finite() const { return std::isfinite(_mm512_reduce_add_ps(sum)); }
#else
  bool finite() const {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    return std::isfinite(_mm_cvtss_f32(_mm_hadd_ps(_mm_hadd_ps(h, h), h)));
  }
#endif
#else
  C10_ALWAYS_INLINE void add(const fVec&) {}
  bool finite() const { return false; }
#endif
};

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
template <bool kSq>
C10_ALWAYS_INLINE __m256i level_ints8(__m256 x, __m256 s) {
  const __m256 mag = kSq ? x : _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 v = _mm256_mul_ps(mag, s);
  const __m256 c0 = _mm256_floor_ps(_mm256_fmadd_ps(v, _mm256_rsqrt_ps(v), _mm256_set1_ps(0.5f - kLevelSlack)));
  const __m256 up =
      _mm256_cmp_ps(v, _mm256_fmadd_ps(c0, c0, _mm256_add_ps(c0, _mm256_set1_ps(0.25f))), _CMP_GE_OQ);
  const __m256i c = _mm256_sub_epi32(_mm256_cvttps_epi32(c0), _mm256_castps_si256(up));
  if constexpr (kSq) {
    return _mm256_max_epi32(c, _mm256_min_epu32(_mm256_castps_si256(x), _mm256_set1_epi32(1)));
  } else {
    return _mm256_sign_epi32(c, _mm256_castps_si256(x));
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

// 8-bit states, per quantization block: the update runs on the dequantized codes (straight from
// memory, in registers), keeps each state's new block maximum on the way, and parks the new values in
// a 4 KiB stack buffer (exp_avg_sq as the sqrt(n) the update computed: what its code stands for);
// then the block is requantized from the buffer with the new scales.  (Writing a block's codes
// while the next block updates, to overlap the quantizers with the update's divider, measured no
// faster on Zen 4: the step is bound by its vector instructions, not by the divider's latency.)
// [begin, end) starts on a block.
template <typename P, bool kFirst, bool kLow>
void update_range_q8_t(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& coeffs) {
  using namespace quant;
  const AdanCoeffs c = coeffs;
  P* p = static_cast<P*>(t.p);
  const P* g = static_cast<const P*>(t.g);
  P* comp = static_cast<P*>(t.comp);
  int8_t* qm = static_cast<int8_t*>(t.m);
  uint8_t* qn = static_cast<uint8_t*>(t.n);
  int8_t* qd = static_cast<int8_t*>(t.d);
  int8_t* qe = static_cast<int8_t*>(t.neg);
  alignas(64) float buf[4][kQBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kQBlock) {
    const int64_t len = std::min<int64_t>(kQBlock, end - b0);
    const int64_t blk = b0 / kQBlock;
    const fVec km(dequant_factor(t.scale[0][blk], kSignedMax)), kn(dequant_factor(t.scale[1][blk], kUnsignedMax)),
        kd(dequant_factor(t.scale[2][blk], kSignedMax)), ke(dequant_factor(t.scale[3][blk], kSignedMax));
    BlockMax am, an, ad, ae;
    BlockFlag flag;
    // One group of 2*kW values (cnt < 2*kW only at a tensor's end): whole groups get cnt as a constant,
    // which folds every tail test away.
    const auto group = [&](int64_t j, auto cnt) __attribute__((always_inline)) {
      const int64_t i = b0 + j;
      fVec p0, p1, g0, g1, m0, m1, n0, n1, d0, d1, e0, e1;
      ParamIo<P>::load(p + i, comp ? comp + i : nullptr, cnt, p0, p1);
      Io<P>::load(g + i, cnt, g0, g1);
      // Dequantizing as adan_quant.h: (c * |c|) * k, and for exp_avg_sq u = (c * c) * k, n = u * u.
      load_codes(qm + i, cnt, m0, m1);
      m0 = (m0 * m0.abs()) * km, m1 = (m1 * m1.abs()) * km;
      load_codes(qn + i, cnt, n0, n1);
      n0 = (n0 * n0) * kn, n1 = (n1 * n1) * kn;
      n0 = n0 * n0, n1 = n1 * n1;
      load_codes(qd + i, cnt, d0, d1);
      d0 = (d0 * d0.abs()) * kd, d1 = (d1 * d1.abs()) * kd;
      if constexpr (!kFirst) {
        load_codes(qe + i, cnt, e0, e1);
        e0 = (e0 * e0.abs()) * ke, e1 = (e1 * e1.abs()) * ke;
      }
      opaque(m0), opaque(m1), opaque(n0), opaque(n1), opaque(d0), opaque(d1);
      if constexpr (!kFirst) opaque(e0), opaque(e1);
      n0 = adan_update<kLow>(p0, g0, m0, n0, d0, e0, c, kFirst);  // n0, n1 now hold sqrt(n)
      n1 = adan_update<kLow>(p1, g1, m1, n1, d1, e1, c, kFirst);
      ParamIo<P>::store(p + i, comp ? comp + i : nullptr, cnt, p0, p1);
      if (cnt < 2 * kW) {  // lanes past the tensor's end must not count in the maxima
        float* dst[4] = {buf[0] + j, buf[1] + j, buf[2] + j, buf[3] + j};
        Io<float>::store(dst[0], cnt, m0, m1), Io<float>::store(dst[1], cnt, n0, n1);
        Io<float>::store(dst[2], cnt, d0, d1), Io<float>::store(dst[3], cnt, e0, e1);
        Io<float>::load(dst[0], cnt, m0, m1), Io<float>::load(dst[1], cnt, n0, n1);
        Io<float>::load(dst[2], cnt, d0, d1), Io<float>::load(dst[3], cnt, e0, e1);
      } else {
        Io<float>::store(buf[0] + j, cnt, m0, m1), Io<float>::store(buf[1] + j, cnt, n0, n1);
        Io<float>::store(buf[2] + j, cnt, d0, d1), Io<float>::store(buf[3] + j, cnt, e0, e1);
      }
      am.add(m0), am.add(m1), an.add(n0), an.add(n1), ad.add(d0), ad.add(d1), ae.add(e0), ae.add(e1);
      flag.add(p0), flag.add(p1);
    };
    int64_t j = 0;
    for (; j + 2 * kW <= len; j += 2 * kW) group(j, std::integral_constant<int64_t, 2 * kW>());
    if (j < len) group(j, len - j);
    bool finite = flag.finite();
    float absmax[4] = {am.get(buf[0], len, finite), an.get(buf[1], len, finite), ad.get(buf[2], len, finite),
                       ae.get(buf[3], len, finite)};
    if (finite && !(std::isfinite(absmax[0]) && std::isfinite(absmax[1]) && std::isfinite(absmax[2]) &&
                    std::isfinite(absmax[3]))) {
      finite = false;  // an Inf state (the maxima are exact: vrangeps keeps an Inf)
    }
    quantize_signed_run(buf[0], len, quant_factor(absmax[0], kSignedMax), qm + b0, finite);
    quantize_sq_run(buf[1], len, quant_factor(absmax[1], kUnsignedMax), qn + b0, finite);
    quantize_signed_run(buf[2], len, quant_factor(absmax[2], kSignedMax), qd + b0, finite);
    quantize_signed_run(buf[3], len, quant_factor(absmax[3], kSignedMax), qe + b0, finite);
    for (int k = 0; k < 4; ++k) t.scale[k][blk] = absmax[k];
  }
}

template <typename P>
void update_range_q8(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c) {
  with_loop_flags(t.first, c, [&](auto first, auto low) {
    update_range_q8_t<P, decltype(first)::value, decltype(low)::value>(t, begin, end, c);
  });
}
