// Raw CUDA kernels of the data-consistency op behind a plain C++ launcher interface: device
// pointers, a DcGeometry and a cudaStream_t, no PyTorch types, so this compiles with nvcc alone
// (CI does that on machines whose torch has no CUDA). The torch glue that calls these is
// csrc/data_consistency_cuda.cpp. Complex arrays are interleaved (re, im) pairs of real_t.
// Every launcher enqueues on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../data_consistency_geometry.h"

namespace kdhpc {
namespace cuda {

// spec <- (1 - lam M') spec / n + lam q / sqrt(n), the second term only where M' != 0
// (spec from an unnormalised transform, q orthonormal; n, sqrt(n) from g.inv_n, g.inv_sqrt_n).
//   spec, q: [rows, spec_h, spec_w] complex; mask: raw [mask_rows, mask_h, mask_w];
//   lam: one real_t on the device (read in the kernel: no host sync).
template <typename real_t>
cudaError_t launch_mix_forward(real_t* spec, const real_t* q, const real_t* mask,
                               const real_t* lam, const DcGeometry& g, cudaStream_t stream);

// Number of per-block partial sums launch_mix_backward writes (fixed by the shape).
int64_t mix_backward_blocks(const DcGeometry& g);

// From g_spec = T(grad) and x_spec = T(x) (unnormalised), over the bins where M' != 0:
//   lam_partials[b] = block b's share of sum w Re(conj(G) (q / sqrt(n) - M' x_spec / n))
//                                                                      (if x_spec is given)
//   grad_q = lam w G / sqrt(n) there and 0 elsewhere                   (if grad_q is given)
// and over all bins g_spec <- (1 - lam M') g_spec / n                  (if scale_g).
// lam_partials: mix_backward_blocks(g) doubles, or null when x_spec is null.
template <typename real_t>
cudaError_t launch_mix_backward(real_t* g_spec, const real_t* x_spec, const real_t* q,
                                real_t* grad_q, const real_t* mask, const real_t* lam,
                                double* lam_partials, bool scale_g, const DcGeometry& g,
                                cudaStream_t stream);

// data[i] <- data[i] + 0: -0.0 becomes +0.0, everything else is unchanged.
template <typename real_t>
cudaError_t launch_make_zeros_positive(real_t* data, int64_t count, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdhpc
