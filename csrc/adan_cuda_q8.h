// The CUDA block code's 8-bit states: one warp per quantization block (the layout and why: below,
// and csrc/README.md).  Host/device code, run on the GPU by adan_cuda.cu and on the CPU by the tests.
#pragma once

#include <cstdint>

#include "adan_cuda_batch.h"

namespace adan_plugin {
namespace cuda_block {

static_assert(kLaunchChunk % quant::kQBlock == 0, "a CUDA block's chunk holds whole quantization blocks");

// 8-bit states.  A block's scale needs all its new values, so one warp owns each quantization block:
// lane l updates elements 8l, ..., 8l + 7 of it, keeps the new values in registers, and the warp
// combines the lanes' maxima by shuffles before each lane quantizes its own elements.  One pass: every
// element is read, updated and written once.  A whole block of aligned tensors is read and written with
// one vector access per state and lane (8 codes: 8 bytes; 8 fp32 parameters: two 16-byte accesses),
// so a warp's access covers 256 consecutive codes; a tensor's last, partial block (or a tensor whose
// storage is not aligned) element by element.  On the host (adan_cuda_on_cpu.cpp, the tests) a call
// from lane 0 runs its warp's 32 lanes one after another with the same per-lane code and combines their
// maxima in a loop: quant::max_nan's result does not depend on the order, so the host writes what the
// GPU writes.
constexpr int kWarp = 32;
constexpr int kLaneElems = quant::kQBlock / kWarp;  // elements per lane and quantization block
static_assert(kThreads % kWarp == 0, "a CUDA block is whole warps");

// A lane's kLaneElems consecutive elements as one access: at most 16 bytes of alignment (two 16-byte
// accesses for fp32, one for 16-bit types, one 8-byte access for codes).
template <typename T>
struct alignas(sizeof(T) * kLaneElems < 16 ? sizeof(T) * kLaneElems : 16) LanePack {
  T v[kLaneElems];
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool lane_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % alignof(LanePack<T>) == 0;
}

// kWhole: all kLaneElems elements, with one vector access (x aligned); else the first count.
template <bool kWhole, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void lane_load(const T* x, int count, T (&out)[kLaneElems]) {
  if constexpr (kWhole) {
    const LanePack<T> v = *reinterpret_cast<const LanePack<T>*>(x);
#ifdef __CUDACC__
#pragma unroll
#endif
    for (int j = 0; j < kLaneElems; ++j) out[j] = v.v[j];
  } else {
    for (int j = 0; j < kLaneElems; ++j) out[j] = j < count ? x[j] : T(0);
  }
}

template <bool kWhole, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void lane_store(T* x, int count, const T (&in)[kLaneElems]) {
  if constexpr (kWhole) {
    LanePack<T> v;
#ifdef __CUDACC__
#pragma unroll
#endif
    for (int j = 0; j < kLaneElems; ++j) v.v[j] = in[j];
    *reinterpret_cast<LanePack<T>*>(x) = v;
  } else {
    for (int j = 0; j < count; ++j) x[j] = in[j];
  }
}

template <typename P>
struct Q8Tensor {
  P* p;
  const P* g;
  int8_t* m;
  uint8_t* n;
  int8_t* d;
  int8_t* neg;
  P* comp;       // kahan_sum, else nullptr
  float* sc[4];  // per-quantization-block scales of m, n, d, neg
};

// One lane's states of a quantization block after the update (u = sqrt(n), what exp_avg_sq's code
// stands for), and their largest magnitudes per state (0 when the lane has no element).
struct Q8Lane {
  float m[kLaneElems], u[kLaneElems], d[kLaneElems], neg[kLaneElems];
  float max[4];
};

// Updates the lane's elements (i: the first; count: how many of its kLaneElems are in the tensor,
// kWhole: all) and stores the parameters at once: they do not wait for the block's scales, and holding
// them across the warp's shuffles would take 8 (Kahan: 16) more registers per lane.
// absmax: the block's old scales, read by the caller; the dequantization factors are computed from them
// only after every load of the lane is issued (a division's slow-path branch would otherwise hold each
// later load back until the scale before it has arrived).
template <bool kWhole, typename P>
C10_HOST_DEVICE C10_ALWAYS_INLINE void q8_lane_update(const Q8Tensor<P>& t, int64_t i, int count,
                                                      const float (&absmax)[4], const AdanCoeffs& c, bool first,
                                                      Q8Lane& out) {
  using namespace quant;
  P p[kLaneElems], g[kLaneElems], comp[kLaneElems];
  int8_t m[kLaneElems], d[kLaneElems], neg[kLaneElems];
  uint8_t n[kLaneElems];
  lane_load<kWhole>(t.p + i, count, p), lane_load<kWhole>(t.g + i, count, g);
  lane_load<kWhole>(t.m + i, count, m), lane_load<kWhole>(t.n + i, count, n);
  lane_load<kWhole>(t.d + i, count, d), lane_load<kWhole>(t.neg + i, count, neg);
  if (t.comp != nullptr) lane_load<kWhole>(t.comp + i, count, comp);
  const float k[4] = {dequant_factor(absmax[0], kSignedMax), dequant_factor(absmax[1], kUnsignedMax),
                      dequant_factor(absmax[2], kSignedMax), dequant_factor(absmax[3], kSignedMax)};
  for (int s = 0; s < 4; ++s) out.max[s] = 0.0f;
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int j = 0; j < kLaneElems; ++j) {
    if (!kWhole && j >= count) break;
    float pj = t.comp != nullptr ? static_cast<float>(p[j]) + static_cast<float>(comp[j]) : static_cast<float>(p[j]);
    float mj = dequantize_signed(m[j], k[0]), nj = dequantize_sq(n[j], k[1]), dj = dequantize_signed(d[j], k[2]),
          negj = dequantize_signed(neg[j], k[3]);
    const float u = adan_update(pj, static_cast<float>(g[j]), mj, nj, dj, negj, c, first);
    if (t.comp != nullptr) {
      kahan_store(pj, p[j], comp[j]);
    } else {
      p[j] = static_cast<P>(pj);
    }
    out.m[j] = mj, out.u[j] = u, out.d[j] = dj, out.neg[j] = negj;
    // max sqrt(n) = sqrt(max n): the scale of exp_avg_sq, as the spec takes it
    out.max[0] = max_nan(out.max[0], ::fabsf(mj)), out.max[1] = max_nan(out.max[1], u);
    out.max[2] = max_nan(out.max[2], ::fabsf(dj)), out.max[3] = max_nan(out.max[3], ::fabsf(negj));
  }
  lane_store<kWhole>(t.p + i, count, p);
  if (t.comp != nullptr) lane_store<kWhole>(t.comp + i, count, comp);
}

// s: the block's quantization factors (quant_factor of its maxima).
template <bool kWhole, typename P>
C10_HOST_DEVICE C10_ALWAYS_INLINE void q8_lane_store(const Q8Tensor<P>& t, int64_t i, int count, const float (&s)[4],
                                                     const Q8Lane& in) {
  using namespace quant;
  int8_t m[kLaneElems], d[kLaneElems], neg[kLaneElems];
  uint8_t n[kLaneElems];
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int j = 0; j < kLaneElems; ++j) {
    if (!kWhole && j >= count) break;
    m[j] = quantize_signed(in.m[j], s[0]), n[j] = quantize_sq_root(in.u[j], s[1]);
    d[j] = quantize_signed(in.d[j], s[2]), neg[j] = quantize_signed(in.neg[j], s[3]);
  }
  lane_store<kWhole>(t.m + i, count, m), lane_store<kWhole>(t.n + i, count, n);
  lane_store<kWhole>(t.d + i, count, d), lane_store<kWhole>(t.neg + i, count, neg);
}

