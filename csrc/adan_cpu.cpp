// CPU kernel of adan_plugin::fused_adan_: at::parallel_for over fixed-size
// chunks of all tensors (so one huge tensor and a thousand tiny ones both
// spread over the cores); inside a chunk, the Vectorized<float> loop of
// adan_cpu_kernel.h, in its AVX2 build when the CPU has AVX2/FMA/F16C.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <string>
#include <vector>

#define ADAN_CPU_NS base
#include "adan_cpu_kernel.h"
#include "adan_ops.h"

namespace adan_plugin {
namespace {

constexpr int64_t kChunk = 16384;  // elements per parallel work item

bool use_avx2() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  static const bool ok = [] {
    // ADAN_PLUGIN_CPU_ISA=base forces the portable loop (tests compare the two).
    const char* isa = std::getenv("ADAN_PLUGIN_CPU_ISA");
    if (isa != nullptr && std::string(isa) == "base") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

CpuDtype cpu_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CpuDtype::kFloat;
    case at::kBFloat16: return CpuDtype::kBFloat16;
    case at::kHalf: return CpuDtype::kHalf;
    default: TORCH_CHECK(false, "adan_plugin.fused_adan_: unsupported dtype ", t);
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
  const CpuDtype p_dtype = cpu_dtype(params[0].scalar_type());
  const CpuDtype s_dtype = cpu_dtype(exp_avgs[0].scalar_type());

  std::vector<CpuTensor> tensors;
  std::vector<std::pair<int32_t, int64_t>> chunks;  // (tensor, first element)
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const bool first =
        group_first || (!call.param_steps.empty() && read_scalar(call.param_steps[i], 0.0f) == 1.0f);
    tensors.push_back(CpuTensor{params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                                exp_avg_sqs[i].data_ptr(), exp_avg_diffs[i].data_ptr(),
                                neg_pre_grads[i].data_ptr(), numel, first});
    for (int64_t start = 0; start < numel; start += kChunk)
      chunks.emplace_back(static_cast<int32_t>(tensors.size() - 1), start);
  }
  if (chunks.empty()) return;

  const auto update = use_avx2() ? &avx2::update_range : &base::update_range;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const CpuTensor& t = tensors[chunks[k].first];
      const int64_t begin = chunks[k].second;
      update(t, begin, std::min(begin + kChunk, t.numel), coeffs, p_dtype, s_dtype);
    }
  });
}

}  // namespace adan_plugin
