// CPU kernel of adan_plugin::fused_adan_: at::parallel_for over fixed-size
// chunks of all tensors (so one huge tensor and a thousand tiny ones both
// spread over the cores), Vectorized<float> inside a chunk.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

namespace adan_plugin {
// Declared before adan_math.h so the templated update finds it.
C10_ALWAYS_INLINE at::vec::Vectorized<float> adan_sqrt(const at::vec::Vectorized<float>& x) {
  return x.sqrt();
}
}  // namespace adan_plugin

#include "adan_ops.h"

namespace adan_plugin {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 16384;  // elements per parallel work item

template <typename T>
C10_ALWAYS_INLINE fVec load_vec(const T* ptr) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(ptr);
  } else {
    float buf[fVec::size()];
    for (int64_t j = 0; j < fVec::size(); ++j) buf[j] = static_cast<float>(ptr[j]);
    return fVec::loadu(buf);
  }
}

template <typename T>
C10_ALWAYS_INLINE void store_vec(T* ptr, const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(ptr);
  } else {
    float buf[fVec::size()];
    v.store(buf);
    for (int64_t j = 0; j < fVec::size(); ++j) ptr[j] = static_cast<T>(buf[j]);
  }
}

struct Ptrs {
  void *p, *g, *m, *n, *d, *neg;
  int64_t numel;
  bool first;
};

template <typename P, typename S>
void update_range(const Ptrs& t, int64_t begin, int64_t end, const AdanCoeffs& c) {
  P* p = static_cast<P*>(t.p);
  const P* g = static_cast<const P*>(t.g);
  S* m = static_cast<S*>(t.m);
  S* n = static_cast<S*>(t.n);
  S* d = static_cast<S*>(t.d);
  S* neg = static_cast<S*>(t.neg);
  int64_t i = begin;
  for (; i + fVec::size() <= end; i += fVec::size()) {
    fVec vp = load_vec(p + i), vm = load_vec(m + i), vn = load_vec(n + i), vd = load_vec(d + i),
         vneg = load_vec(neg + i);
    adan_update(vp, load_vec(g + i), vm, vn, vd, vneg, c, t.first);
    store_vec(p + i, vp), store_vec(m + i, vm), store_vec(n + i, vn), store_vec(d + i, vd),
        store_vec(neg + i, vneg);
  }
  for (; i < end; ++i) {
    float vp = p[i], vm = m[i], vn = n[i], vd = d[i], vneg = neg[i];
    adan_update(vp, static_cast<float>(g[i]), vm, vn, vd, vneg, c, t.first);
    p[i] = static_cast<P>(vp), m[i] = static_cast<S>(vm), n[i] = static_cast<S>(vn), d[i] = static_cast<S>(vd),
    neg[i] = static_cast<S>(vneg);
  }
}

float read_scalar(const c10::optional<at::Tensor>& t, float fallback) {
  // CPU tensors: reading them is a memory load, not a device sync.
  return t.has_value() ? *t->data_ptr<float>() : fallback;
}

}  // namespace

void fused_adan_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads,
                    const AdanCall& call) {
  if (read_scalar(call.found_inf, 0.0f) != 0.0f) return;  // AMP overflow: the step does not happen
  const double step = call.step_tensor.has_value() ? static_cast<double>(read_scalar(call.step_tensor, 0.0f))
                                                   : call.step;
  const bool group_first = call.first || step == 1.0;
  const float grad_mul = read_scalar(call.grad_coef, 1.0f) / read_scalar(call.grad_scale, 1.0f);
  const AdanCoeffs coeffs = adan_coeffs(call.hyper, step, grad_mul);

  std::vector<Ptrs> tensors;
  std::vector<std::pair<int32_t, int64_t>> chunks;  // (tensor, first element)
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const bool first = group_first || (!call.param_steps.empty() && read_scalar(call.param_steps[i], 0.0f) == 1.0f);
    tensors.push_back(Ptrs{params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                           exp_avg_sqs[i].data_ptr(), exp_avg_diffs[i].data_ptr(), neg_pre_grads[i].data_ptr(),
                           numel, first});
    for (int64_t start = 0; start < numel; start += kChunk)
      chunks.emplace_back(static_cast<int32_t>(tensors.size() - 1), start);
  }
  if (chunks.empty()) return;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fused_adan_cpu_p", [&] {
    using P = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, exp_avgs[0].scalar_type(), "fused_adan_cpu_s", [&] {
      using S = scalar_t;
      if constexpr (std::is_same_v<P, double> || std::is_same_v<S, double>) {
        TORCH_CHECK(false, "adan_plugin.fused_adan_: float64 is not supported");
      } else {
        at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
          for (int64_t k = lo; k < hi; ++k) {
            const Ptrs& t = tensors[chunks[k].first];
            const int64_t begin = chunks[k].second;
            update_range<P, S>(t, begin, std::min(begin + kChunk, t.numel), coeffs);
          }
        });
      }
    });
  });
}

}  // namespace adan_plugin
