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
#include "adan_cpu_codes.h"  // codes <-> fp32 vectors, the quantizers

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

// The exact maximum of |buf[0, len)|, NaN from the first NaN on: for blocks that BlockFlag cannot
// clear of NaN.
inline float exact_max(const float* buf, int64_t len) {
  float out = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    out = quant::max_nan(out, std::fabs(buf[j]));
    if (std::isnan(out)) break;
  }
  return out;
}

// A block's largest |x|, NaN if any x is NaN (a NaN state keeps its block's scale NaN, as the
// spec's max does).  The vector builds keep an Inf but skip a NaN (AVX-512: vrangeps, max of
// magnitudes in one instruction; AVX2: vmaxps), so the update loop says instead whether a NaN can be
// in the block (BlockFlag below); such a block is rescanned exactly (exact_max) and quantized with the
// clamped sequence, every other block with the shorter one for finite values.
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
// BlockMax, so the block's scale shows it.  A block is quantized with the finite sequence when the
// sum and the four scales are finite (a sum past fp32's range is a false alarm that costs only time;
// so is 0 / 0 in the lanes past a tensor's end, which hold zero states and gradients, when eps = 0).
// The portable build always takes its one, clamped, sequence.
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
      finite = false;  // an Inf state (the maxima are exact: BlockMax keeps an Inf)
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
