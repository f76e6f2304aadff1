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

// Largest |buf[j]| over [0, len) (NaN if any is NaN).
inline float block_absmax(const float* buf, int64_t len) {
  fVec acc(0.0f);
  for (int64_t j = 0; j < len; j += kW) {
    const fVec v = fVec::loadu(buf + j, std::min<int64_t>(kW, len - j));  // zero-filled tail
    acc = at::vec::maximum(acc, v.abs());
  }
  float lanes[kW];
  acc.store(lanes);
  float out = 0.0f;
  for (int64_t j = 0; j < kW; ++j) out = (lanes[j] > out || std::isnan(lanes[j])) ? lanes[j] : out;
  return out;
}

// The maps of adan_quant.h over a block, written so that the compiler vectorizes them: the float part
// on Vectorized<float> (sqrt), the integer conversions as plain loops over restrict pointers.
// quant_level's y = min(sqrt(|x| * s) + 0.5, cmax) lands in `level` (floats), then becomes the code.
inline void quant_levels(const float* x, float s, int cmax, int64_t len, float* level) {  // may be in place
  const fVec vs(s), half(0.5f), top(static_cast<float>(cmax));
  for (int64_t j = 0; j < len; j += kW) {
    const int64_t cnt = std::min<int64_t>(kW, len - j);
    const fVec y = (fVec::loadu(x + j, cnt).abs() * vs).sqrt() + half;
    fVec::blendv(top, y, y < top).store(level + j, cnt);  // NaN -> cmax, as quant_level
  }
}

inline void dequantize_signed_block(const int8_t* __restrict q, float k, int64_t len, float* __restrict out) {
  for (int64_t j = 0; j < len; ++j) {
    const int c = q[j];
    out[j] = static_cast<float>(c * (c < 0 ? -c : c)) * k;
  }
}

inline void dequantize_sq_block(const uint8_t* __restrict q, float k, int64_t len, float* __restrict out) {
  for (int64_t j = 0; j < len; ++j) {
    const int c = q[j];
    const float u = static_cast<float>(c * c) * k;
    out[j] = u * u;
  }
}

inline void quantize_signed_block(const float* __restrict x, float s, int64_t len, float* __restrict level,
                                  int8_t* __restrict q) {
  quant_levels(x, s, quant::kSignedMax, len, level);
  for (int64_t j = 0; j < len; ++j) {
    const int c = static_cast<int>(level[j]);
    q[j] = static_cast<int8_t>(x[j] < 0.0f ? -c : c);
  }
}

// x holds n (>= 0); the levels are those of sqrt(n).
inline void quantize_sq_block(const float* __restrict x, float s, int64_t len, float* __restrict level,
                              uint8_t* __restrict q) {
  for (int64_t j = 0; j < len; j += kW) {
    const int64_t cnt = std::min<int64_t>(kW, len - j);
    fVec::loadu(x + j, cnt).sqrt().store(level + j, cnt);
  }
  quant_levels(level, s, quant::kUnsignedMax, len, level);
  for (int64_t j = 0; j < len; ++j) {
    const int c = static_cast<int>(level[j]);
    q[j] = static_cast<uint8_t>(c == 0 && x[j] > 0.0f ? 1 : c);
  }
}

// 8-bit states: per quantization block, dequantize the four states into a
// stack buffer (5 KiB), run the vector update over it, then requantize with
// the block's new largest magnitudes.  [begin, end) starts on a block.
template <typename P>
void update_range_q8(const CpuTensor& t, int64_t begin, int64_t end, const AdanCoeffs& c) {
  using namespace quant;
  P* p = static_cast<P*>(t.p);
  const P* g = static_cast<const P*>(t.g);
  P* comp = static_cast<P*>(t.comp);
  int8_t* q[4] = {static_cast<int8_t*>(t.m), nullptr, static_cast<int8_t*>(t.d), static_cast<int8_t*>(t.neg)};
  uint8_t* qn = static_cast<uint8_t*>(t.n);
  alignas(64) float buf[4][kQBlock];
  alignas(64) float level[kQBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kQBlock) {
    const int64_t len = std::min<int64_t>(kQBlock, end - b0);
    const int64_t blk = b0 / kQBlock;
    for (int k : {0, 2, 3}) dequantize_signed_block(q[k] + b0, dequant_factor(t.scale[k][blk], kSignedMax), len, buf[k]);
    dequantize_sq_block(qn + b0, dequant_factor(t.scale[1][blk], kUnsignedMax), len, buf[1]);

    for (int64_t j = 0; j < len; j += 2 * kW) {
      const int64_t cnt = std::min<int64_t>(2 * kW, len - j);
      fVec p0, p1, g0, g1, m0, m1, n0, n1, d0, d1, e0, e1;
      ParamIo<P>::load(p + b0 + j, comp ? comp + b0 + j : nullptr, cnt, p0, p1);
      Io<P>::load(g + b0 + j, cnt, g0, g1);
      Io<float>::load(buf[0] + j, cnt, m0, m1);
      Io<float>::load(buf[1] + j, cnt, n0, n1);
      Io<float>::load(buf[2] + j, cnt, d0, d1);
      Io<float>::load(buf[3] + j, cnt, e0, e1);
      adan_update(p0, g0, m0, n0, d0, e0, c, t.first);
      adan_update(p1, g1, m1, n1, d1, e1, c, t.first);
      ParamIo<P>::store(p + b0 + j, comp ? comp + b0 + j : nullptr, cnt, p0, p1);
      Io<float>::store(buf[0] + j, cnt, m0, m1);
      Io<float>::store(buf[1] + j, cnt, n0, n1);
      Io<float>::store(buf[2] + j, cnt, d0, d1);
      Io<float>::store(buf[3] + j, cnt, e0, e1);
    }

    for (int k : {0, 2, 3}) {
      const float absmax = block_absmax(buf[k], len);
      quantize_signed_block(buf[k], quant_factor(absmax, kSignedMax), len, level, q[k] + b0);
      t.scale[k][blk] = absmax;
    }
    const float absmax_n = q_sqrt(block_absmax(buf[1], len));  // max sqrt(n) = sqrt(max n), n >= 0
    quantize_sq_block(buf[1], quant_factor(absmax_n, kUnsignedMax), len, level, qn + b0);
    t.scale[1][blk] = absmax_n;
  }
}
