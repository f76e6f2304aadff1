// The Adan update for one element (or one SIMD vector of elements), written
// once and shared by the CPU kernel (T = float and at::vec::Vectorized<float>)
// and the CUDA kernel (T = float).  Math is fp32 whatever the storage dtype.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace adan_plugin {

// Scalars shared by every element of one kernel call.  They are derived from
// the step count, which may only be known on the device (capturable mode), so
// the derivation is itself host/device code.
struct AdanCoeffs {
  float beta1, beta2, beta3;
  float w1, w2, w3;       // 1 - beta_i, rounded once as torch's lerp_/addcmul_ see them
  float step_size;        // lr / (1 - beta1^k)
  float step_size_diff;   // lr * beta2 / (1 - beta2^k)
  float inv_bc3_sqrt;     // 1 / sqrt(1 - beta3^k)
  float eps;
  float decay_mul;        // 1 - lr*wd when no_prox, else 1 (exact no-op)
  float inv_decay_div;    // 1 / (1 + lr*wd) for the proximal step, else 1 (exact no-op)
  float grad_mul;         // clip coefficient / AMP grad scale (1 when neither)
};

struct AdanHyper {
  double lr, beta1, beta2, beta3, eps, weight_decay;
  bool no_prox;
};

// Bias corrections in double, as the unfused paths compute them in Python.
C10_HOST_DEVICE inline AdanCoeffs adan_coeffs(const AdanHyper& h, double step, float grad_mul) {
  AdanCoeffs c;
  c.beta1 = static_cast<float>(h.beta1);
  c.beta2 = static_cast<float>(h.beta2);
  c.beta3 = static_cast<float>(h.beta3);
  c.w1 = static_cast<float>(1.0 - h.beta1);
  c.w2 = static_cast<float>(1.0 - h.beta2);
  c.w3 = static_cast<float>(1.0 - h.beta3);
  const double bc1 = 1.0 - ::pow(h.beta1, step);
  const double bc2 = 1.0 - ::pow(h.beta2, step);
  c.step_size = static_cast<float>(h.lr / bc1);
  c.step_size_diff = static_cast<float>(h.lr * h.beta2 / bc2);
  c.inv_bc3_sqrt = static_cast<float>(1.0 / ::sqrt(1.0 - ::pow(h.beta3, step)));
  c.eps = static_cast<float>(h.eps);
  const bool decay = h.weight_decay != 0.0;
  c.decay_mul = (decay && h.no_prox) ? static_cast<float>(1.0 - h.lr * h.weight_decay) : 1.0f;
  c.inv_decay_div = (decay && !h.no_prox) ? static_cast<float>(1.0 / (1.0 + h.lr * h.weight_decay)) : 1.0f;
  c.grad_mul = grad_mul;
  return c;
}

C10_HOST_DEVICE C10_ALWAYS_INLINE float adan_sqrt(float x) { return ::sqrtf(x); }

// torch.lerp's formula (the unfused paths use lerp_), so both agree closely.  kLow: the caller has
// checked that weight < 0.5 (the CPU loops check both weights once per call: per vector, the test and
// the second formula's broadcasts cost a tenth of the fp32-state loop's instructions).
template <bool kLow = false, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T adan_lerp(const T& start, const T& end, float weight) {
  if (kLow || weight < 0.5f) return start + T(weight) * (end - start);
  return end - (end - start) * T(1.0f - weight);
}

// Whether both momentum weights take lerp's first formula (the default betas do).
C10_HOST_DEVICE C10_ALWAYS_INLINE bool adan_low_weights(const AdanCoeffs& c) { return c.w1 < 0.5f && c.w2 < 0.5f; }

// One Adan step.  `neg` holds -g_prev on entry and -g on exit; `first` makes
// the gradient difference zero (a parameter's first step, Algorithm 1).
// The raw gradient is only read.  On a CPU core the step is bound by the
// divider, not by memory, so the two momentum terms share one division and
// the bias correction and proximal decay are multiplications by reciprocals
// computed once per call in double.  Returns sqrt(n) of the new n, which the
// 8-bit exp_avg_sq quantizer needs too (its code stands for sqrt(n)): the CPU
// loop keeps it instead of taking the same square root again.
template <bool kLowWeights = false, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T adan_update(T& p, const T& g_raw, T& m, T& n, T& d, T& neg,
                                                   const AdanCoeffs& c, bool first) {
  const T g = g_raw * T(c.grad_mul);
  const T diff = first ? T(0.0f) : g + neg;
  m = adan_lerp<kLowWeights>(m, g, c.w1);
  d = adan_lerp<kLowWeights>(d, diff, c.w2);
  const T u = diff * T(c.beta2) + g;
  n = n * T(c.beta3) + T(c.w3) * (u * u);
  const T sqrt_n = adan_sqrt(n);
  const T denom = sqrt_n * T(c.inv_bc3_sqrt) + T(c.eps);
  p = p * T(c.decay_mul);
  p = p - (T(c.step_size) * m + T(c.step_size_diff) * d) / denom;
  p = p * T(c.inv_decay_div);
  neg = T(0.0f) - g;
  return sqrt_n;
}

}  // namespace adan_plugin
