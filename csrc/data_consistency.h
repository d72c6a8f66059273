// The data-consistency op's C++ pieces shared by the CPU code (data_consistency.cpp) and the
// CUDA glue (data_consistency_cuda.cpp). Formulas: kdhpc/ops/data_consistency.py.
#pragma once

#include <ATen/core/Tensor.h>

#include "data_consistency_geometry.h"

namespace kdhpc {

// Checks x [N, H, W], mask [Nm, Hm, Wm] and the flags; describes the transform they imply.
DcGeometry make_geometry(const at::Tensor& x, const at::Tensor& mask, bool centered,
                         bool hermitian, const char* op);

// Checks q [N, spec_h, spec_w] (complex, x's precision) and lam (0-dim, x's real dtype) against
// x and mask: same device, matching dtypes and shapes.
void check_apply_operands(const at::Tensor& x, const at::Tensor& q, const at::Tensor& mask,
                          const at::Tensor& lam, const DcGeometry& g, const char* op);

// Orthonormal transform T of images [r, h, W] along the axes g transforms (rfft along the half
// axis when g.hermitian), and its inverse written into out [r, h, W]. For the row-wise
// W-only case r, h may be a [rows * H, 1] view.
at::Tensor forward_transform(const at::Tensor& image, const DcGeometry& g);
void inverse_transform_out(at::Tensor& out, const at::Tensor& spec, const DcGeometry& g);

// Q = T(R(IFFT2_c(M * k0))), R = real part when g.hermitian: the k0 term, device-generic.
at::Tensor k0_term(const at::Tensor& k0, const at::Tensor& mask, bool centered, bool hermitian);

}  // namespace kdhpc
