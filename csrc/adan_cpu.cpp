// CPU kernel of adan_plugin::fused_adan_: at::parallel_for over fixed-size
// chunks of all tensors (so one huge tensor and a thousand tiny ones both
// spread over the cores); inside a chunk, the Vectorized<float> loop of
// adan_cpu_kernel.h, in the best build the CPU can run (cpu_isa()).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#define ADAN_CPU_NS base
#include "adan_cpu_kernel.h"
#include "adan_ops.h"

namespace adan_plugin {
namespace {

constexpr int64_t kChunk = 16384;  // elements per parallel work item
// Calls with fewer elements run on the calling thread: a parallel region costs a few microseconds on
// idle cores, and on busy ones it waits a scheduler time slice (milliseconds) for its second thread,
// far more than the ~30 us this much work takes on one core.
constexpr int64_t kSerialBelow = 4 * kChunk;
static_assert(kChunk % quant::kQBlock == 0, "a chunk holds whole quantization blocks");

// The builds of adan_cpu_kernel.h, weakest first; each needs the
// instructions of those before it.
enum class CpuIsa { kBase, kAvx2, kAvx512, kAvx512Bf16 };
constexpr const char* kIsaNames[] = {"base", "avx2", "avx512", "avx512_bf16"};
using UpdateRange = void (*)(const CpuTensor&, int64_t, int64_t, const AdanCoeffs&, CpuDtype, CpuDtype);
constexpr UpdateRange kIsaUpdate[] = {&base::update_range, &avx2::update_range, &avx512::update_range,
                                      &avx512_bf16::update_range};

// The best build this CPU (and OS: __builtin_cpu_supports checks that the
// AVX/AVX-512 register state is enabled) can run.
CpuIsa best_cpu_isa() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
    return CpuIsa::kBase;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")))
    return CpuIsa::kAvx2;
  return __builtin_cpu_supports("avx512bf16") ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512;
#else
  return CpuIsa::kBase;
#endif
}

// Picked once per process, like ATen's own CPU kernels: the best build, or at
// most the one ADAN_PLUGIN_CPU_ISA names (base|avx2|avx512|avx512_bf16; tests
// use it to compare the builds).  A build the CPU cannot run is never picked;
// an unknown name is an error (raised by every fused step, before any write).
CpuIsa cpu_isa() {
  static const std::pair<CpuIsa, std::string> picked = []() -> std::pair<CpuIsa, std::string> {
    const CpuIsa best = best_cpu_isa();
    const char* env = std::getenv("ADAN_PLUGIN_CPU_ISA");
    if (env == nullptr || *env == '\0') return {best, ""};
    for (int i = 0; i <= static_cast<int>(CpuIsa::kAvx512Bf16); ++i)
      if (std::string(env) == kIsaNames[i]) return {std::min(best, static_cast<CpuIsa>(i)), ""};
    return {best, std::string("ADAN_PLUGIN_CPU_ISA='") + env +
                      "' is not one of base, avx2, avx512, avx512_bf16 (or unset: the best this CPU has)"};
  }();
  TORCH_CHECK(picked.second.empty(), "adan_plugin: ", picked.second);
  return picked.first;
}

CpuDtype cpu_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CpuDtype::kFloat;
    case at::kBFloat16: return CpuDtype::kBFloat16;
    case at::kHalf: return CpuDtype::kHalf;
    case at::kChar: return CpuDtype::kQ8;  // 8-bit states (exp_avg_sq is uint8 then)
    default: TORCH_CHECK(false, "adan_plugin.fused_adan_: unsupported dtype ", t);
  }
}

void fill_lowmem(CpuTensor& ct, const AdanCall& call, size_t i) {
  for (int k = 0; k < 4; ++k)
    ct.scale[k] = call.state_scales[k].empty() ? nullptr : call.state_scales[k][i].data_ptr<float>();
  ct.comp = call.kahan_comps.empty() ? nullptr : call.kahan_comps[i].data_ptr();
}

float read_scalar(const c10::optional<at::Tensor>& t, float fallback) {
  // CPU tensors: reading them is a memory load, not a device sync.
  return t.has_value() ? *t->data_ptr<float>() : fallback;
}

}  // namespace

std::string cpu_isa_name() { return kIsaNames[static_cast<int>(cpu_isa())]; }

void fused_adan_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads,
                    const AdanCall& call) {
  const UpdateRange update = kIsaUpdate[static_cast<int>(cpu_isa())];
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
  int64_t total = 0;
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    const bool first =
        group_first || (!call.param_steps.empty() && read_scalar(call.param_steps[i], 0.0f) == 1.0f);
    CpuTensor ct{params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                 exp_avg_diffs[i].data_ptr(), neg_pre_grads[i].data_ptr(), {}, nullptr, numel, first};
    fill_lowmem(ct, call, i);
    tensors.push_back(ct);
    total += numel;
    for (int64_t start = 0; start < numel; start += kChunk)
      chunks.emplace_back(static_cast<int32_t>(tensors.size() - 1), start);
  }
  if (chunks.empty()) return;

  const auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const CpuTensor& t = tensors[chunks[k].first];
      const int64_t begin = chunks[k].second;
      update(t, begin, std::min(begin + kChunk, t.numel), coeffs, p_dtype, s_dtype);
    }
  };
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  if (total < kSerialBelow) {
    run(0, n_chunks);
  } else {
    at::parallel_for(0, n_chunks, 1, run);
  }
}

}  // namespace adan_plugin
