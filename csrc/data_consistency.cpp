// Data consistency as dispatcher ops torch.ops.kdhpc.data_consistency_* : schemas, the CPU
// implementation and the Python module init. The CUDA implementation lives in
// data_consistency_cuda.cpp (glue) and cuda/data_consistency_kernels.cu (kernels).
//
// Math (kdhpc/ops/data_consistency.py has the full derivation):
//   out = T^-1( S * T(x) + lam * Q ),  S = 1 - lam * M',  Q = T(R(IFFT2_c(M * k0)))
// T the orthonormal FFT along the axes where the mask varies (rfft when x is real and the
// output is its real part, "hermitian"; then M' is the symmetrised mask), R the real part in
// that case. Q does not change between the cascades of one sample, so it is its own op
// (data_consistency_k0_term) and the per-cascade op uses it only where M' != 0.
//
// CPU strategy: unnormalised MKL FFTs through ATen, one branch-free pass over the spectrum that
// applies the orthonormal scale, S and Q, the inverse FFTs, and a pass that turns -0.0 into
// +0.0. A batch whose spectrum fits one core's L2 is one block (MKL and ATen thread each step); a
// larger one is cut into L2-sized blocks shared by the calling thread and pool helpers (see
// cpu_tiling and for_each_block).

#include "data_consistency.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/fft_fft2.h>
#include <ATen/ops/fft_fftn.h>
#include <ATen/ops/fft_ifft.h>
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
#include <torch/version.h>  // TORCH_VERSION (any torch >= 2.4)
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#if defined(__linux__) && defined(__GNUC__)
// MKL's thread-local thread limit (the C entry point behind mkl_set_num_threads_local; the
// lower-case symbol is the Fortran one, taking a pointer). Weak, so that torch builds without
// MKL load this extension too (then the pointer is null and SequentialMklScope does nothing).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define KDHPC_HAVE_MKL_LOCAL_THREADS 1
#endif

namespace kdhpc {

namespace {

// MKL, behind ATen's CPU FFT, threads each call by itself. For small transforms starting its
// threads costs more than the transform (measured: ~20 ms per call instead of ~10 us on a
// busy 2-core machine), so small problems keep MKL on the calling thread for the scope.
class SequentialMklScope {
 public:
  explicit SequentialMklScope(bool active) {
#ifdef KDHPC_HAVE_MKL_LOCAL_THREADS
    active_ = active && MKL_Set_Num_Threads_Local != nullptr;
    if (active_) previous_ = MKL_Set_Num_Threads_Local(1);
#else
    (void)active;
#endif
  }
  ~SequentialMklScope() {
#ifdef KDHPC_HAVE_MKL_LOCAL_THREADS
    if (active_) MKL_Set_Num_Threads_Local(previous_);  // 0 restores the global setting
#endif
  }
  SequentialMklScope(const SequentialMklScope&) = delete;
  SequentialMklScope& operator=(const SequentialMklScope&) = delete;