// One quantization block b of t (len elements from b0) by a warp: on a GPU this thread is lane lane0;
// on the host the call runs all kLanes lanes.
template <bool kWhole, int kLanes, typename P>
C10_HOST_DEVICE C10_ALWAYS_INLINE void q8_block(const Q8Tensor<P>& t, int64_t b, int64_t b0, int64_t len, int lane0,
                                                const AdanCoeffs& c, bool first) {
  using namespace quant;
  const float absmax[4] = {t.sc[0][b], t.sc[1][b], t.sc[2][b], t.sc[3][b]};
  Q8Lane lanes[kLanes];
  float mx[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const auto count = [&](int lane) {
    const int64_t left = len - int64_t{kLaneElems} * lane;
    return static_cast<int>(left < 0 ? 0 : left < kLaneElems ? left : kLaneElems);
  };
  for (int l = 0; l < kLanes; ++l) {
    q8_lane_update<kWhole>(t, b0 + kLaneElems * (lane0 + l), count(lane0 + l), absmax, c, first, lanes[l]);
    for (int s = 0; s < 4; ++s) mx[s] = max_nan(mx[s], lanes[l].max[s]);
  }
#ifdef __CUDA_ARCH__
  // Every lane reaches this with the same b (a lane without elements brings zeros).
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2)
#pragma unroll
    for (int s = 0; s < 4; ++s) mx[s] = max_nan(mx[s], __shfl_xor_sync(0xffffffffu, mx[s], off));
#endif
  const float qs[4] = {quant_factor(mx[0], kSignedMax), quant_factor(mx[1], kUnsignedMax),
                       quant_factor(mx[2], kSignedMax), quant_factor(mx[3], kSignedMax)};
  for (int l = 0; l < kLanes; ++l)
    q8_lane_store<kWhole>(t, b0 + kLaneElems * (lane0 + l), count(lane0 + l), qs, lanes[l]);
  if (lane0 == 0) {  // after the shuffles, so after every lane has read the old scales
    for (int s = 0; s < 4; ++s) t.sc[s][b] = mx[s];
  }
}

