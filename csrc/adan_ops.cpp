// Registers the adan_plugin custom ops and checks their arguments; the
// kernels live in adan_cpu.cpp and adan_cuda.cu.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "adan_cpu_types.h"
#include "adan_launch_plan.h"
#include "adan_ops.h"
#include "adan_quant.h"

namespace adan_plugin {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_scalar(const c10::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat,
              "adan_plugin.fused_adan_: ", name, " must be a one-element float32 tensor, got ",
              t->scalar_type(), " of shape ", t->sizes());
  TORCH_CHECK(t->device() == device, "adan_plugin.fused_adan_: ", name, " is on ", t->device(),
              ", the parameters on ", device, " (it is read on the device, never copied)");
}

// 8-bit states' scales and Kahan compensations (adan_quant.h).
void check_lowmem_args(at::TensorList params, bool q8, const AdanCall& call) {
  const size_t n = params.size();
  const char* names[4] = {"exp_avg_scales", "exp_avg_sq_scales", "exp_avg_diff_scales", "neg_pre_grad_scales"};
  for (int k = 0; k < 4; ++k) {
    const std::vector<at::Tensor>& scales = call.state_scales[k];
    TORCH_CHECK(q8 ? scales.size() == n : scales.empty(), "adan_plugin.fused_adan_: ", names[k], " must ",
                q8 ? "have one entry per parameter with 8-bit (int8) states" : "be empty unless the states are 8-bit",
                ", got ", scales.size(), " for ", n, " parameters");
    for (size_t i = 0; i < scales.size(); ++i) {
      const int64_t blocks = (params[i].numel() + quant::kQBlock - 1) / quant::kQBlock;
      const at::Tensor& s = scales[i];
      TORCH_CHECK(s.scalar_type() == at::kFloat && s.device() == params[i].device() && s.is_contiguous() &&
                      s.numel() == blocks,
                  "adan_plugin.fused_adan_: ", names[k], "[", i, "] must be a contiguous float32 tensor of ",
                  blocks, " elements (one per ", quant::kQBlock, " elements) on ", params[i].device(), ", got ",
                  s.is_contiguous() ? "" : "non-contiguous ", s.scalar_type(), " of shape ", s.sizes(), " on ",
                  s.device());
    }
  }
  const std::vector<at::Tensor>& comps = call.kahan_comps;
  TORCH_CHECK(comps.empty() || comps.size() == n, "adan_plugin.fused_adan_: kahan_comps must be empty or have "
              "one entry per parameter, got ", comps.size(), " for ", n);
  for (size_t i = 0; i < comps.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf,
                "adan_plugin.fused_adan_: kahan_comps are for bfloat16/float16 parameters, parameter ", i, " is ",
                p.scalar_type());
    const at::Tensor& c = comps[i];
    TORCH_CHECK(c.scalar_type() == p.scalar_type() && c.device() == p.device() && c.sizes() == p.sizes() &&
                    c.strides() == p.strides(),
                "adan_plugin.fused_adan_: kahan_comps[", i, "] must match its parameter (", p.scalar_type(), " ",
                p.sizes(), " strides ", p.strides(), " on ", p.device(), "), got ", c.scalar_type(), " ", c.sizes(),
                " strides ", c.strides(), " on ", c.device());
  }
}

}  // namespace