 private:
  bool active_ = false;
  int previous_ = 0;
};

// Below this many spectrum bins a call runs on the calling thread only.
constexpr int64_t kSmallSpectrum = int64_t(1) << 16;

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

DcGeometry geometry_of(int64_t n, int64_t h, int64_t w, const at::Tensor& mask, bool centered,
                       bool hermitian, const char* op) {
  TORCH_CHECK(h > 0 && w > 0, op, ": expected an image size H, W > 0, found ", h, " x ", w);
  TORCH_CHECK(mask.dim() == 3, op, ": mask: expected 3 dims [Nm, Hm, Wm], found shape ",
              mask.sizes());
  TORCH_CHECK((mask.size(0) == 1 || mask.size(0) == n) && (mask.size(1) == 1 || mask.size(1) == h) &&
                  (mask.size(2) == 1 || mask.size(2) == w),
              op, ": mask of shape ", mask.sizes(), " does not broadcast to images of shape [",
              n, ", ", h, ", ", w, "]: expected each of its dims to be 1 or the image's");
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
  const double points = double(g.transform_h ? h : 1) * double(g.transform_w ? w : 1);
  g.inv_n = 1.0 / points;
  g.inv_sqrt_n = 1.0 / std::sqrt(points);
  return g;
}

DcGeometry make_geometry(const at::Tensor& x, const at::Tensor& mask, bool centered,
                         bool hermitian, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x: expected 3 dims [N, H, W], found shape ", x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op,
              ": x: expected float32/float64/complex64/complex128, found ", x.scalar_type());
  TORCH_CHECK(mask.scalar_type() == real_type_of(x), op, ": mask: expected dtype ",
              real_type_of(x), " to match x (", x.scalar_type(), "), found ", mask.scalar_type());
  TORCH_CHECK(mask.device() == x.device(), op, ": mask is on ", mask.device(), " but x is on ",
              x.device());
  return geometry_of(x.size(0), x.size(1), x.size(2), mask, centered, hermitian, op);
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

at::ScalarType output_type(const at::Tensor& x, bool hermitian) {
  const auto real_type = real_type_of(x);
  return hermitian ? real_type : c10::toComplexType(real_type);
}

DcGeometry check_backward_operands(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& q, const at::Tensor& mask,
                                   const at::Tensor& lam, bool centered, bool hermitian,
                                   const char* op) {
  const DcGeometry g = make_geometry(x, mask, centered, hermitian, op);
  check_apply_operands(x, q, mask, lam, g, op);
  const auto out_type = output_type(x, hermitian);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == out_type &&
                  grad.device() == x.device(),
              op, ": grad: expected ", out_type, " of shape ", x.sizes(), " on ", x.device(),
              ", found ", grad.scalar_type(), " of shape ", grad.sizes(), " on ", grad.device());
  return g;
}

at::Tensor forward_transform(const at::Tensor& image, const DcGeometry& g, bool orthonormal) {
  const auto dims = transform_dims(g);
  const char* norm = orthonormal ? "ortho" : "backward";  // "backward": no forward scaling
  if (!g.hermitian) return at::fft_fftn(image, std::nullopt, dims, norm);
  if (dims.size() == 2) return at::fft_rfft2(image, std::nullopt, dims, norm);
  return at::fft_rfft(image, std::nullopt, dims[0], norm);
}

at::Tensor inverse_transform(const at::Tensor& spec, const DcGeometry& g, bool orthonormal) {
  const auto dims = transform_dims(g);
  const char* norm = orthonormal ? "ortho" : "forward";   // "forward": no inverse scaling
  if (!g.hermitian) return at::fft_ifftn(spec, std::nullopt, dims, norm);
  if (dims.size() == 2) {
    return at::fft_irfft2(spec, std::vector<int64_t>{g.height, g.width}, dims, norm);
  }
  return at::fft_irfft(spec, dims[0] == 1 ? g.height : g.width, dims[0], norm);
}

at::Tensor k0_term(const at::Tensor& k0, const at::Tensor& mask, bool centered, bool hermitian) {
  const char* op = "kdhpc::data_consistency_k0_term";
  TORCH_CHECK(k0.is_complex(), op, ": k0: expected complex64/complex128, found ",
              k0.scalar_type());
  const DcGeometry g = make_geometry(k0, mask, centered, hermitian, op);
  const std::vector<int64_t> image_dims{1, 2};
  const SequentialMklScope sequential(k0.is_cpu() && g.spec_numel() < kSmallSpectrum);
  // Once per batch, so the shifts stay plain ATen rolls here (the per-cascade op needs none).
  at::Tensor z = k0 * mask;                                   // [N, H, W] complex
  if (centered) z = at::fft_ifftshift(z, image_dims);
  at::Tensor p = at::fft_ifft2(z, std::nullopt, image_dims, "ortho");
  if (centered) p = at::fft_fftshift(p, image_dims);
  if (hermitian) p = at::real(p);
  return forward_transform(p, g, true).contiguous();          // [N, spec_h, spec_w]
}

at::Tensor k0_term_backward(const at::Tensor& grad_q, const at::Tensor& mask, bool centered,
                            bool hermitian, int64_t height, int64_t width) {
  const char* op = "kdhpc::data_consistency_k0_term_backward";
  TORCH_CHECK(grad_q.is_complex() && grad_q.dim() == 3, op,
              ": grad_q: expected a complex [N, spec_h, spec_w] tensor, found ",
              grad_q.scalar_type(), " of shape ", grad_q.sizes());
  TORCH_CHECK(mask.scalar_type() == real_type_of(grad_q) && mask.device() == grad_q.device(),
              op, ": mask: expected ", real_type_of(grad_q), " on ", grad_q.device(), ", found ",
              mask.scalar_type(), " on ", mask.device());
  const DcGeometry g = geometry_of(grad_q.size(0), height, width, mask, centered, hermitian, op);
  TORCH_CHECK(grad_q.size(1) == g.spec_h && grad_q.size(2) == g.spec_w, op,
              ": grad_q: expected the spectrum shape [", g.rows, ", ", g.spec_h, ", ", g.spec_w,
              "], found ", grad_q.sizes());
  const SequentialMklScope sequential(grad_q.is_cpu() && g.spec_numel() < kSmallSpectrum);
  // The adjoint of each step of k0_term in reverse: T, the real part, the centred IFFT2, M.
  at::Tensor image;                                           // [N, H, W] complex
  if (hermitian) {
    // rfft's adjoint is irfft(Z / w): an interior bin also stands for its conjugate mirror,
    // which irfft counts again.
    const int64_t half_dim = g.half_on_w() ? 2 : 1;
    const int64_t points = half_dim == 2 ? width : height;
    at::Tensor z = grad_q * 0.5;
    z.select(half_dim, 0).mul_(2.0);
    if (points % 2 == 0) z.select(half_dim, z.size(half_dim) - 1).mul_(2.0);
    if (g.transform_h && g.transform_w) z = at::fft_ifft(z, std::nullopt, 1, "ortho");
    image = at::fft_irfft(z, points, half_dim, "ortho").to(grad_q.scalar_type());
  } else {
    image = at::fft_ifftn(grad_q, std::nullopt, transform_dims(g), "ortho");
  }
  const std::vector<int64_t> image_dims{1, 2};
  if (centered) image = at::fft_ifftshift(image, image_dims);
  at::Tensor k = at::fft_fft2(image, std::nullopt, image_dims, "ortho");
  if (centered) k = at::fft_fftshift(k, image_dims);
  return k * mask;
}

namespace {

// Blocks the CPU code works on: x viewed as [units, unit_h, W]; block b holds units
// [b * per_block, min(units, (b + 1) * per_block)), which are spectrum lines
// [first unit * unit_spec_h, end unit * unit_spec_h).
struct Tiling {
  int64_t units, unit_h, unit_spec_h, per_block, blocks;
};

// Up to this much spectrum (about one core's L2) a call is one block: the whole batch,
// transformed by MKL's threads and mixed by ATen's. Beyond, blocks of ~512 KiB that stay in L2,
// taken by the caller and pool helpers (for_each_block), win: measured 196 ms against 380 ms for
// 8 x 15 x 640 x 368 complex on 2 cores; for 8 x 1 x 320 x 320 real (3.3 MB of spectrum),
// interleaved minima 1.09 / 1.20 ms (1 thread) and 1.20 / 1.26 ms (2 threads) for 8 blocks /
// one block, and on the loaded machine medians of 6 ms against 27 ms at 2 threads: the OpenMP
// teams of the one-block path wait for descheduled threads, the shared block counter does not.
// 4 x 1 x 256 x 256 real (1 MB) stays one block (0.30 ms against 0.45 ms split in blocks).
constexpr int64_t kBlockedSpectrumBytes = int64_t(2) << 20;

Tiling cpu_tiling(const DcGeometry& g, int64_t spec_element_bytes) {
  if (g.spec_numel() * spec_element_bytes <= kBlockedSpectrumBytes) {
    return {g.rows, g.height, g.spec_h, g.rows, 1};
  }
  if (g.transform_h) return {g.rows, g.height, g.spec_h, 1, g.rows};  // whole images
  // Row-wise FFTs in batches of about 512 KiB of spectrum (a block's image, spectrum and
  // output stay in a core's L2) and at least 8 blocks when there are enough rows, so that
  // threads can share them. Each ATen FFT call plans MKL afresh (~10 us), which bounds how
  // small blocks can usefully be. The blocks depend on the shape only, so results do not
  // depend on the thread count.
  const int64_t units = g.rows * g.height;
  int64_t blocks = (units * g.spec_w * spec_element_bytes + (1 << 19) - 1) >> 19;
  blocks = std::min(units, std::max<int64_t>(blocks, 8));
  const int64_t per_block = (units + blocks - 1) / blocks;
  return {units, 1, 1, per_block, (units + per_block - 1) / per_block};
}

// Runs f(block) for every block: on the calling thread plus up to
// get_num_threads() - 1 helpers from ATen's inter-op pool. Blocks are taken one at a time from a
// shared counter and the caller waits, asleep, only for blocks already taken. Unlike an OpenMP
// team (whose barrier spins and waits for every member), a helper that gets no core on a busy
// machine just finds no work left: measured on the loaded 2-core machine this was written on,
// an OpenMP split took 10 ms where this takes 2.5 ms. Each thread's FFTs run single-threaded.
template <typename F>
void for_each_block(int64_t blocks, const F& f) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex mutex;
    std::condition_variable all_done;
    int64_t done = 0;
    std::exception_ptr error;
  };
  auto shared = std::make_shared<Shared>();
  // A helper that starts after the last block was taken touches only `shared`, never f (which
  // lives on the caller's stack and is alive until every taken block is done).
  auto work = [shared, blocks, &f]() {
    const SequentialMklScope sequential(true);
    for (int64_t b = shared->next++; b < blocks; b = shared->next++) {
      std::exception_ptr error;
      try {
        f(b);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(shared->mutex);
      if (error && !shared->error) shared->error = error;
      if (++shared->done == blocks) shared->all_done.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(blocks, at::get_num_threads()) - 1;
  for (int64_t h = 0; h < helpers; ++h) at::launch(work);
  work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_done.wait(lock, [&] { return shared->done == blocks; });
  if (shared->error) std::rethrow_exception(shared->error);
}

// Per-bin coefficients over [mask_rows, lines, spec_w], "lines" being 1 where neither the mask
// nor the Parseval weight varies along H. Complex bins are (re, im) pairs, so every update is
// a plain loop over reals that the compiler vectorises, with no branch on the mask. The
// spectra X, G are unnormalised, Q orthonormal (see DcGeometry), with [.] = [M' != 0]:
//   scale = (1 - lam M') / n                  forward and backward spectrum scaling
//   take  = lam [.] / sqrt(n)                 the k0 term (Q is rounding noise off the support)
//   grad_q_scale = lam w [.] / sqrt(n)        (w the Parseval weight)
//   lam_q = w [.] / sqrt(n), lam_x = w M' / n the lam gradient sum_k G.(lam_q Q - lam_x X)
template <typename real_t>
struct MixCoefficients {
  std::vector<real_t> scale, take, grad_q_scale, lam_q, lam_x;  // each [rows, lines, 2 * spec_w]
  int64_t lines = 1;
  int64_t offset(const DcGeometry& g, int64_t row, int64_t kh) const {
    return ((g.mask_rows == 1 ? 0 : row) * lines + (lines == 1 ? 0 : kh)) * 2 * g.spec_w;
  }
};

template <typename real_t>
MixCoefficients<real_t> mix_coefficients(const at::Tensor& mask, const DcGeometry& g,
                                         real_t lam, bool backward) {
  MixCoefficients<real_t> c;
  c.lines = (g.mask_h == 1 && !g.half_on_h()) ? 1 : g.spec_h;
  const int64_t size = g.mask_rows * c.lines * 2 * g.spec_w;
  c.scale.resize(size);
  c.take.resize(size);
  if (backward) {
    c.grad_q_scale.resize(size);
    c.lam_q.resize(size);
    c.lam_x.resize(size);
  }
  const real_t* m = mask.data_ptr<real_t>();
  for (int64_t r = 0; r < g.mask_rows; ++r) {
    for (int64_t kh = 0; kh < c.lines; ++kh) {
      const int64_t o = c.offset(g, r, kh);
      for (int64_t kw = 0; kw < g.spec_w; ++kw) {
        const real_t mk = spectral_mask(m, g, r, kh, kw);
        const real_t on = mk != real_t(0) ? real_t(1) : real_t(0);
        const real_t w = static_cast<real_t>(parseval_weight(g, kh, kw));
        const real_t inv_n = static_cast<real_t>(g.inv_n);
        const real_t inv_sqrt_n = static_cast<real_t>(g.inv_sqrt_n);
        for (int64_t part = 2 * kw; part < 2 * kw + 2; ++part) {
          c.scale[o + part] = (real_t(1) - lam * mk) * inv_n;
          c.take[o + part] = lam * on * inv_sqrt_n;
          if (backward) {
            c.grad_q_scale[o + part] = lam * w * on * inv_sqrt_n;
            c.lam_q[o + part] = w * on * inv_sqrt_n;
            c.lam_x[o + part] = w * mk * inv_n;
          }
        }
      }
    }
  }
  return c;
}

// spec <- scale * spec + take * q on spectrum lines [line_begin, line_end). spec points at
// line_begin's first real, q at the whole Q; both are (re, im) pairs.
template <typename real_t>
void mix_forward(real_t* spec, const real_t* q, const MixCoefficients<real_t>& c,
                 const DcGeometry& g, int64_t line_begin, int64_t line_end) {
  const int64_t n = 2 * g.spec_w;
  for (int64_t line = line_begin; line < line_end; ++line) {
    const int64_t o = c.offset(g, line / g.spec_h, line % g.spec_h);
    const real_t* scale = c.scale.data() + o;
    const real_t* take = c.take.data() + o;
    real_t* s = spec + (line - line_begin) * n;
    const real_t* ql = q + line * n;
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] * scale[j] + ql[j] * take[j];
  }
}

// The backward pass over the same lines, from G = T(grad) (see MixCoefficients): returns this
// block's lam-gradient sum (when x_spec is given), writes grad_q (when given) and scales G by
// (1 - lam M') / n (when scale_g; then grad_x = T^-1 G with an unnormalised inverse).
template <typename real_t>
double mix_backward(real_t* g_spec, const real_t* x_spec, const real_t* q, real_t* grad_q,
                    const MixCoefficients<real_t>& c, const DcGeometry& g, int64_t line_begin,
                    int64_t line_end, bool scale_g) {
  const int64_t n = 2 * g.spec_w;
  double lam_grad = 0.0;
  for (int64_t line = line_begin; line < line_end; ++line) {
    const int64_t o = c.offset(g, line / g.spec_h, line % g.spec_h);
    real_t* gl = g_spec + (line - line_begin) * n;
    const real_t* ql = q + line * n;
    if (x_spec) {
      const real_t* xl = x_spec + (line - line_begin) * n;
      const real_t* lam_q = c.lam_q.data() + o;
      const real_t* lam_x = c.lam_x.data() + o;
      double acc = 0.0;
      for (int64_t j = 0; j < n; ++j) acc += gl[j] * (lam_q[j] * ql[j] - lam_x[j] * xl[j]);
      lam_grad += acc;
    }
    if (grad_q) {
      const real_t* k = c.grad_q_scale.data() + o;
      real_t* gq = grad_q + line * n;
      for (int64_t j = 0; j < n; ++j) gq[j] = gl[j] * k[j];
    }
    if (scale_g) {
      const real_t* scale = c.scale.data() + o;
      for (int64_t j = 0; j < n; ++j) gl[j] *= scale[j];
    }
  }
  return lam_grad;
}

// Spectrum lines per parallel chunk of the single-block mix passes; the lam gradient is summed
// per chunk (or per block) and those in order, so it does not depend on the number of threads.
constexpr int64_t kLinesPerChunk = 64;

// Runs pass(line_begin, line_end, part) over lines [begin, end): split across ATen's threads
// in chunks of kLinesPerChunk when `parallel`, else at once as part 0.
template <typename F>
void over_lines(int64_t begin, int64_t end, bool parallel, const F& pass) {
  if (!parallel) return pass(begin, end, 0);
  const int64_t chunks = (end - begin + kLinesPerChunk - 1) / kLinesPerChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      pass(begin + c * kLinesPerChunk, std::min(end, begin + (c + 1) * kLinesPerChunk), c);
    }
  });
}

