// The data-consistency op's C++ pieces shared by the CPU code (data_consistency.cpp) and the
// CUDA glue (data_consistency_cuda.cpp). Formulas: kdhpc/ops/data_consistency.py.
#pragma once

#include <ATen/core/Tensor.h>

#include "data_consistency_geometry.h"

namespace kdhpc {

// The transform that images [n, h, w] and mask [Nm, Hm, Wm] imply (checks the mask's shape).
DcGeometry geometry_of(int64_t n, int64_t h, int64_t w, const at::Tensor& mask, bool centered,
                       bool hermitian, const char* op);

// Checks x [N, H, W] and mask [Nm, Hm, Wm] (dtypes, device, shapes); their geometry.
DcGeometry make_geometry(const at::Tensor& x, const at::Tensor& mask, bool centered,
                         bool hermitian, const char* op);

// Checks q [N, spec_h, spec_w] (complex, x's precision) and lam (0-dim, x's real dtype) against
// x and mask: same device, matching dtypes and shapes.
void check_apply_operands(const at::Tensor& x, const at::Tensor& q, const at::Tensor& mask,
                          const at::Tensor& lam, const DcGeometry& g, const char* op);

// Checks the backward op's operands (those of the forward, and grad shaped and typed like the
// forward's output); returns their geometry.
DcGeometry check_backward_operands(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& q, const at::Tensor& mask,
                                   const at::Tensor& lam, bool centered, bool hermitian,
                                   const char* op);

// The forward's output dtype: x's real dtype when hermitian, else its complex one.
at::ScalarType output_type(const at::Tensor& x, bool hermitian);

// Transform T of images [r, h, W] along the axes g transforms (rfft along the half axis when
// g.hermitian), and its inverse back to [r, h, W]: orthonormal, or with no scaling at all
// (orthonormal = false; the caller scales by g.inv_n). For the row-wise W-only case r, h may be
// a [rows * H, 1] view.
at::Tensor forward_transform(const at::Tensor& image, const DcGeometry& g, bool orthonormal);
at::Tensor inverse_transform(const at::Tensor& spec, const DcGeometry& g, bool orthonormal);

// Q = T(R(IFFT2_c(M * k0))), R = real part when g.hermitian: the k0 term, device-generic;
// and its adjoint grad_k0 = M FFT2_c(R^H(T^H grad_q)) for images of height x width.
at::Tensor k0_term(const at::Tensor& k0, const at::Tensor& mask, bool centered, bool hermitian);
at::Tensor k0_term_backward(const at::Tensor& grad_q, const at::Tensor& mask, bool centered,
                            bool hermitian, int64_t height, int64_t width);

}  // namespace kdhpc