void check_fused_adan_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs,
                           at::TensorList neg_pre_grads, const AdanCall& call) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  exp_avg_diffs.size() == n && neg_pre_grads.size() == n,
              "adan_plugin.fused_adan_: the six tensor lists must have the same length, got ", n, ", ",
              grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", exp_avg_diffs.size(), ", ",
              neg_pre_grads.size());
  TORCH_CHECK(call.param_steps.empty() || call.param_steps.size() == n,
              "adan_plugin.fused_adan_: param_steps must be empty or have one entry per parameter");
  TORCH_CHECK(call.param_steps.empty() || call.step_tensor.has_value(),
              "adan_plugin.fused_adan_: param_steps needs step_tensor (device-step mode)");
  if (n == 0) return;
  const at::Device device = params[0].device();
  const at::ScalarType p_dtype = params[0].scalar_type();
  const at::ScalarType s_dtype = exp_avgs[0].scalar_type();
  TORCH_CHECK(supported_dtype(p_dtype), "adan_plugin.fused_adan_: parameters must be float32, bfloat16 or "
              "float16, got ", p_dtype);
  const bool q8 = s_dtype == at::kChar;
  TORCH_CHECK(supported_dtype(s_dtype) || q8, "adan_plugin.fused_adan_: states must be float32, bfloat16 or "
              "float16 (or 8-bit: int8, with a uint8 exp_avg_sq and scales), got ", s_dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == device && p.scalar_type() == p_dtype,
                "adan_plugin.fused_adan_: parameter ", i, " is ", p.scalar_type(), " on ", p.device(),
                "; one call takes one device and one parameter dtype (", p_dtype, " on ", device, ")");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "adan_plugin.fused_adan_: parameter ", i,
                " is not dense (strides ", p.strides(), ")");
    const at::Tensor* others[5] = {&grads[i], &exp_avgs[i], &exp_avg_sqs[i], &exp_avg_diffs[i],
                                   &neg_pre_grads[i]};
    const char* names[5] = {"grad", "exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"};
    for (int k = 0; k < 5; ++k) {
      const at::Tensor& t = *others[k];
      const at::ScalarType want = k == 0 ? p_dtype : (q8 && k == 2) ? at::kByte : s_dtype;
      TORCH_CHECK(t.device() == device && t.scalar_type() == want, "adan_plugin.fused_adan_: ", names[k],
                  " of parameter ", i, " is ", t.scalar_type(), " on ", t.device(), ", expected ", want,
                  " on ", device);
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "adan_plugin.fused_adan_: ",
                  names[k], " of parameter ", i, " has sizes ", t.sizes(), " and strides ", t.strides(),
                  "; the parameter has ", p.sizes(), " and ", p.strides());
    }
    if (!call.param_steps.empty()) check_scalar(call.param_steps[i], "param_steps[i]", device);
  }
  check_lowmem_args(params, q8, call);
  check_scalar(call.step_tensor, "step_tensor", device);
  check_scalar(call.grad_coef, "grad_coef", device);
  check_scalar(call.grad_scale, "grad_scale", device);
  check_scalar(call.found_inf, "found_inf", device);
}

namespace {

using OptT = c10::optional<at::Tensor>;

AdanCall make_call(double lr, double beta1, double beta2, double beta3, double eps, double weight_decay,
                   bool no_prox, double step, bool first, const OptT& step_tensor, at::TensorList param_steps,
                   const OptT& grad_coef, const OptT& grad_scale, const OptT& found_inf,
                   at::TensorList m_scales, at::TensorList n_scales, at::TensorList d_scales,
                   at::TensorList neg_scales, at::TensorList kahan_comps) {
  AdanCall call;
  call.hyper = AdanHyper{lr, beta1, beta2, beta3, eps, weight_decay, no_prox};
  call.step = step;
  call.first = first;
  call.step_tensor = step_tensor;
  call.param_steps = param_steps.vec();
  call.grad_coef = grad_coef;
  call.grad_scale = grad_scale;
  call.found_inf = found_inf;
  call.state_scales[0] = m_scales.vec();
  call.state_scales[1] = n_scales.vec();
  call.state_scales[2] = d_scales.vec();
  call.state_scales[3] = neg_scales.vec();
  call.kahan_comps = kahan_comps.vec();
  return call;
}

template <void (*Kernel)(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                         at::TensorList, const AdanCall&)>
void fused_adan_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads,
                   double lr, double beta1, double beta2, double beta3, double eps, double weight_decay,
                   bool no_prox, double step, bool first, const OptT& step_tensor, at::TensorList param_steps,
                   const OptT& grad_coef, const OptT& grad_scale, const OptT& found_inf,
                   at::TensorList m_scales, at::TensorList n_scales, at::TensorList d_scales,
                   at::TensorList neg_scales, at::TensorList kahan_comps) {
  const AdanCall call = make_call(lr, beta1, beta2, beta3, eps, weight_decay, no_prox, step, first, step_tensor,
                                  param_steps, grad_coef, grad_scale, found_inf, m_scales, n_scales, d_scales,
                                  neg_scales, kahan_comps);
  check_fused_adan_args(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, call);
  if (params.empty()) return;
  Kernel(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, call);
}

