// CUDA kernel of adan_plugin::fused_adan_.
//
// Multi-tensor plumbing is ours rather than ATen's MultiTensorApply.cuh: Adan
// touches six tensor lists (p, g, m, n, d, neg_pre_grad) and ATen's helper
// stops at five, its internals change between torch releases, and it needs
// nvcc's --extended-lambda.  Which tensors and chunks each launch covers is
// planned on the host (adan_launch_plan.h); what a block does and how its
// argument is filled is host/device code in adan_cuda_block.h, which the CPU
// build also runs for tests.  Offsets are 64-bit (chunk index * chunk size),
// so a tensor over 2^31 elements is fine.
//
// Every optional scalar (step, clip coefficient, grad scale, found_inf,
// per-tensor steps) is read by the kernel from device memory: the host never
// waits, and the launch can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "adan_cuda_block.h"

// The launch argument (TensorBatch, ~5 KiB) exceeds the classic 4 KiB limit; CUDA 12.1 raised it to 32764 B.
#if defined(CUDART_VERSION) && CUDART_VERSION < 12010
#error "adan_plugin's CUDA kernel needs CUDA >= 12.1 (kernel arguments over 4 KiB)"
#endif

namespace adan_plugin {
namespace {

using namespace cuda_block;

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads)
    adan_kernel(TensorBatch batch, AdanHyper hyper, double host_step, bool first_all, DeviceScalars dev) {
  adan_block<P, S>(batch, hyper, host_step, first_all, dev, blockIdx.x, threadIdx.x, blockDim.x);
}

}  // namespace

void fused_adan_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads,
                     const AdanCall& call) {
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const DeviceScalars dev = device_scalars(call);
  for_each_launch(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, call,
                  [&](auto p_tag, auto s_tag, const TensorBatch& batch, int blocks) {
                    using P = decltype(p_tag);
                    using S = decltype(s_tag);
                    adan_kernel<P, S><<<blocks, kThreads, 0, stream>>>(batch, call.hyper, call.step, call.first,
                                                                      dev);
                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                  });
}

}  // namespace adan_plugin
