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
  alignas(16) Q tmp[2 * kW] = {};
  const Q* src = q;
  if (cnt < 2 * kW) {
    std::memcpy(tmp, q, cnt);
    src = tmp;
  }
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  a = codes_to_float<Q>(v);
  b = codes_to_float<Q>(_mm_srli_si128(v, 8));
}
// store_codes: c holds integer-valued floats in [-255, 255], written as codes.  min_or_top(v, top):
// min(v, top), and top where v is NaN.  sqrt_estimate(v): sqrt(v) to within one level (v >= 0, 0 for 0);
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
C10_ALWAYS_INLINE fVec sqrt_estimate(const fVec& v) {  // relative error <= 1.5 * 2^-12
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
// spec's max does).  AVX-512: vmaxps(|x|, acc) keeps acc when |x| is NaN, and a NaN is caught
// instead by x * 0 + flag, which is NaN for a NaN or infinite x: the rare block where that
// happens is rescanned exactly from the buffer.
struct BlockMax {
  fVec acc = fVec(0.0f);
#if defined(CPU_CAPABILITY_AVX512)
  fVec flag = fVec(0.0f);
  C10_ALWAYS_INLINE void add(const fVec& x) {
    acc = _mm512_max_ps(_mm512_abs_ps(x), acc);
    flag = _mm512_fmadd_ps(x, _mm512_setzero_ps(), flag);
  }
  float get(const float* buf, int64_t len) const {
    if (std::isnan(_mm512_reduce_add_ps(flag))) {
      float out = 0.0f;
      for (int64_t j = 0; j < len; ++j) {
        const float a = std::fabs(buf[j]);
        out = (a > out || std::isnan(a)) ? a : out;
        if (std::isnan(out)) break;
      }
      return out;
    }
    return _mm512_reduce_max_ps(acc);
  }
#else
  C10_ALWAYS_INLINE void add(const fVec& x) { acc = at::vec::maximum(acc, x.abs()); }
  float get(const float*, int64_t) const {
    float lanes[kW];
    acc.store(lanes);
    float out = 0.0f;
    for (int64_t j = 0; j < kW; ++j) out = (lanes[j] > out || std::isnan(lanes[j])) ? lanes[j] : out;
    return out;
  }
#endif
};

// A block's codes from its new values x[0, len) (in the stack buffer) and the factor s = cmax^2 / A.
#if defined(CPU_CAPABILITY_AVX512)
// The steps of quant_levels (below, for the other builds) on mask registers (ATen's Vectorized
// comparisons and blends expand masks into vectors and back); 16 values per iteration, the last masked.
template <bool kSq>
C10_ALWAYS_INLINE __m512i level_codes16(__m512 x, __m512 s) {
  constexpr int cmax = kSq ? quant::kUnsignedMax : quant::kSignedMax;
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  const __m512 mag = kSq ? _mm512_sqrt_ps(x) : _mm512_abs_ps(x);
  const __m512 v = _mm512_min_ps(_mm512_mul_ps(mag, s), _mm512_set1_ps(static_cast<float>(cmax * cmax)));
  // rsqrt14 of a floor, not of v: 0 or a subnormal v would give inf (then c is 0 or -1, settled below).
  const __m512 r = _mm512_rsqrt14_ps(_mm512_max_ps(v, _mm512_set1_ps(1e-30f)));
  __m512 c = _mm512_roundscale_ps(_mm512_fmadd_ps(v, r, half), _MM_FROUND_TO_NEG_INF);
  const __m512 t = _mm512_sub_ps(c, half);
  const __m512 lo = _mm512_mul_ps(t, t);
  const __m512 hi = _mm512_add_ps(lo, _mm512_add_ps(c, c));
  c = _mm512_mask_sub_ps(c, _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ), c, one);
  c = _mm512_mask_add_ps(c, _mm512_cmp_ps_mask(v, hi, _CMP_GE_OQ), c, one);
  __m512i ci = _mm512_cvttps_epi32(_mm512_max_ps(c, _mm512_setzero_ps()));
  if constexpr (kSq) {  // a positive n gets code 1 at least
    ci = _mm512_max_epi32(ci, _mm512_maskz_set1_epi32(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), 1));
  } else {  // x's sign (a NaN: +cmax)
    ci = _mm512_mask_sub_epi32(ci, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_si512(), ci);
  }
  return ci;
}
template <bool kSq, typename Q>
C10_ALWAYS_INLINE void quantize_run(const float* x, int64_t len, float s, Q* q) {
  const __m512 vs = _mm512_set1_ps(s);
  int64_t j = 0;
  for (; j + kW <= len; j += kW) {
    const __m128i codes = _mm512_cvtepi32_epi8(level_codes16<kSq>(_mm512_loadu_ps(x + j), vs));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), codes);
  }
  if (j < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - j)) - 1);
    _mm_mask_storeu_epi8(q + j, m, _mm512_cvtepi32_epi8(level_codes16<kSq>(_mm512_maskz_loadu_ps(m, x + j), vs)));
  }
}
inline void quantize_signed_run(const float* x, int64_t len, float s, int8_t* q) { quantize_run<false>(x, len, s, q); }
inline void quantize_sq_run(const float* n, int64_t len, float s, uint8_t* q) { quantize_run<true>(n, len, s, q); }
#else
// quant::quant_level on a vector, without a square root on the divider: v = min(m * s, cmax^2) (NaN:
// cmax^2), c0 = floor(sqrt_estimate(v) + 0.5) is the exact level or one off, and the level's
// thresholds (c - 1/2)^2 and (c + 1/2)^2 (exact in fp32) settle it.  Returns the level as a float.
C10_ALWAYS_INLINE fVec quant_levels(const fVec& magnitude, const fVec& s, const fVec& cmax_sq) {
  const fVec half(0.5f), one(1.0f), zero(0.0f);
  const fVec v = min_or_top(magnitude * s, cmax_sq);
  fVec c = (sqrt_estimate(v) + half).floor();
  const fVec lo = (c - half) * (c - half);
  const fVec hi = lo + c + c;
  c = c - ((v < lo) & one) + ((v >= hi) & one);
  return at::vec::maximum(c, zero);  // c0 = 0 with v < 1/4 stays 0
}

