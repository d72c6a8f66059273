// CUDA implementation of torch.ops.kdhpc.data_consistency_*: the torch glue. It runs the
// transforms with ATen (cuFFT) on the whole batch, and the fused passes of
// cuda/data_consistency_kernels.cu on the current stream. Compiled only when setup.py (or the
// JIT build) defines KDHPC_WITH_CUDA, i.e. when CUDA_HOME is set.
#ifdef KDHPC_WITH_CUDA

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/real.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "cuda/data_consistency_kernels.cuh"
#include "data_consistency.h"

namespace kdhpc {
namespace {

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

template <typename real_t>
real_t* real_ptr(at::Tensor& t) { return reinterpret_cast<real_t*>(t.data_ptr()); }
template <typename real_t>
const real_t* real_ptr(const at::Tensor& t) {
  return reinterpret_cast<const real_t*>(t.data_ptr());
}

// Real element count of a tensor whose complex elements are (re, im) pairs.
int64_t real_count(const at::Tensor& t) { return t.numel() * (t.is_complex() ? 2 : 1); }

at::Tensor apply_cuda(const at::Tensor& x, const at::Tensor& q, const at::Tensor& mask,
                      const at::Tensor& lam, bool centered, bool hermitian) {
  const char* op = "kdhpc::data_consistency_apply";
  const DcGeometry g = make_geometry(x, mask, centered, hermitian, op);
  check_apply_operands(x, q, mask, lam, g, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor qc = q.contiguous(), mc = mask.contiguous(), lc = lam.contiguous();
  const auto real_type = c10::toRealValueType(x.scalar_type());
  at::Tensor spec = forward_transform(x.contiguous(), g, false).contiguous();  // [N, spec_h, spec_w]
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(real_type, "data_consistency_apply_cuda", [&] {
    check_launch(cuda::launch_mix_forward<scalar_t>(real_ptr<scalar_t>(spec),
                                                    real_ptr<scalar_t>(qc),
                                                    real_ptr<scalar_t>(mc),
                                                    real_ptr<scalar_t>(lc), g, stream),
                 op);
    out = inverse_transform(spec, g, false).contiguous();                      // [N, H, W]
    check_launch(cuda::launch_make_zeros_positive<scalar_t>(real_ptr<scalar_t>(out),
                                                            real_count(out), stream),
                 op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> apply_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& q, const at::Tensor& mask,
    const at::Tensor& lam, bool centered, bool hermitian, std::array<bool, 3> needs) {
  const char* op = "kdhpc::data_consistency_apply_backward";
  const DcGeometry g = check_backward_operands(grad, x, q, mask, lam, centered, hermitian, op);
  const auto real_type = c10::toRealValueType(x.scalar_type());
  const bool need_x = needs[0], need_q = needs[1], need_lam = needs[2];
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor qc = q.contiguous(), mc = mask.contiguous(), lc = lam.contiguous();
  at::Tensor g_spec = forward_transform(grad.contiguous(), g, false).contiguous();
  at::Tensor x_spec;
  if (need_lam) x_spec = forward_transform(x.contiguous(), g, false).contiguous();
  at::Tensor grad_q = need_q ? at::empty_like(qc) : at::empty({0}, q.options());
  at::Tensor partials = at::empty({need_lam ? cuda::mix_backward_blocks(g) : 0},
                                  x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(real_type, "data_consistency_apply_backward_cuda", [&] {
    check_launch(cuda::launch_mix_backward<scalar_t>(
                     real_ptr<scalar_t>(g_spec),
                     need_lam ? real_ptr<scalar_t>(x_spec) : nullptr, real_ptr<scalar_t>(qc),
                     need_q ? real_ptr<scalar_t>(grad_q) : nullptr, real_ptr<scalar_t>(mc),
                     real_ptr<scalar_t>(lc),
                     need_lam ? partials.data_ptr<double>() : nullptr, need_x, g, stream),
                 op);
  });
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_x) {
    grad_x = inverse_transform(g_spec, g, false);
    if (!hermitian && !x.is_complex()) grad_x = at::real(grad_x).contiguous();
  }
  // Summed on the device in a fixed order: no host sync, the same result every run.
  at::Tensor grad_lam = need_lam ? partials.sum().to(real_type) : at::empty({0}, lam.options());
  return {grad_x, grad_q, grad_lam};
}

}  // namespace
}  // namespace kdhpc

TORCH_LIBRARY_IMPL(kdhpc, CUDA, m) {
  m.impl("data_consistency_k0_term", &kdhpc::k0_term);
  m.impl("data_consistency_k0_term_backward", &kdhpc::k0_term_backward);
  m.impl("data_consistency_apply", &kdhpc::apply_cuda);
  m.impl("data_consistency_apply_backward", &kdhpc::apply_backward_cuda);
}

#endif  // KDHPC_WITH_CUDA
