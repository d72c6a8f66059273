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

struct SpectrumIndex {
  int64_t row, kh, kw;
};

__device__ inline SpectrumIndex spectrum_index(int64_t i, const DcGeometry& g) {
  const int64_t line = i / g.spec_w;
  return {line / g.spec_h, line % g.spec_h, i % g.spec_w};
}

template <typename real_t>
__global__ void mix_forward_kernel(real_t* spec, const real_t* q, const real_t* mask,
                                   const real_t* lam_ptr, DcGeometry g) {
  using complex2 = typename Complex2<real_t>::type;
  complex2* s = reinterpret_cast<complex2*>(spec);          // [rows, spec_h, spec_w]
  const complex2* qc = reinterpret_cast<const complex2*>(q);  // [rows, spec_h, spec_w]
  const real_t lam = *lam_ptr;
  const real_t inv_n = real_t(g.inv_n), lam_q = lam * real_t(g.inv_sqrt_n);
  const int64_t total = g.spec_numel();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const SpectrumIndex k = spectrum_index(i, g);
    const real_t m = spectral_mask(mask, g, k.row, k.kh, k.kw);
    const real_t d = (real_t(1) - lam * m) * inv_n;
    complex2 v = s[i];
    v.x *= d;
    v.y *= d;
    if (m != real_t(0)) {  // the k0 term is rounding noise off the support: not read there
      const complex2 qk = qc[i];
      v.x += lam_q * qk.x;
      v.y += lam_q * qk.y;
    }
    s[i] = v;
  }
}

template <typename real_t>
__global__ void mix_backward_kernel(real_t* g_spec, const real_t* x_spec, const real_t* q,
                                    real_t* grad_q, const real_t* mask, const real_t* lam_ptr,
                                    double* lam_partials, bool scale_g, DcGeometry g) {
  using complex2 = typename Complex2<real_t>::type;
  complex2* gs = reinterpret_cast<complex2*>(g_spec);
  const complex2* xs = reinterpret_cast<const complex2*>(x_spec);
  const complex2* qc = reinterpret_cast<const complex2*>(q);
  complex2* gq = reinterpret_cast<complex2*>(grad_q);
  const real_t lam = *lam_ptr;
  const real_t inv_n = real_t(g.inv_n), inv_sqrt_n = real_t(g.inv_sqrt_n);
  const int64_t total = g.spec_numel();
  double acc = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const SpectrumIndex k = spectrum_index(i, g);
    const real_t m = spectral_mask(mask, g, k.row, k.kh, k.kw);
    const complex2 gk = gs[i];
    if (scale_g) {
      const real_t d = (real_t(1) - lam * m) * inv_n;
      gs[i] = complex2{gk.x * d, gk.y * d};
    }
    if (m == real_t(0)) {
      if (gq) gq[i] = complex2{real_t(0), real_t(0)};
      continue;
    }
    const real_t w = real_t(parseval_weight(g, k.kh, k.kw));
    if (xs) {  // G and X unnormalised, Q orthonormal
      const complex2 xk = xs[i], qk = qc[i];
      acc += double(w * (gk.x * (qk.x * inv_sqrt_n - m * xk.x * inv_n) +
                         gk.y * (qk.y * inv_sqrt_n - m * xk.y * inv_n)));
    }
    if (gq) {
      const real_t c = lam * w * inv_sqrt_n;
      gq[i] = complex2{c * gk.x, c * gk.y};
    }
  }
  if (lam_partials == nullptr) return;
  // Fixed-order tree reduction: the same partials for the same inputs, run after run.
  __shared__ double shared[kThreads];
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
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
  mix_forward_kernel<real_t><<<grid_for(total), kThreads, 0, stream>>>(spec, q, mask, lam, g);
  return cudaGetLastError();
}

int64_t mix_backward_blocks(const DcGeometry& g) { return grid_for(g.spec_numel()); }

template <typename real_t>
cudaError_t launch_mix_backward(real_t* g_spec, const real_t* x_spec, const real_t* q,
                                real_t* grad_q, const real_t* mask, const real_t* lam,
                                double* lam_partials, bool scale_g, const DcGeometry& g,
                                cudaStream_t stream) {
  if (g.spec_numel() == 0) return cudaSuccess;
  mix_backward_kernel<real_t><<<mix_backward_blocks(g), kThreads, 0, stream>>>(
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
