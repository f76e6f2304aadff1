// The CUDA kernel's code (adan_cuda_block.h: launch plan, argument filling,
// alignment choice, vector and scalar loops, device scalars) run on CPU
// tensors, one block and one thread after another.  Registered as the test op
// adan_plugin::_fused_adan_cuda_code_on_cpu_ so that machines without a GPU
// check the kernel's logic against the CPU kernel and the float64 reference;
// it is slow and never used for training.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "adan_cuda_block.h"

namespace adan_plugin {

void fused_adan_cuda_code_on_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs,
                                 at::TensorList neg_pre_grads, const AdanCall& call) {
  using namespace cuda_block;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "cuda_code_on_cpu_p", [&] {
    using P = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, exp_avgs[0].scalar_type(), "cuda_code_on_cpu_s", [&] {
      using S = scalar_t;
      if constexpr (std::is_same_v<P, double> || std::is_same_v<S, double>) {
        TORCH_CHECK(false, "adan_plugin.fused_adan_: float64 is not supported");
      } else {
        const DeviceScalars dev = device_scalars(call);
        for_each_launch(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, call,
                        [&](const TensorBatch& batch, int blocks) {
                          for (int b = 0; b < blocks; ++b)
                            for (int t = 0; t < kThreads; ++t)
                              adan_block<P, S>(batch, call.hyper, call.step, call.first, dev, b, t, kThreads);
                        });
      }
    });
  });
}

}  // namespace adan_plugin