// data <- data + 0.0 in place: -0.0 becomes +0.0, everything else is unchanged (there is no
// -ffast-math here, so the + 0.0 is not folded away).
template <typename real_t>
void make_zeros_positive(at::Tensor& t) {
  real_t* p = reinterpret_cast<real_t*>(t.data_ptr());
  const int64_t n = t.numel() * (t.is_complex() ? 2 : 1);
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) p[i] = p[i] + real_t(0);
  });
}

// dst <- src + 0.0: a block's copy out of the FFT's buffer also turns -0.0 into +0.0.
template <typename real_t>
void copy_zeros_positive(real_t* dst, const at::Tensor& src) {
  const at::Tensor s = src.contiguous();
  const real_t* from = reinterpret_cast<const real_t*>(s.data_ptr());
  const int64_t n = s.numel() * (s.is_complex() ? 2 : 1);
  for (int64_t i = 0; i < n; ++i) dst[i] = from[i] + real_t(0);
}

at::Tensor apply_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& mask,
                     const at::Tensor& lam, bool centered, bool hermitian) {
  const char* op = "kdhpc::data_consistency_apply";
  const DcGeometry g = make_geometry(x, mask, centered, hermitian, op);
  check_apply_operands(x, q, mask, lam, g, op);
  const at::Tensor xc = x.contiguous(), qc = q.contiguous(), mc = mask.contiguous();
  const SequentialMklScope sequential(g.spec_numel() < kSmallSpectrum);
  const Tiling t = cpu_tiling(g, qc.element_size());
  const at::Tensor x_units = xc.view({t.units, t.unit_h, g.width});
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(real_type_of(x), "data_consistency_apply_cpu", [&] {
    const auto coef = mix_coefficients<scalar_t>(mc, g, lam.item<scalar_t>(), false);
    const scalar_t* q_ptr = reinterpret_cast<const scalar_t*>(qc.data_ptr());
    // Units [s, e) through T, the mix and T^-1; the result is the block's output.
    const auto block = [&](int64_t s, int64_t e, bool parallel) {
      at::Tensor spec = forward_transform(x_units.slice(0, s, e), g, false).contiguous();
      scalar_t* sp = reinterpret_cast<scalar_t*>(spec.data_ptr());
      const int64_t first = s * t.unit_spec_h;
      over_lines(first, e * t.unit_spec_h, parallel, [&](int64_t b, int64_t l, int64_t) {
        mix_forward(sp + (b - first) * 2 * g.spec_w, q_ptr, coef, g, b, l);
      });
      return inverse_transform(spec, g, false).contiguous();
    };
    if (t.blocks == 1) {
      out = block(0, t.units, true).view(x.sizes());                       // [N, H, W]
      make_zeros_positive<scalar_t>(out);
      return;
    }
    out = at::empty(x.sizes(), x.options().dtype(output_type(x, hermitian)));
    scalar_t* out_ptr = reinterpret_cast<scalar_t*>(out.data_ptr());
    const int64_t unit_reals = t.unit_h * g.width * (hermitian ? 1 : 2);
    for_each_block(t.blocks, [&](int64_t blk) {
      const int64_t s = blk * t.per_block, e = std::min(t.units, s + t.per_block);
      copy_zeros_positive(out_ptr + s * unit_reals, block(s, e, false));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> apply_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& q, const at::Tensor& mask,
    const at::Tensor& lam, bool centered, bool hermitian, std::array<bool, 3> needs) {
  const DcGeometry g = check_backward_operands(grad, x, q, mask, lam, centered, hermitian,
                                               "kdhpc::data_consistency_apply_backward");
  const bool need_x = needs[0], need_q = needs[1], need_lam = needs[2];
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), qc = q.contiguous(),
                   mc = mask.contiguous();
  const SequentialMklScope sequential(g.spec_numel() < kSmallSpectrum);
  const Tiling t = cpu_tiling(g, qc.element_size());
  const at::Tensor g_units = gc.view({t.units, t.unit_h, g.width});
  const at::Tensor x_units = xc.view({t.units, t.unit_h, g.width});
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_q = need_q ? at::empty_like(qc) : at::empty({0}, q.options());
  const int64_t lines = g.rows * g.spec_h;
  const int64_t parts = t.blocks == 1 ? (lines + kLinesPerChunk - 1) / kLinesPerChunk : t.blocks;
  std::vector<double> lam_partials(parts, 0.0);
  AT_DISPATCH_FLOATING_TYPES(real_type_of(x), "data_consistency_apply_backward_cpu", [&] {
    const auto coef = mix_coefficients<scalar_t>(mc, g, lam.item<scalar_t>(), true);
    const scalar_t* q_ptr = reinterpret_cast<const scalar_t*>(qc.data_ptr());
    scalar_t* grad_q_ptr = need_q ? reinterpret_cast<scalar_t*>(grad_q.data_ptr()) : nullptr;
    // Units [s, e): G = T(grad), the backward mix, and T^-1 G (the block's grad_x) if needed.
    const auto block = [&](int64_t s, int64_t e, bool parallel, int64_t part0) {
      at::Tensor g_spec = forward_transform(g_units.slice(0, s, e), g, false).contiguous();
      at::Tensor x_spec;
      if (need_lam) x_spec = forward_transform(x_units.slice(0, s, e), g, false).contiguous();
      scalar_t* gs = reinterpret_cast<scalar_t*>(g_spec.data_ptr());
      const scalar_t* xs =
          need_lam ? reinterpret_cast<const scalar_t*>(x_spec.data_ptr()) : nullptr;
      const int64_t first = s * t.unit_spec_h;
      over_lines(first, e * t.unit_spec_h, parallel, [&](int64_t b, int64_t l, int64_t part) {
        const int64_t offset = (b - first) * 2 * g.spec_w;
        lam_partials[part0 + part] = mix_backward(gs + offset, xs ? xs + offset : nullptr,
                                                  q_ptr, grad_q_ptr, coef, g, b, l, need_x);
      });
      return need_x ? inverse_transform(g_spec, g, false).contiguous() : at::Tensor();
    };
    if (t.blocks == 1) {
      at::Tensor image = block(0, t.units, true, 0);
      if (need_x) grad_x = image.view(x.sizes());
      return;
    }
    if (need_x) grad_x = at::empty(x.sizes(), x.options().dtype(output_type(x, hermitian)));
    scalar_t* grad_x_ptr = need_x ? reinterpret_cast<scalar_t*>(grad_x.data_ptr()) : nullptr;
    const int64_t unit_reals = t.unit_h * g.width * (hermitian ? 1 : 2);
    for_each_block(t.blocks, [&](int64_t blk) {
      const int64_t s = blk * t.per_block, e = std::min(t.units, s + t.per_block);
      at::Tensor image = block(s, e, false, blk);
      if (need_x) copy_zeros_positive(grad_x_ptr + s * unit_reals, image);
    });
  });
  if (need_x && !hermitian && !x.is_complex()) grad_x = at::real(grad_x).contiguous();
  at::Tensor grad_lam = at::empty({0}, lam.options());
  if (need_lam) {
    double total = 0.0;
    for (double p : lam_partials) total += p;  // in a fixed order: independent of threads
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
      "data_consistency_k0_term_backward(Tensor grad_q, Tensor mask, bool centered, "
      "bool hermitian, int height, int width) -> Tensor",
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
  m.impl("data_consistency_k0_term_backward", &kdhpc::k0_term_backward);
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