// A tensor's last, partial block (or any block of an unaligned tensor), out of line on the device:
// inlined next to the whole blocks' code it made the kernel spill registers.  Arguments by value, so
// that nothing has to live in local memory for the call.
#ifdef __CUDA_ARCH__
#define ADAN_Q8_PARTIAL_INLINE __noinline__
#else
#define ADAN_Q8_PARTIAL_INLINE inline
#endif
template <int kLanes, typename P>
C10_HOST_DEVICE ADAN_Q8_PARTIAL_INLINE void q8_partial_block(Q8Tensor<P> t, int64_t b, int64_t b0, int64_t len,
                                                             int lane0, AdanCoeffs c, bool first) {
  q8_block<false, kLanes>(t, b, b0, len, lane0, c, first);
}

template <typename P>
C10_HOST_DEVICE ADAN_BLOCK_INLINE void adan_block_q8(const TensorBatch& batch, int tensor, int64_t start, int64_t n,
                                                     const AdanCoeffs& c, bool first, int thread, int nthreads) {
  using namespace quant;
#ifdef __CUDA_ARCH__
  constexpr int kLanesHere = 1;  // this thread is one lane
  const int lane0 = thread % kWarp;
#else
  constexpr int kLanesHere = kWarp;  // the whole warp, from its lane 0
  if (thread % kWarp != 0) return;
  const int lane0 = 0;
#endif
  Q8Tensor<P> t{static_cast<P*>(batch.ptr[0][tensor]) + start,
                static_cast<const P*>(batch.ptr[1][tensor]) + start,
                static_cast<int8_t*>(batch.ptr[2][tensor]) + start,
                static_cast<uint8_t*>(batch.ptr[3][tensor]) + start,
                static_cast<int8_t*>(batch.ptr[4][tensor]) + start,
                static_cast<int8_t*>(batch.ptr[5][tensor]) + start,
                batch.comp[tensor] != nullptr ? static_cast<P*>(batch.comp[tensor]) + start : nullptr,
                {}};
  for (int s = 0; s < 4; ++s) t.sc[s] = batch.scale[s][tensor] + start / kQBlock;
  // start is whole quantization blocks (kLaunchChunk elements), so every block of the chunk is aligned
  // as its first one is.
  const bool aligned = lane_aligned<P>(t.p) && lane_aligned<P>(t.g) && lane_aligned<int8_t>(t.m) &&
                       lane_aligned<uint8_t>(t.n) && lane_aligned<int8_t>(t.d) && lane_aligned<int8_t>(t.neg) &&
                       (t.comp == nullptr || lane_aligned<P>(t.comp));
  const int64_t nblocks = (n + kQBlock - 1) / kQBlock;
  for (int64_t b = thread / kWarp; b < nblocks; b += nthreads / kWarp) {  // the same b for a warp's lanes
    const int64_t b0 = b * kQBlock;
    const int64_t len = n - b0 < kQBlock ? n - b0 : kQBlock;
    if (aligned && len == kQBlock) {
      q8_block<true, kLanesHere>(t, b, b0, len, lane0, c, first);
    } else {
      q8_partial_block<kLanesHere>(t, b, b0, len, lane0, c, first);
    }
  }
}

}  // namespace cuda_block
}  // namespace adan_plugin
