// The CUDA kernel's code (adan_cuda_block.h: launch plan, argument filling,
// alignment choice, vector and scalar loops, device scalars) run on CPU
// tensors, one block and one thread after another.  Registered as the test op
// adan_plugin::_fused_adan_cuda_code_on_cpu_ so that machines without a GPU
// check the kernel's logic against the CPU kernel and the float64 reference;
// it is slow and never used for training.
#include <ATen/ATen.h>

#include "adan_cuda_block.h"

namespace adan_plugin {

void fused_adan_cuda_code_on_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs,
                                 at::TensorList neg_pre_grads, const AdanCall& call) {
  using namespace cuda_block;
  const DeviceScalars dev = device_scalars(call);
  for_each_launch(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, call,
                  [&](auto p_tag, auto s_tag, const TensorBatch& batch, int blocks) {
                    for (int b = 0; b < blocks; ++b)
                      for (int t = 0; t < kThreads; ++t)
                        adan_block<decltype(p_tag), decltype(s_tag)>(batch, call.hyper, call.step, call.first, dev,
                                                                     b, t, kThreads);
                  });
}

}  // namespace adan_plugin
