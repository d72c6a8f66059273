// Data consistency as dispatcher ops torch.ops.kdhpc.data_consistency_* : schemas, the CPU
// implementation and the Python module init. The CUDA implementation lives in
// data_consistency_cuda.cpp (glue) and cuda/data_consistency_kernels.cu (kernels).
//
// Math (kdhpc/ops/data_consistency.py has the full derivation):
//   out = T^-1( S * T(x) + lam * Q ),  S = 1 - lam * M',  Q = T(R(IFFT2_c(M * k0)))
// T the orthonormal FFT along the axes where the mask varies (rfft when x is real and the
// output is its real part, "hermitian"; then M' is the symmetrised mask), R the real part in
// that case. Q does not change between the cascades of one sample, so it is its own op
// (data_consistency_k0_term) and the per-cascade op reads it only where M' != 0.
//
// CPU strategy: the image is cut into cache-sized blocks (rows of the image for 1-D masks along
// W, whole images otherwise); each thread transforms a block, applies S and Q in one pass over
// its spectrum while it is in cache, transforms it back into the output and turns -0.0 into
// +0.0. Blocks are fixed by the shape, not by the thread count, so results (and the lam
// gradient's sum) do not depend on the number of threads.

#include "data_consistency.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/fft_fftn.h>
#include <ATen/ops/fft_fftshift.h>
#include <ATen/ops/fft_ifft2.h>
#include <ATen/ops/fft_ifftn.h>
#include <ATen/ops/fft_ifftshift.h>
#include <ATen/ops/fft_irfft.h>
#include <ATen/ops/fft_irfft2.h>
#include <ATen/ops/fft_rfft.h>
#include <ATen/ops/fft_rfft2.h>
#include <ATen/ops/real.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

namespace kdhpc {

namespace {

at::ScalarType real_type_of(const at::Tensor& t) { return c10::toRealValueType(t.scalar_type()); }

bool is_supported_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kComplexFloat ||
         s == at::kComplexDouble;
}

std::vector<int64_t> transform_dims(const DcGeometry& g) {
  if (g.transform_h && g.transform_w) return {1, 2};
  if (g.transform_h) return {1};
  return {2};
}

}  // namespace

DcGeometry make_geometry(const at::Tensor& x, const at::Tensor& mask, bool centered,
                         bool hermitian, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x: expected 3 dims [N, H, W], found shape ", x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op,
              ": x: expected float32/float64/complex64/complex128, found ", x.scalar_type());
  TORCH_CHECK(mask.dim() == 3, op, ": mask: expected 3 dims [Nm, Hm, Wm], found shape ",
              mask.sizes());
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2);
  TORCH_CHECK(h > 0 && w > 0, op, ": x: expected H, W > 0, found shape ", x.sizes());
  TORCH_CHECK((mask.size(0) == 1 || mask.size(0) == n) && (mask.size(1) == 1 || mask.size(1) == h) &&
                  (mask.size(2) == 1 || mask.size(2) == w),
              op, ": mask of shape ", mask.sizes(), " does not broadcast to x of shape ",
              x.sizes(), ": expected each of its dims to be 1 or x's");
  TORCH_CHECK(mask.scalar_type() == real_type_of(x), op, ": mask: expected dtype ",
              real_type_of(x), " to match x (", x.scalar_type(), "), found ", mask.scalar_type());
  TORCH_CHECK(mask.device() == x.device(), op, ": mask is on ", mask.device(), " but x is on ",
              x.device());
  DcGeometry g{};
  g.rows = n;
  g.height = h;
  g.width = w;
  g.mask_rows = mask.size(0);
  g.mask_h = mask.size(1);
  g.mask_w = mask.size(2);
  g.centered = centered;
  g.hermitian = hermitian;
  g.transform_h = mask.size(1) > 1;
  g.transform_w = mask.size(2) > 1 || mask.size(1) == 1;
  g.spec_h = g.half_on_h() ? h / 2 + 1 : h;
  g.spec_w = g.half_on_w() ? w / 2 + 1 : w;
  return g;
}