inline void quantize_signed_run(const float* x, int64_t len, float s, int8_t* q) {
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
inline void quantize_sq_run(const float* n, int64_t len, float s, uint8_t* q) {
  const fVec vs(s), top(static_cast<float>(quant::kUnsignedMax * quant::kUnsignedMax)), zero(0.0f), one(1.0f);
  for (int64_t j = 0; j < len; j += 2 * kW) {
    const int64_t cnt = std::min<int64_t>(2 * kW, len - j);
    fVec x0, x1;
    Io<float>::load(n + j, cnt, x0, x1);
    // The level of sqrt(n); a positive n gets code 1 at least.
    fVec c0 = quant_levels(x0.sqrt(), vs, top), c1 = quant_levels(x1.sqrt(), vs, top);
    c0 = at::vec::maximum(c0, (x0 > zero) & one), c1 = at::vec::maximum(c1, (x1 > zero) & one);
    store_codes(q + j, cnt, c0, c1);
  }
}
#endif

// 8-bit states, per quantization block: the update runs on the dequantized codes (straight from
// memory, in registers), keeps each state's new block maximum on the way, and parks the new values in
// a 4 KiB stack buffer; then the block is requantized from the buffer with the new scales.
// [begin, end) starts on a block.
template <typename P, bool kFirst>
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
    for (int64_t j = 0; j < len; j += 2 * kW) {
      const int64_t cnt = std::min<int64_t>(2 * kW, len - j);
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
      adan_update(p0, g0, m0, n0, d0, e0, c, kFirst);
      adan_update(p1, g1, m1, n1, d1, e1, c, kFirst);
      ParamIo<P>::store(p + i, comp ? comp + i : nullptr, cnt, p0, p1);
      if (cnt < 2 * kW) {  // lanes past the tensor's end must not count in the maxima
        const fVec zero(0.0f);
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
    }
    const float absmax[4] = {am.get(buf[0], len), q_sqrt(an.get(buf[1], len)),  // max sqrt(n) = sqrt(max n)
                             ad.get(buf[2], len), ae.get(buf[3], len)};
    quantize_signed_run(buf[0], len, quant_factor(absmax[0], kSignedMax), qm + b0);
    quantize_sq_run(buf[1], len, quant_factor(absmax[1], kUnsignedMax), qn + b0);
    quantize_signed_run(buf[2], len, quant_factor(absmax[2], kSignedMax), qd + b0);
    quantize_signed_run(buf[3], len, quant_factor(absmax[3], kSignedMax), qe + b0);
    for (int k = 0; k < 4; ++k) t.scale[k][blk] = absmax[k];
  }
}

template <typename P>
void update_range_q8(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c) {
  if (t.first) {
    update_range_q8_t<P, true>(t, begin, end, c);
  } else {
    update_range_q8_t<P, false>(t, begin, end, c);
  }
}
