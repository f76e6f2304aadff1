// What one CUDA block of fused_adan_ does, and how the host fills a launch's
// argument: written as host/device code so that adan_cuda.cu launches it on a
// GPU and adan_cuda_on_cpu.cpp runs the very same code on the CPU (blocks and
// threads as loops) for tests on machines without a GPU.  Threads of a block
// touch disjoint elements and never synchronise (8-bit states: the lanes of a
// warp only exchange their block maxima, which the host combines in a loop),
// so any execution order gives the GPU's result up to floating-point contraction.
#pragma once

#include <ATen/Dispatch.h>

#include <cstdint>
#include <type_traits>

#include "adan_cuda_batch.h"
#include "adan_cuda_q8.h"
#include "adan_ops.h"

namespace adan_plugin {
namespace cuda_block {

template <typename P, typename S>
C10_HOST_DEVICE ADAN_BLOCK_INLINE void adan_block(const TensorBatch& batch, const AdanHyper& hyper, double host_step,
                                       bool first_all, const DeviceScalars& dev, int block, int thread,
                                       int nthreads) {
  if (dev.found_inf != nullptr && *dev.found_inf != 0.0f) return;  // AMP overflow: skip the step

  const int t = batch.block_tensor[block];
  const int64_t start = static_cast<int64_t>(batch.block_chunk[block]) * kLaunchChunk;
  const int64_t rem = batch.numel[t] - start;
  const int64_t n = rem < kLaunchChunk ? rem : kLaunchChunk;

  const double step = dev.step != nullptr ? static_cast<double>(*dev.step) : host_step;
  const bool first = first_all || step == 1.0 ||
                     (batch.param_step[t] != nullptr && *batch.param_step[t] == 1.0f);
  const float grad_mul = (dev.grad_coef != nullptr ? *dev.grad_coef : 1.0f) /
                         (dev.grad_scale != nullptr ? *dev.grad_scale : 1.0f);
  const AdanCoeffs c = adan_coeffs(hyper, step, grad_mul);
  if constexpr (std::is_same_v<S, Q8>) {
    adan_block_q8<P>(batch, t, start, n, c, first, thread, nthreads);
  } else {
  P* p = static_cast<P*>(batch.ptr[0][t]) + start;
  const P* g = static_cast<const P*>(batch.ptr[1][t]) + start;
  S* m = static_cast<S*>(batch.ptr[2][t]) + start;
  S* nn = static_cast<S*>(batch.ptr[3][t]) + start;
  S* d = static_cast<S*>(batch.ptr[4][t]) + start;
  S* neg = static_cast<S*>(batch.ptr[5][t]) + start;
  P* comp = batch.comp[t] != nullptr ? static_cast<P*>(batch.comp[t]) + start : nullptr;

  int64_t scalar_from = 0;
  if (is_aligned<P>(p) && is_aligned<P>(g) && is_aligned<S>(m) && is_aligned<S>(nn) && is_aligned<S>(d) &&
      is_aligned<S>(neg) && (comp == nullptr || is_aligned<P>(comp))) {
    const int64_t nvec = n / kVec;
    for (int64_t i = thread; i < nvec; i += nthreads) {
      VecT<P> vp = reinterpret_cast<const VecT<P>*>(p)[i];
      const VecT<P> vg = reinterpret_cast<const VecT<P>*>(g)[i];
      VecT<S> vm = reinterpret_cast<const VecT<S>*>(m)[i];
      VecT<S> vn = reinterpret_cast<const VecT<S>*>(nn)[i];
      VecT<S> vd = reinterpret_cast<const VecT<S>*>(d)[i];
      VecT<S> vneg = reinterpret_cast<const VecT<S>*>(neg)[i];
#ifdef __CUDACC__
#pragma unroll
#endif
      for (int j = 0; j < kVec; ++j) {
        float fp = load_param(vp.v[j], comp, i * kVec + j), fm = static_cast<float>(vm.v[j]),
              fn = static_cast<float>(vn.v[j]), fd = static_cast<float>(vd.v[j]),
              fneg = static_cast<float>(vneg.v[j]);
        adan_update(fp, static_cast<float>(vg.v[j]), fm, fn, fd, fneg, c, first);
        store_param(fp, vp.v[j], comp, i * kVec + j);
        vm.v[j] = static_cast<S>(fm), vn.v[j] = static_cast<S>(fn);
        vd.v[j] = static_cast<S>(fd), vneg.v[j] = static_cast<S>(fneg);
      }
      reinterpret_cast<VecT<P>*>(p)[i] = vp;
      reinterpret_cast<VecT<S>*>(m)[i] = vm;
      reinterpret_cast<VecT<S>*>(nn)[i] = vn;
      reinterpret_cast<VecT<S>*>(d)[i] = vd;
      reinterpret_cast<VecT<S>*>(neg)[i] = vneg;
    }
    scalar_from = nvec * kVec;
  }
  for (int64_t i = scalar_from + thread; i < n; i += nthreads) {
    float fp = load_param(p[i], comp, i), fm = static_cast<float>(m[i]), fn = static_cast<float>(nn[i]),
          fd = static_cast<float>(d[i]), fneg = static_cast<float>(neg[i]);
    adan_update(fp, static_cast<float>(g[i]), fm, fn, fd, fneg, c, first);
    store_param(fp, p[i], comp, i);
    m[i] = static_cast<S>(fm), nn[i] = static_cast<S>(fn);
    d[i] = static_cast<S>(fd), neg[i] = static_cast<S>(fneg);
  }
  }
}

// ------------------------------------------------------------------ host side
inline const float* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

inline DeviceScalars device_scalars(const AdanCall& call) {
  return DeviceScalars{ptr_or_null(call.step_tensor), ptr_or_null(call.grad_coef), ptr_or_null(call.grad_scale),
                       ptr_or_null(call.found_inf)};
}

// Calls f(P{}, S{}) with the parameter and state storage types of a call.
template <typename F>
void dispatch_storage_types(at::ScalarType param_dtype, at::ScalarType state_dtype, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "fused_adan_p", [&] {
    using P = scalar_t;
    if (state_dtype == at::kChar) {  // 8-bit states
      if constexpr (std::is_same_v<P, double>) {
        TORCH_CHECK(false, "adan_plugin.fused_adan_: float64 is not supported");
      } else {
        f(P{}, Q8{});
      }
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, state_dtype, "fused_adan_s", [&] {
      using S = scalar_t;
      if constexpr (std::is_same_v<P, double> || std::is_same_v<S, double>) {
        TORCH_CHECK(false, "adan_plugin.fused_adan_: float64 is not supported");
      } else {
        f(P{}, S{});
      }
    });
  });
}

// Calls launch(P{}, S{}, batch, n_blocks) once per launch of the plan for these lists, P and S being the
// parameters' and the states' storage types.
template <typename Launch>
void for_each_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads,
                     const AdanCall& call, Launch&& launch) {
  std::vector<int64_t> numels;
  numels.reserve(params.size());
  for (const at::Tensor& p : params) {
    TORCH_CHECK(p.numel() / kLaunchChunk < (int64_t{1} << 31), "adan_plugin.fused_adan_: tensor too large");
    numels.push_back(p.numel());
  }
  const std::vector<LaunchPlan> plans = plan_launches(numels);
  dispatch_storage_types(params[0].scalar_type(), exp_avgs[0].scalar_type(), [&](auto p_tag, auto s_tag) {
    for (const LaunchPlan& plan : plans) {
      TensorBatch batch;
      for (size_t slot = 0; slot < plan.slot_tensor.size(); ++slot) {
        const size_t i = static_cast<size_t>(plan.slot_tensor[slot]);
        const at::Tensor* ts[6] = {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i], &exp_avg_diffs[i],
                                   &neg_pre_grads[i]};
        for (int k = 0; k < 6; ++k) batch.ptr[k][slot] = ts[k]->data_ptr();
        batch.param_step[slot] = call.param_steps.empty() ? nullptr : call.param_steps[i].data_ptr<float>();
        for (int k = 0; k < 4; ++k)
          batch.scale[k][slot] = call.state_scales[k].empty() ? nullptr : call.state_scales[k][i].data_ptr<float>();
        batch.comp[slot] = call.kahan_comps.empty() ? nullptr : call.kahan_comps[i].data_ptr();
        batch.numel[slot] = params[i].numel();
      }
      const int blocks = static_cast<int>(plan.block_slot.size());
      for (int b = 0; b < blocks; ++b) {
        batch.block_tensor[b] = static_cast<unsigned char>(plan.block_slot[b]);
        batch.block_chunk[b] = static_cast<int32_t>(plan.block_chunk[b]);
      }
      launch(p_tag, s_tag, batch, blocks);
    }
  });
}

}  // namespace cuda_block
}  // namespace adan_plugin