void check_apply_operands(const at::Tensor& x, const at::Tensor& q, const at::Tensor& mask,
                          const at::Tensor& lam, const DcGeometry& g, const char* op) {
  TORCH_CHECK(!g.hermitian || !x.is_complex(), op,
              ": hermitian=True needs a real x, found ", x.scalar_type());
  const auto complex_type = c10::toComplexType(real_type_of(x));
  TORCH_CHECK(q.scalar_type() == complex_type, op, ": q: expected dtype ", complex_type,
              " to match x (", x.scalar_type(), "), found ", q.scalar_type());
  TORCH_CHECK(q.dim() == 3 && q.size(0) == g.rows && q.size(1) == g.spec_h &&
                  q.size(2) == g.spec_w,
              op, ": q: expected the spectrum shape [", g.rows, ", ", g.spec_h, ", ", g.spec_w,
              "] (from data_consistency_k0_term with the same mask and flags), found ",
              q.sizes());
  TORCH_CHECK(lam.dim() == 0 && lam.scalar_type() == real_type_of(x), op,
              ": lam: expected a 0-dim ", real_type_of(x), " tensor, found ", lam.scalar_type(),
              " of shape ", lam.sizes());
  for (const auto* t : {&q, &lam}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", (t == &q ? "q" : "lam"), " is on ",
                t->device(), " but x is on ", x.device());
  }
  (void)mask;
}

at::Tensor forward_transform(const at::Tensor& image, const DcGeometry& g) {
  const auto dims = transform_dims(g);
  if (!g.hermitian) return at::fft_fftn(image, std::nullopt, dims, "ortho");
  if (dims.size() == 2) return at::fft_rfft2(image, std::nullopt, dims, "ortho");
  return at::fft_rfft(image, std::nullopt, dims[0], "ortho");
}

void inverse_transform_out(at::Tensor& out, const at::Tensor& spec, const DcGeometry& g) {
  const auto dims = transform_dims(g);
  if (!g.hermitian) {
    at::fft_ifftn_out(out, spec, std::nullopt, dims, "ortho");
  } else if (dims.size() == 2) {
    at::fft_irfft2_out(out, spec, std::vector<int64_t>{g.height, g.width}, dims, "ortho");
  } else {
    at::fft_irfft_out(out, spec, dims[0] == 1 ? g.height : g.width, dims[0], "ortho");
  }
}

at::Tensor k0_term(const at::Tensor& k0, const at::Tensor& mask, bool centered, bool hermitian) {
  const char* op = "kdhpc::data_consistency_k0_term";
  TORCH_CHECK(k0.is_complex(), op, ": k0: expected complex64/complex128, found ",
              k0.scalar_type());
  const DcGeometry g = make_geometry(k0, mask, centered, hermitian, op);
  const std::vector<int64_t> image_dims{1, 2};
  // Once per batch, so the shifts stay plain ATen rolls here (the per-cascade op needs none).
  at::Tensor z = k0 * mask;                                   // [N, H, W] complex
  if (centered) z = at::fft_ifftshift(z, image_dims);
  at::Tensor p = at::fft_ifft2(z, std::nullopt, image_dims, "ortho");
  if (centered) p = at::fft_fftshift(p, image_dims);
  if (hermitian) p = at::real(p);
  return forward_transform(p, g).contiguous();                // [N, spec_h, spec_w]
}

