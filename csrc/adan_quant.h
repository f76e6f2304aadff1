// 8-bit block-wise optimizer states (state_dtype="8bit"): the maps between an
// fp32 value and its one-byte code, written once as host/device code for the
// CPU kernel and the CUDA block code.
//
// A state tensor is cut, in memory order, into blocks of kQBlock elements;
// each block stores one fp32 scale A (the largest magnitude in the block) and
// one code per element.  Both maps are "square" maps: a code c stands for
// A * (c / cmax)^2, so the codes are spread evenly over the square root of the
// magnitude, which keeps small values that a linear map would round to zero
// (relative spacing 2/c instead of 1/c of a linear map of the value itself,
// and a smallest nonzero level of A/cmax^2 instead of A/cmax).
//
//   exp_avg, exp_avg_diff, neg_pre_grad: int8 code c in [-127, 127],
//       value = sign(c) * c^2 * (A / 127^2),            A = max |x| of the block
//   exp_avg_sq: uint8 code c in [0, 255] for its square root u = sqrt(n),
//       u = c^2 * (A / 255^2),  n = u * u,               A = max sqrt(n) of the block
//
// Quantizing rounds to the nearest level in the square-root domain, ties up, exactly:
//   s = cmax^2 / A (0 when A < 1e-30),  v = min(|x| * s, cmax^2) in fp32 (NaN: cmax^2),
//   c = the integer with (c - 1/2)^2 <= v < (c + 1/2)^2   (= round(sqrt(v)) in exact arithmetic)
// and exp_avg_sq never stores 0 for a positive n (code 1 at least): a zero
// denominator for a nonzero momentum would turn the update into m / eps.
// (Defined by thresholds rather than by fp32 sqrt-and-round, so that every
// implementation can reach the same code its own way, from whatever estimate
// of sqrt(v) is cheap where it runs; see quant_level.)
// Absolute error of one rounding: |x - q(x)| <= A * (2 * sqrt(|x|/A) * cmax + 0.5) / (2 * cmax^2)
// <= A * (1/cmax + 1/(4 cmax^2)); tests/test_lowmem.py derives its tolerances from this bound.
// The maps' operations are ordered so that no multiply-add that decides a code
// can be contracted into an FMA differently by one build and another (portable,
// AVX2, AVX-512, nvcc): every build computes the same codes.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace adan_plugin {
namespace quant {

constexpr int kQBlock = 256;       // elements per scale
constexpr int kSignedMax = 127;    // int8 codes of exp_avg, exp_avg_diff, neg_pre_grad
constexpr int kUnsignedMax = 255;  // uint8 codes of sqrt(exp_avg_sq)
constexpr int64_t kMinNumel = 4096;  // smaller tensors keep fp32 states (decided in Python)

// Blocks whose largest magnitude is below this store only zero codes (cmax^2 / A would
// overflow for subnormal A, and 0 * inf is NaN).
constexpr float kMinAbsmax = 1e-30f;

// A block maximum's running step: the larger of acc and v, NaN from the first NaN on (a NaN state keeps
// its block's scale NaN, as the spec's max does); the result does not depend on the order of the values.
C10_HOST_DEVICE C10_ALWAYS_INLINE float max_nan(float acc, float v) { return (v > acc || v != v) ? v : acc; }

// s = cmax^2 / A: the factor inside the square root of the quantizer.
C10_HOST_DEVICE C10_ALWAYS_INLINE float quant_factor(float absmax, int cmax) {
  return absmax >= kMinAbsmax ? static_cast<float>(cmax * cmax) / absmax : 0.0f;
}

// A / cmax^2: what c^2 is multiplied by to dequantize.
C10_HOST_DEVICE C10_ALWAYS_INLINE float dequant_factor(float absmax, int cmax) {
  return absmax / static_cast<float>(cmax * cmax);
}

// The level of v (the c with (c - 1/2)^2 <= v < (c + 1/2)^2) is settled with one comparison from any
// estimate e of sqrt(v) with |e - sqrt(v)| < kLevelSlack: y = e + 1/2 - kLevelSlack lies in
// (sqrt(v) + 1/2 - 2 kLevelSlack, sqrt(v) + 1/2), with a margin of at least 0.03 at the upper end for
// the worst estimate used (far above y's fp32 rounding, 2^-16 below 256, and whatever FMA contraction
// does to e + constant), so c0 = floor(y) is c or c - 1, and c0 >= 0; then c = c0 + [v >= (c0 + 1/2)^2],
// the threshold c0^2 + (c0 + 1/4) exact in fp32 (c0 <= 255), FMA or not.  The CPU vector builds
// (adan_cpu_codes.h) estimate with their rsqrt instructions; the scalar code below with level_rsqrt.
constexpr float kLevelSlack = 0.125f;  // > the estimates' worst error, 255 * 1.5 * 2^-12 = 0.094 (AVX2 rsqrt)

// 1 / sqrt(v) for a normal v: on a GPU the hardware's approximate reciprocal square root (CUDA's rsqrtf,
// 2 ulp: an error below 1e-4 in e = v * rsqrt(v) <= 255, instead of an IEEE square root's
// correction sequence), on the host the IEEE one.
C10_HOST_DEVICE C10_ALWAYS_INLINE float level_rsqrt(float v) {
#ifdef __CUDA_ARCH__
  return ::rsqrtf(v);
#else
  return 1.0f / ::sqrtf(v);
#endif
}

// The level of magnitude * s: v = min(magnitude * s, cmax^2) (NaN: cmax^2), settled as above.  The
// rsqrt of a floor of v: 0 would give inf, and 0 * inf is NaN.
C10_HOST_DEVICE C10_ALWAYS_INLINE int quant_level(float magnitude, float s, int cmax) {
  const float top = static_cast<float>(cmax * cmax);
  const float prod = magnitude * s;
  const float v = prod < top ? prod : top;
  const float c0 = ::floorf(v * level_rsqrt(v > 1e-30f ? v : 1e-30f) + (0.5f - kLevelSlack));
  return static_cast<int>(v >= c0 * c0 + (c0 + 0.25f) ? c0 + 1.0f : c0);
}

C10_HOST_DEVICE C10_ALWAYS_INLINE int8_t quantize_signed(float x, float s) {
  const int c = quant_level(::fabsf(x), s, kSignedMax);
  return static_cast<int8_t>(x < 0.0f ? -c : c);
}

C10_HOST_DEVICE C10_ALWAYS_INLINE float dequantize_signed(int8_t code, float k) {
  const int c = code;
  return static_cast<float>(c < 0 ? -(c * c) : c * c) * k;
}

// u = sqrt(n) for n >= 0 (what the code stands for), as the update computed it.
C10_HOST_DEVICE C10_ALWAYS_INLINE uint8_t quantize_sq_root(float u, float s) {
  const int c = quant_level(u, s, kUnsignedMax);
  return static_cast<uint8_t>(c == 0 && u > 0.0f ? 1 : c);  // u > 0 exactly when n > 0
}

C10_HOST_DEVICE C10_ALWAYS_INLINE float dequantize_sq(uint8_t code, float k) {
  const int c = code;
  const float u = static_cast<float>(c * c) * k;
  return u * u;
}

// Kahan-compensated 16-bit parameter (kahan_sum=True): the parameter's true
// value is p + comp; after the fp32 update the 16-bit parameter takes the
// rounded value and comp what the rounding lost (exact in fp32, then rounded
// to comp's 16 bits).
template <typename P>
C10_HOST_DEVICE C10_ALWAYS_INLINE void kahan_store(float x, P& p, P& comp) {
  p = static_cast<P>(x);
  comp = static_cast<P>(x - static_cast<float>(p));
}

}  // namespace quant
}  // namespace adan_plugin
