// Declarations shared by the op registration, the CPU kernel and the CUDA
// kernel of adan_plugin::fused_adan_.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "adan_math.h"

namespace adan_plugin {

// Everything the kernels need besides the tensor lists.  Optional 0-dim
// float32 tensors live on the parameters' device and are only read by the
// kernel (never by the host on CUDA).
struct AdanCall {
  AdanHyper hyper;
  double step;                                  // host step count (ignored when step_tensor is set)
  bool first;                                   // every tensor takes its first step
  c10::optional<at::Tensor> step_tensor;        // device step count (capturable / AMP mode)
  std::vector<at::Tensor> param_steps;          // per-tensor step counts (device mode), may be empty
  c10::optional<at::Tensor> grad_coef;          // global clip coefficient
  c10::optional<at::Tensor> grad_scale;         // AMP loss scale to divide the gradients by
  c10::optional<at::Tensor> found_inf;          // nonzero: skip the whole step
  // 8-bit states (int8 exp_avg/exp_avg_diff/neg_pre_grad, uint8 exp_avg_sq): per tensor, one fp32 scale per
  // block of quant::kQBlock elements, for m, n, d, neg_pre_grad in this order; empty otherwise.
  std::vector<at::Tensor> state_scales[4];
  std::vector<at::Tensor> kahan_comps;          // kahan_sum: per 16-bit parameter, same dtype/layout; or empty
};

// Raises a clear error unless the lists describe one valid fused call.
void check_fused_adan_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs,
                           at::TensorList neg_pre_grads, const AdanCall& call);

void fused_adan_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs,
                    at::TensorList neg_pre_grads, const AdanCall& call);

// The CUDA kernel's code run on CPU tensors (tests only; adan_cuda_on_cpu.cpp).
void fused_adan_cuda_code_on_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs,
                                 at::TensorList neg_pre_grads, const AdanCall& call);

#ifdef ADAN_WITH_CUDA
void fused_adan_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs,
                     at::TensorList neg_pre_grads, const AdanCall& call);
#endif

}  // namespace adan_plugin
