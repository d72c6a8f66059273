// CUDA kernels of the data-consistency op (interface and conventions: the .cuh). The FFTs are
// unnormalised cuFFT calls made by the torch glue; these kernels are the fused elementwise
// passes between them: one grid-stride pass over the spectrum that applies the orthonormal
// scale (so no separate scaling kernels run), reads the mask through the geometry's index
// arithmetic (no shifted or symmetrised mask copy) and lam from device memory, and reads the
// k0 term only where the mask is nonzero.

#include "data_consistency_kernels.cuh"

namespace kdhpc {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;
// The mix kernels give each block whole spectrum lines (grid-stride over lines) and each thread
// bins kw, kw + kLineThreads, ...: row and kh are divided out once per line, not per bin, and
// neighbouring threads touch neighbouring bins.
constexpr int kLineThreads = 128;
constexpr int64_t kMaxLineBlocks = 32768;

template <typename real_t>
struct Complex2;
template <>
struct Complex2<float> { using type = float2; };
template <>
struct Complex2<double> { using type = double2; };

int64_t grid_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

int64_t line_grid_for(const DcGeometry& g) {
  const int64_t lines = g.rows * g.spec_h;
  return lines < 1 ? 1 : (lines > kMaxLineBlocks ? kMaxLineBlocks : lines);
}

template <typename real_t>
__global__ void mix_forward_kernel(real_t* spec, const real_t* q, const real_t* mask,
                                   const real_t* lam_ptr, DcGeometry g) {
  using complex2 = typename Complex2<real_t>::type;
  const real_t lam = *lam_ptr;
  const real_t inv_n = real_t(g.inv_n), lam_q = lam * real_t(g.inv_sqrt_n);
  const int64_t lines = g.rows * g.spec_h;
  for (int64_t line = blockIdx.x; line < lines; line += gridDim.x) {
    const int64_t row = line / g.spec_h, kh = line - row * g.spec_h;
    complex2* s = reinterpret_cast<complex2*>(spec) + line * g.spec_w;        // [spec_w]
    const complex2* ql = reinterpret_cast<const complex2*>(q) + line * g.spec_w;
    for (int64_t kw = threadIdx.x; kw < g.spec_w; kw += blockDim.x) {
      const real_t m = spectral_mask(mask, g, row, kh, kw);
      const real_t d = (real_t(1) - lam * m) * inv_n;
      complex2 v = s[kw];
      v.x *= d;
      v.y *= d;
      if (m != real_t(0)) {  // the k0 term is rounding noise off the support: not read there
        const complex2 qk = ql[kw];
        v.x += lam_q * qk.x;
        v.y += lam_q * qk.y;
      }
      s[kw] = v;
    }
  }
}

template <typename real_t>
__global__ void mix_backward_kernel(real_t* g_spec, const real_t* x_spec, const real_t* q,
                                    real_t* grad_q, const real_t* mask, const real_t* lam_ptr,
                                    double* lam_partials, bool scale_g, DcGeometry g) {
  using complex2 = typename Complex2<real_t>::type;
  const real_t lam = *lam_ptr;
  const real_t inv_n = real_t(g.inv_n), inv_sqrt_n = real_t(g.inv_sqrt_n);
  const int64_t lines = g.rows * g.spec_h;
  double acc = 0.0;
  for (int64_t line = blockIdx.x; line < lines; line += gridDim.x) {
    const int64_t row = line / g.spec_h, kh = line - row * g.spec_h;
    const int64_t base = line * g.spec_w;
    complex2* gs = reinterpret_cast<complex2*>(g_spec) + base;                // [spec_w]
    for (int64_t kw = threadIdx.x; kw < g.spec_w; kw += blockDim.x) {
      const real_t m = spectral_mask(mask, g, row, kh, kw);
      const complex2 gk = gs[kw];
      if (scale_g) {
        const real_t d = (real_t(1) - lam * m) * inv_n;
        gs[kw] = complex2{gk.x * d, gk.y * d};
      }
      complex2* gq = grad_q ? reinterpret_cast<complex2*>(grad_q) + base : nullptr;
      if (m == real_t(0)) {
        if (gq) gq[kw] = complex2{real_t(0), real_t(0)};
        continue;
      }
      const real_t w = real_t(parseval_weight(g, kh, kw));
      if (x_spec) {  // G and X unnormalised, Q orthonormal
        const complex2 xk = reinterpret_cast<const complex2*>(x_spec)[base + kw];
        const complex2 qk = reinterpret_cast<const complex2*>(q)[base + kw];
        acc += double(w * (gk.x * (qk.x * inv_sqrt_n - m * xk.x * inv_n) +
                           gk.y * (qk.y * inv_sqrt_n - m * xk.y * inv_n)));
      }
      if (gq) {
        const real_t c = lam * w * inv_sqrt_n;
        gq[kw] = complex2{c * gk.x, c * gk.y};
      }
    }
  }
  if (lam_partials == nullptr) return;
  // Fixed-order tree reduction: the same partials for the same inputs, run after run.
  __shared__ double shared[kLineThreads];
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kLineThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) lam_partials[blockIdx.x] = shared[0];
}

template <typename real_t>
__global__ void make_zeros_positive_kernel(real_t* data, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    data[i] = data[i] + real_t(0);
  }
}

}  // namespace

template <typename real_t>
cudaError_t launch_mix_forward(real_t* spec, const real_t* q, const real_t* mask,
                               const real_t* lam, const DcGeometry& g, cudaStream_t stream) {
  const int64_t total = g.spec_numel();
  if (total == 0) return cudaSuccess;
  mix_forward_kernel<real_t><<<line_grid_for(g), kLineThreads, 0, stream>>>(spec, q, mask, lam,
                                                                             g);
  return cudaGetLastError();
}

int64_t mix_backward_blocks(const DcGeometry& g) { return line_grid_for(g); }

template <typename real_t>
cudaError_t launch_mix_backward(real_t* g_spec, const real_t* x_spec, const real_t* q,
                                real_t* grad_q, const real_t* mask, const real_t* lam,
                                double* lam_partials, bool scale_g, const DcGeometry& g,
                                cudaStream_t stream) {
  if (g.spec_numel() == 0) return cudaSuccess;
  mix_backward_kernel<real_t><<<mix_backward_blocks(g), kLineThreads, 0, stream>>>(
      g_spec, x_spec, q, grad_q, mask, lam, lam_partials, scale_g, g);
  return cudaGetLastError();
}

template <typename real_t>
cudaError_t launch_make_zeros_positive(real_t* data, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  make_zeros_positive_kernel<real_t><<<grid_for(count), kThreads, 0, stream>>>(data, count);
  return cudaGetLastError();
}

template cudaError_t launch_mix_forward<float>(float*, const float*, const float*, const float*,
                                               const DcGeometry&, cudaStream_t);
template cudaError_t launch_mix_forward<double>(double*, const double*, const double*,
                                                const double*, const DcGeometry&, cudaStream_t);
template cudaError_t launch_mix_backward<float>(float*, const float*, const float*, float*,
                                                const float*, const float*, double*, bool,
                                                const DcGeometry&, cudaStream_t);
template cudaError_t launch_mix_backward<double>(double*, const double*, const double*, double*,
                                                 const double*, const double*, double*, bool,
                                                 const DcGeometry&, cudaStream_t);
template cudaError_t launch_make_zeros_positive<float>(float*, int64_t, cudaStream_t);
template cudaError_t launch_make_zeros_positive<double>(double*, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace kdhpc
