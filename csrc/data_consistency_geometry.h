// Index arithmetic of the data-consistency op, shared by the C++ (CPU) code and the CUDA kernels.
//
// Plain C++ with no PyTorch include, so that csrc/cuda/*.cu compiles with nvcc alone.
//
// Conventions (see kdhpc/ops/data_consistency.py for the formulas):
// - Images are [rows, H, W] (rows = the flattened leading dims of x); the mask is
//   [mask_rows, mask_h, mask_w] with mask_rows in {1, rows}, mask_h in {1, H}, mask_w in {1, W}.
// - Axes where the mask varies are transformed; a 1-D Cartesian mask [1, W] means 1-D FFTs
//   along W only, [H, 1] along H only, [H, W] a 2-D FFT. A 1 x 1 mask transforms along W.
// - Spectra are unshifted (DC at index 0). A centred mask (fastMRI) is read through an
//   ifftshift of its indices: the image-side shifts of the centred FFT cancel in
//   IFFT(D * FFT(x)) for any size, even or odd, so only the mask moves.
// - "hermitian": real image and real-part output. Then Re(IFFT(D FFT x)) = IFFT(Dsym FFT x)
//   with Dsym(k) = (D(k) + D(-k)) / 2, and the last transformed axis keeps its half spectrum
//   (rfft); spec_h / spec_w are the spectrum sizes.
// - The per-cascade transforms are unnormalised; the mix pass applies the orthonormal scale
//   (inv_n for a forward-inverse pair, inv_sqrt_n against the orthonormal k0 term), which saves
//   the FFT library's two separate scaling passes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KDHPC_HOST_DEVICE __host__ __device__ inline
#else
#define KDHPC_HOST_DEVICE inline
#endif

namespace kdhpc {

struct DcGeometry {
  int64_t rows;                      // N, flattened leading dims of x
  int64_t height, width;             // H, W of the image
  int64_t spec_h, spec_w;            // spectrum sizes (H or H/2+1, W or W/2+1)
  int64_t mask_rows, mask_h, mask_w; // raw mask sizes, each 1 or the full size
  bool centered;                     // mask given in fastMRI's centred layout
  bool hermitian;                    // real image and real output: half spectrum, Dsym
  bool transform_h, transform_w;     // which axes are Fourier-transformed
  double inv_n, inv_sqrt_n;          // 1 / n and 1 / sqrt(n), n = points per transform

  KDHPC_HOST_DEVICE int64_t spec_numel() const { return rows * spec_h * spec_w; }
  // The axis that holds the half spectrum in the hermitian case: W, or H for [H, 1] masks.
  KDHPC_HOST_DEVICE bool half_on_w() const { return hermitian && transform_w; }
  KDHPC_HOST_DEVICE bool half_on_h() const { return hermitian && !transform_w; }
};

// Raw mask index of unshifted frequency k (0 <= k < n) on an axis of length n (mask extent
// mask_n): ifftshift's index map, written without a division (it runs once per bin on the GPU).
KDHPC_HOST_DEVICE int64_t mask_axis_index(int64_t k, int64_t n, int64_t mask_n, bool centered) {
  if (mask_n == 1) return 0;
  if (!centered) return k;
  const int64_t shifted = k + n / 2;
  return shifted >= n ? shifted - n : shifted;
}

// The mask as the spectrum sees it: M(kh, kw) in unshifted layout, or its Hermitian
// symmetrisation (M(k) + M(-k)) / 2 when g.hermitian. kh / kw are spectrum indices; on an axis
// that is not transformed the mask has extent 1, so the index does not matter.
template <typename real_t>
KDHPC_HOST_DEVICE real_t spectral_mask(const real_t* mask, const DcGeometry& g, int64_t row,
                                       int64_t kh, int64_t kw) {
  const real_t* m = mask + (g.mask_rows == 1 ? 0 : row) * g.mask_h * g.mask_w;
  const real_t direct = m[mask_axis_index(kh, g.height, g.mask_h, g.centered) * g.mask_w +
                          mask_axis_index(kw, g.width, g.mask_w, g.centered)];
  if (!g.hermitian) return direct;
  const int64_t mh = kh == 0 ? 0 : g.height - kh;
  const int64_t mw = kw == 0 ? 0 : g.width - kw;
  const real_t mirrored = m[mask_axis_index(mh, g.height, g.mask_h, g.centered) * g.mask_w +
                            mask_axis_index(mw, g.width, g.mask_w, g.centered)];
  return (direct + mirrored) * real_t(0.5);
}

// Parseval weight of a half-spectrum bin: interior bins stand for themselves and their
// conjugate mirror (2), the DC and (even n) Nyquist bins only for themselves (1).
KDHPC_HOST_DEVICE int parseval_weight(const DcGeometry& g, int64_t kh, int64_t kw) {
  if (g.half_on_w()) return (kw == 0 || 2 * kw == g.width) ? 1 : 2;
  if (g.half_on_h()) return (kh == 0 || 2 * kh == g.height) ? 1 : 2;
  return 1;
}

}  // namespace kdhpc