namespace {

// Blocks the CPU code works on: `units` blocks of `unit_h` image rows (x viewed as
// [units, unit_h, W]); each covers unit_spec_h spectrum lines of spec_w bins.
struct Tiling {
  int64_t units, unit_h, unit_spec_h, per_block;
  int64_t blocks() const { return (units + per_block - 1) / per_block; }
};

Tiling cpu_tiling(const DcGeometry& g) {
  if (g.transform_h) return {g.rows, g.height, g.spec_h, 1};
  // Row-wise FFTs: enough rows per block to amortise the per-call cost, few enough that the
  // block's image, spectrum and output stay in a core's L2.
  const int64_t rows_per_block = std::max<int64_t>(1, 24576 / g.spec_w);
  return {g.rows * g.height, 1, 1, rows_per_block};
}

// M' over the spectrum, [mask_rows, mh, mw] with mh / mw = 1 where the mask does not vary.
template <typename real_t>
struct SpectralMask {
  std::vector<real_t> values;
  int64_t mh, mw;
  const real_t* line(const DcGeometry& g, int64_t row, int64_t kh) const {
    return values.data() + ((g.mask_rows == 1 ? 0 : row) * mh + (mh == 1 ? 0 : kh)) * mw;
  }
};

template <typename real_t>
SpectralMask<real_t> spectral_mask_table(const at::Tensor& mask, const DcGeometry& g) {
  SpectralMask<real_t> table;
  table.mh = g.mask_h == 1 ? 1 : g.spec_h;
  table.mw = g.mask_w == 1 ? 1 : g.spec_w;
  table.values.resize(g.mask_rows * table.mh * table.mw);
  const real_t* m = mask.data_ptr<real_t>();
  for (int64_t r = 0; r < g.mask_rows; ++r)
    for (int64_t a = 0; a < table.mh; ++a)
      for (int64_t b = 0; b < table.mw; ++b)
        table.values[(r * table.mh + a) * table.mw + b] = spectral_mask(m, g, r, a, b);
  return table;
}

// spec <- (1 - lam M') spec + lam Q on spectrum lines [line_begin, line_end); spec points at
// line_begin, q at the whole Q. Bins with M' = 0 are left alone (S = 1 there, Q = 0).
template <typename real_t>
void mix_forward(c10::complex<real_t>* spec, const c10::complex<real_t>* q,
                 const SpectralMask<real_t>& table, real_t lam, const DcGeometry& g,
                 int64_t line_begin, int64_t line_end) {
  for (int64_t line = line_begin; line < line_end; ++line) {
    const real_t* m = table.line(g, line / g.spec_h, line % g.spec_h);
    c10::complex<real_t>* s = spec + (line - line_begin) * g.spec_w;
    const c10::complex<real_t>* ql = q + line * g.spec_w;
    const int64_t m_step = table.mw == 1 ? 0 : 1;
    for (int64_t b = 0; b < g.spec_w; ++b) {
      const real_t mb = m[b * m_step];
      if (mb != real_t(0)) s[b] = s[b] * (real_t(1) - lam * mb) + ql[b] * lam;
    }
  }
}

// The backward pass over the same lines, from G = T(grad):
//   returns sum_k w_k Re(conj(G_k) (Q_k - M'_k X_k))    (the lam gradient, Parseval weights w)
//   grad_q <- lam w G on the support of M', 0 elsewhere  (when grad_q is given)
//   G <- (1 - lam M') G                                   (when scale_g: then grad_x = T^-1 G)
template <typename real_t>
double mix_backward(c10::complex<real_t>* g_spec, const c10::complex<real_t>* x_spec,
                    const c10::complex<real_t>* q, c10::complex<real_t>* grad_q,
                    const SpectralMask<real_t>& table, real_t lam, const DcGeometry& g,
                    int64_t line_begin, int64_t line_end, bool scale_g) {
  double lam_grad = 0.0;
  for (int64_t line = line_begin; line < line_end; ++line) {
    const int64_t kh = line % g.spec_h;
    const real_t* m = table.line(g, line / g.spec_h, kh);
    const int64_t local = (line - line_begin) * g.spec_w;
    const int64_t m_step = table.mw == 1 ? 0 : 1;
    for (int64_t b = 0; b < g.spec_w; ++b) {
      const real_t mb = m[b * m_step];
      const c10::complex<real_t> gk = g_spec[local + b];
      if (mb == real_t(0)) {
        if (grad_q) grad_q[line * g.spec_w + b] = c10::complex<real_t>(0, 0);
        continue;
      }
      const real_t w = static_cast<real_t>(parseval_weight(g, kh, b));
      if (x_spec) {
        const c10::complex<real_t> d = q[line * g.spec_w + b] - x_spec[local + b] * mb;
        lam_grad += static_cast<double>(w * (gk.real() * d.real() + gk.imag() * d.imag()));
      }
      if (grad_q) grad_q[line * g.spec_w + b] = gk * (lam * w);
      if (scale_g) g_spec[local + b] = gk * (real_t(1) - lam * mb);
    }
  }
  return lam_grad;
}

// x + 0.0 is +0.0 for x = -0.0 and x otherwise (no -ffast-math here, so it is not folded).
template <typename real_t>
void make_zeros_positive(at::Tensor& block) {
  real_t* p = reinterpret_cast<real_t*>(block.data_ptr());
  const int64_t n = block.numel() * (block.is_complex() ? 2 : 1);
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] + real_t(0);
}

