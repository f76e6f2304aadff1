// The CUDA kernel's argument (TensorBatch, DeviceScalars) and what every block's code shares:
// vector types, alignment tests, the Kahan-aware parameter load and store.  Host/device code
// (adan_cuda_block.h says why).
#pragma once

#include <cstdint>

#include "adan_launch_plan.h"
#include "adan_math.h"
#include "adan_quant.h"

namespace adan_plugin {
namespace cuda_block {

constexpr int kThreads = 512;
constexpr int kVec = 4;  // elements per vectorized load (16 B for fp32, 8 B for 16-bit types)

// Kernel argument (passed by value, < 4 KiB with the other arguments).
struct TensorBatch {
  void* ptr[6][kLaunchMaxTensors];              // p, g, m, n, d, neg_pre_grad
  float* scale[4][kLaunchMaxTensors];           // 8-bit states: per-block scales of m, n, d, neg (else null)
  void* comp[kLaunchMaxTensors];                // kahan_sum: the parameter's compensation (else null)
  const float* param_step[kLaunchMaxTensors];   // per-tensor step count, or nullptr
  int64_t numel[kLaunchMaxTensors];
  unsigned char block_tensor[kLaunchMaxBlocks];  // which tensor block b works on
  int32_t block_chunk[kLaunchMaxBlocks];         // and which chunk of it
};

struct DeviceScalars {
  const float* step;  // nullptr: use the host step
  const float* grad_coef;
  const float* grad_scale;
  const float* found_inf;
};

// CUDA >= 12.1 on sm_70+ takes up to 32764 bytes of kernel arguments (adan_cuda.cu checks the toolkit);
// the batch is about 5 KiB since it carries the 8-bit scales and Kahan buffers.
static_assert(sizeof(TensorBatch) + sizeof(AdanHyper) + sizeof(double) + sizeof(bool) + sizeof(DeviceScalars) +
                      32 <= 32764,
              "fused_adan_ kernel arguments exceed 32764 bytes");
static_assert(kLaunchMaxTensors <= 256, "block_tensor is one byte");

template <typename T>
struct alignas(sizeof(T) * kVec) VecT {
  T v[kVec];
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool is_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(VecT<T>) == 0;
}

// Force-inlined on the device: the kernel passes its by-value argument by reference, and an
// out-of-line call would copy the 3.6 KiB batch into each thread's local memory.
#ifdef __CUDACC__
#define ADAN_BLOCK_INLINE __forceinline__
#else
#define ADAN_BLOCK_INLINE inline
#endif

// Storage tag of 8-bit states (int8 m, d, neg_pre_grad; uint8 sqrt-coded n; adan_quant.h).
struct Q8 {};

// A parameter as fp32, with its Kahan compensation added when it has one (comp != nullptr).
template <typename P>
C10_HOST_DEVICE C10_ALWAYS_INLINE float load_param(P p, const P* comp, int64_t i) {
  const float x = static_cast<float>(p);
  return comp != nullptr ? x + static_cast<float>(comp[i]) : x;
}

template <typename P>
C10_HOST_DEVICE C10_ALWAYS_INLINE void store_param(float x, P& p, P* comp, int64_t i) {
  if (comp != nullptr) {
    quant::kahan_store(x, p, comp[i]);
  } else {
    p = static_cast<P>(x);
  }
}

}  // namespace cuda_block
}  // namespace adan_plugin