// Test hook for the CUDA launch plan (host code, so it runs without a GPU), flattened as
// [max tensors, max blocks, chunk, then per launch: n_slots, slot tensors..., n_blocks, (slot, chunk)...].
std::vector<int64_t> cuda_launch_plan(c10::IntArrayRef numels) {
  std::vector<int64_t> out{kLaunchMaxTensors, kLaunchMaxBlocks, kLaunchChunk};
  for (const LaunchPlan& plan : plan_launches(numels.vec())) {
    out.push_back(static_cast<int64_t>(plan.slot_tensor.size()));
    out.insert(out.end(), plan.slot_tensor.begin(), plan.slot_tensor.end());
    out.push_back(static_cast<int64_t>(plan.block_slot.size()));
    for (size_t b = 0; b < plan.block_slot.size(); ++b) {
      out.push_back(plan.block_slot[b]);
      out.push_back(plan.block_chunk[b]);
    }
  }
  return out;
}

bool has_cuda() {
#ifdef ADAN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

}  // namespace adan_plugin

TORCH_LIBRARY(adan_plugin, m) {
  // One pass over memory: reads p, g, m, n, d, neg_pre_grad; writes all but g.  With 8-bit states
  // (int8 exp_avg) it also reads and writes their per-block scales; kahan_comps: 16-bit parameters'
  // compensation buffers (kahan_sum).
  const std::string args =
      "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] exp_avg_diffs, Tensor(e!)[] neg_pre_grads, *, float lr, float beta1, float beta2, "
      "float beta3, float eps, float weight_decay, bool no_prox, float step, bool first, "
      "Tensor? step_tensor=None, Tensor[] param_steps, Tensor? grad_coef=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(f!)[] exp_avg_scales, Tensor(g!)[] exp_avg_sq_scales, "
      "Tensor(h!)[] exp_avg_diff_scales, Tensor(i!)[] neg_pre_grad_scales, Tensor(j!)[] kahan_comps) -> ()";
  m.def(("fused_adan_" + args).c_str());
  // Tests only: the CUDA kernel's code on CPU tensors (see adan_cuda_on_cpu.cpp).
  m.def(("_fused_adan_cuda_code_on_cpu_" + args).c_str());
  m.def("_has_cuda() -> bool", &adan_plugin::has_cuda);
  // Tests only: the build of the CPU loop this process runs (ADAN_PLUGIN_CPU_ISA caps it).
  m.def("_cpu_isa() -> str", &adan_plugin::cpu_isa_name);
  m.def("_cuda_launch_plan(int[] numels) -> int[]", &adan_plugin::cuda_launch_plan);
}

TORCH_LIBRARY_IMPL(adan_plugin, CPU, m) {
  m.impl("fused_adan_", &adan_plugin::fused_adan_op<&adan_plugin::fused_adan_cpu>);
  m.impl("_fused_adan_cuda_code_on_cpu_", &adan_plugin::fused_adan_op<&adan_plugin::fused_adan_cuda_code_on_cpu>);
}

#ifdef ADAN_WITH_CUDA
TORCH_LIBRARY_IMPL(adan_plugin, CUDA, m) {
  m.impl("fused_adan_", &adan_plugin::fused_adan_op<&adan_plugin::fused_adan_cuda>);
}
#endif

// `import adan_plugin._C` loads this library, which registers the ops above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