at::Tensor apply_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& mask,
                     const at::Tensor& lam, bool centered, bool hermitian) {
  const char* op = "kdhpc::data_consistency_apply";
  const DcGeometry g = make_geometry(x, mask, centered, hermitian, op);
  check_apply_operands(x, q, mask, lam, g, op);
  const at::Tensor xc = x.contiguous(), qc = q.contiguous(), mc = mask.contiguous();
  const auto real_type = real_type_of(x);
  at::Tensor out = at::empty(
      x.sizes(), x.options().dtype(hermitian ? real_type : c10::toComplexType(real_type)));
  const Tiling t = cpu_tiling(g);
  const at::Tensor x_units = xc.view({t.units, t.unit_h, g.width});
  const at::Tensor out_units = out.view({t.units, t.unit_h, g.width});
  AT_DISPATCH_FLOATING_TYPES(real_type, "data_consistency_apply_cpu", [&] {
    using complex_t = c10::complex<scalar_t>;
    const SpectralMask<scalar_t> table = spectral_mask_table<scalar_t>(mc, g);
    const scalar_t lam_value = lam.item<scalar_t>();
    const complex_t* q_ptr = qc.data_ptr<complex_t>();
    at::parallel_for(0, t.blocks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t s = blk * t.per_block, e = std::min(t.units, s + t.per_block);
        at::Tensor spec = forward_transform(x_units.slice(0, s, e), g).contiguous();
        mix_forward(spec.data_ptr<complex_t>(), q_ptr, table, lam_value, g, s * t.unit_spec_h,
                    e * t.unit_spec_h);
        at::Tensor out_block = out_units.slice(0, s, e);
        inverse_transform_out(out_block, spec, g);
        make_zeros_positive<scalar_t>(out_block);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> apply_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& q, const at::Tensor& mask,
    const at::Tensor& lam, bool centered, bool hermitian, std::array<bool, 3> needs) {
  const char* op = "kdhpc::data_consistency_apply_backward";
  const DcGeometry g = make_geometry(x, mask, centered, hermitian, op);
  check_apply_operands(x, q, mask, lam, g, op);
  const auto real_type = real_type_of(x);
  const auto out_type = hermitian ? real_type : c10::toComplexType(real_type);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == out_type, op,
              ": grad: expected ", out_type, " of shape ", x.sizes(), ", found ",
              grad.scalar_type(), " of shape ", grad.sizes());
  const auto [need_x, need_q, need_lam] = needs;
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), qc = q.contiguous(),
                   mc = mask.contiguous();
  at::Tensor grad_x = need_x ? at::empty(x.sizes(), x.options().dtype(out_type))
                             : at::empty({0}, x.options());
  at::Tensor grad_q = need_q ? at::empty_like(qc) : at::empty({0}, q.options());
  const Tiling t = cpu_tiling(g);
  const at::Tensor g_units = gc.view({t.units, t.unit_h, g.width});
  const at::Tensor x_units = xc.view({t.units, t.unit_h, g.width});
  std::vector<double> lam_partials(t.blocks(), 0.0);
  AT_DISPATCH_FLOATING_TYPES(real_type, "data_consistency_apply_backward_cpu", [&] {
    using complex_t = c10::complex<scalar_t>;
    const SpectralMask<scalar_t> table = spectral_mask_table<scalar_t>(mc, g);
    const scalar_t lam_value = lam.item<scalar_t>();
    const complex_t* q_ptr = qc.data_ptr<complex_t>();
    complex_t* grad_q_ptr = need_q ? grad_q.data_ptr<complex_t>() : nullptr;
    at::parallel_for(0, t.blocks(), 1, [&](int64_t first, int64_t last) {
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t s = blk * t.per_block, e = std::min(t.units, s + t.per_block);
        at::Tensor g_spec = forward_transform(g_units.slice(0, s, e), g).contiguous();
        at::Tensor x_spec;
        if (need_lam) x_spec = forward_transform(x_units.slice(0, s, e), g).contiguous();
        lam_partials[blk] = mix_backward(
            g_spec.data_ptr<complex_t>(), need_lam ? x_spec.data_ptr<complex_t>() : nullptr,
            q_ptr, grad_q_ptr, table, lam_value, g, s * t.unit_spec_h, e * t.unit_spec_h,
            need_x);
        if (need_x) {
          at::Tensor gx_block = grad_x.view({t.units, t.unit_h, g.width}).slice(0, s, e);
          inverse_transform_out(gx_block, g_spec, g);
        }
      }
    });
  });
  if (need_x && !hermitian && !x.is_complex()) grad_x = at::real(grad_x).contiguous();
  at::Tensor grad_lam = at::empty({0}, lam.options());
  if (need_lam) {
    double total = 0.0;
    for (double p : lam_partials) total += p;  // in block order: independent of threads
    grad_lam = at::scalar_tensor(total, lam.options());
  }
  return {grad_x, grad_q, grad_lam};
}

}  // namespace

}  // namespace kdhpc

TORCH_LIBRARY_FRAGMENT(kdhpc, m) {
  m.def(
      "data_consistency_k0_term(Tensor k0, Tensor mask, bool centered, bool hermitian) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "data_consistency_apply(Tensor x, Tensor q, Tensor mask, Tensor lam, bool centered, "
      "bool hermitian) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "data_consistency_apply_backward(Tensor grad, Tensor x, Tensor q, Tensor mask, Tensor lam, "
      "bool centered, bool hermitian, bool[3] needs) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(kdhpc, CPU, m) {
  m.impl("data_consistency_k0_term", &kdhpc::k0_term);
  m.impl("data_consistency_apply", &kdhpc::apply_cpu);
  m.impl("data_consistency_apply_backward", &kdhpc::apply_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() =
      "kdhpc's C++/CUDA extension: registers torch.ops.kdhpc.data_consistency_* on import";
  module.attr("torch_version") = TORCH_VERSION;
#ifdef KDHPC_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
