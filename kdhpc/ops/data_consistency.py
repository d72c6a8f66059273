"""Data consistency (DC): put the measured k-space lines back into a network's estimate.

    k    = FFT2(x)                                  orthonormal, over the last two dims (H, W)
    x_dc = IFFT2( k + lam * M * (k0 - k) )          then the real part, the magnitude, or as is

``lam = 1`` is KD-MRI's hard DC (measured lines replace the estimate), ``lam = v / (1 + v)``
Schlemper's noisy DC, a learned ``lam`` VarNet's soft DC. ``centered`` picks
fastMRI's centred FFT (ifftshift, FFT, fftshift) or KD-MRI's unshifted one (DC at index 0); see
:mod:`kdhpc.ops.fft`. Masking writes +0.0, never -0.0.

Shapes: ``x`` real or complex ``[..., H, W]`` (single-coil images ``[B, 1, H, W]``, or multi-coil
coil images ``[B, C, H, W]`` whose coil dim is passed through), ``k0`` complex with the same shape,
``mask`` real and broadcastable to ``x`` with its last two dims ``[H, 1]`` or ``[1, W]`` (1-D
Cartesian: whole lines) or ``[H, W]`` (2-D), optionally with leading dims (per-sample masks).

How the fast path does less work (the C++/CUDA op ``torch.ops.kdhpc.data_consistency_*``):

- Linear split. ``x_dc = IFFT2(D * FFT2(x)) + lam * IFFT2(M * k0)`` with ``D = 1 - lam * M``. The
  k0 term does not depend on x: it is computed once per batch (``data_consistency_k0_term``,
  cached across the cascades of a forward pass while ``k0`` and ``mask`` are unchanged) and
  the per-cascade op only applies ``D``.
- 1-D masks. If M varies along W only, FFT2 = FFT_H FFT_W and FFT_H commutes with D, so
  ``IFFT2(D FFT2 x) = IFFT_W(D FFT_W x)``: 1-D transforms along the phase-encode axis only
  (likewise along H for ``[H, 1]`` masks). A 2-D mask keeps the 2-D transform.
- Centring. With ``F_c = S+ F S-`` (S the fftshift rolls, for any size, odd or even) the shifts
  are phase ramps in k-space that cancel in ``F_c^-1 (D_c F_c x) = F^-1 (ifftshift(D_c) F x)``:
  the x path needs no shift at all, only the mask is read through shifted indices. The k0
  term keeps the shifts (once per batch).
- Real image, real output (KD-MRI). ``Re(F^-1 D F x) = F^-1 D_sym F x`` with the real,
  Hermitian-symmetric ``D_sym(k) = (D(k) + D(-k)) / 2``, so rfft / irfft along the last
  transformed axis suffice, and the k0 term is ``Re(F_c^-1(M k0))`` in that half spectrum.
- One pass. Mask, lam and the k0 term meet in one loop over the spectrum bins where the
  (symmetrised) mask is nonzero; elsewhere D = 1 and the k0 term vanishes.

Backward (the exact adjoint): ``grad_x = T^-1(D_sym T g)`` (the same map with k0 = 0; real
part for a real x), ``grad_lam = sum_k w_k Re(conj(G_k) (Q_k - M'_k X_k))`` over the spectrum
(Parseval weights w = 2 for interior half-spectrum bins, else 1), ``grad_k0 = lam M F_c(g)``
through the k0 term's adjoint. Not twice differentiable on the fast path.

Bytes-moved floor: forward reads x and k0 and writes the output; forward + backward also reads
the output gradient and writes grad_x (mask and lam are negligible).

Extension: ``pip install --no-build-isolation -e .`` builds ``kdhpc._C`` (C++; plus CUDA when
CUDA_HOME is set). ``KDHPC_JIT=1`` (or :func:`build_extension`) compiles the same sources just in
time instead. Without either, ``impl="auto"`` says once why and uses the reference.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

from kdhpc.ops.fft import fft2, ifft2
from kdhpc.ops.dispatch import resolve

OUTPUTS = ("real", "magnitude", "complex")

_REAL_OF_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_COMPLEX_OF_REAL = {v: k for k, v in _REAL_OF_COMPLEX.items()}


def _check_inputs(x, k0, mask, lam, centered, output):
    """Validate the arguments of :func:`data_consistency`; return (mask, lam) in x's real dtype."""
    name = "data_consistency"
    if not isinstance(x, torch.Tensor) or x.dtype not in (*_REAL_OF_COMPLEX, *_COMPLEX_OF_REAL):
        found = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name}: x: expected a float32/float64/complex64/complex128 tensor, "
                        f"found {found}")
    if x.dim() < 2:
        raise ValueError(f"{name}: x: expected at least 2 dims [..., H, W], found shape "
                         f"{tuple(x.shape)}")
    real_dtype = _REAL_OF_COMPLEX.get(x.dtype, x.dtype)
    want_k0 = _COMPLEX_OF_REAL[real_dtype]
    if not isinstance(k0, torch.Tensor) or k0.dtype != want_k0:
        found = k0.dtype if isinstance(k0, torch.Tensor) else type(k0).__name__
        raise TypeError(f"{name}: k0: expected {want_k0} to match x ({x.dtype}), found {found}")
    if k0.shape != x.shape:
        raise ValueError(f"{name}: k0: expected x's shape {tuple(x.shape)}, found "
                         f"{tuple(k0.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        found = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name}: mask: expected a real or bool tensor, found {found}")
    H, W = x.shape[-2:]
    fits = (mask.dim() >= 2 and mask.dim() <= x.dim()
            and mask.shape[-2] in (1, H) and mask.shape[-1] in (1, W)
            and all(m in (1, s) for m, s in zip(mask.shape[:-2][::-1], x.shape[:-2][::-1])))
    if not fits:
        raise ValueError(f"{name}: mask of shape {tuple(mask.shape)} does not broadcast to x of "
                         f"shape {tuple(x.shape)}: expected [H, 1], [1, W] or [H, W] = "
                         f"[{H}, 1], [1, {W}] or [{H}, {W}], optionally with leading dims of x")
    for arg, tensor in (("k0", k0), ("mask", mask)):
        if tensor.device != x.device:
            raise ValueError(f"{name}: {arg} is on {tensor.device} but x is on {x.device}")
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1 or lam.is_complex() or not lam.is_floating_point():
            raise ValueError(f"{name}: lam: expected a float or a one-element real floating "
                             f"tensor, found {lam.dtype} of shape {tuple(lam.shape)}")
        if lam.device != x.device:
            raise ValueError(f"{name}: lam is on {lam.device} but x is on {x.device}")
        lam = lam.reshape(()).to(real_dtype)
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        lam = torch.full((), float(lam), dtype=real_dtype, device=x.device)  # no host sync on CUDA
    else:
        raise TypeError(f"{name}: lam: expected a float or a tensor, found {type(lam).__name__}")
    if not isinstance(centered, bool):
        raise TypeError(f"{name}: centered: expected a bool, found {type(centered).__name__}")
    if output not in OUTPUTS:
        raise ValueError(f"{name}: output: expected one of {OUTPUTS}, found {output!r}")
    return mask.to(real_dtype), lam


def _finish(image: torch.Tensor, output: str) -> torch.Tensor:
    """Take the requested part of a complex image; + 0.0 turns any -0.0 into +0.0."""
    if output == "real":
        image = image.real if image.is_complex() else image
    elif output == "magnitude":
        image = image.abs()
    return image + 0.0


def data_consistency_reference(x: torch.Tensor, k0: torch.Tensor, mask: torch.Tensor,
                               lam: float | torch.Tensor = 1.0, centered: bool = False,
                               output: str = "real") -> torch.Tensor:
    """Plain-PyTorch composite of :func:`data_consistency` (the spec; same arguments)."""
    mask, lam = _check_inputs(x, k0, mask, lam, centered, output)
    k = fft2(x, centered)                                    # [..., H, W] complex
    k_dc = k + lam * mask * (k0 - k)
    return _finish(ifft2(k_dc, centered), output)



# ---------------------------------------------------------------------------------------------
# The extension: kdhpc._C from setup.py, or a just-in-time build of the same sources on request.

BUILD_COMMAND = "pip install --no-build-isolation -e ."
_CSRC = Path(__file__).resolve().parents[2] / "csrc"


class _Extension:
    module = None          # the loaded pybind11 module, once loaded
    error: str | None = None
    tried = False
    registered = False
    warned: set = set()
    lock = threading.Lock()


def _release(version: str | None) -> str | None:
    """``major.minor.patch`` of a torch version string: ``2.13.0`` of ``2.13.0+cpu`` and of
    ``2.13.0a0+git1234`` (source and vendor builds, whose C++ TORCH_VERSION drops the suffix)."""
    match = re.match(r"\d+\.\d+\.\d+", version or "")
    return match.group(0) if match else None


def _torch_release() -> str | None:
    return _release(torch.__version__)


def _import_built():
    """(module, None) for a usable ``kdhpc._C``, else (None, why not)."""
    try:
        from kdhpc import _C
    except ImportError as exc:
        return None, f"the C++ extension kdhpc._C is not built or does not load ({exc})"
    if _release(getattr(_C, "torch_version", None)) != _torch_release():
        return None, (f"kdhpc._C was built against torch {getattr(_C, 'torch_version', '?')} but "
                      f"torch {torch.__version__} is running; rebuild it")
    return _C, None


def build_extension(verbose: bool = False):
    """Compile csrc/ just in time (``torch.utils.cpp_extension.load``) and register the ops.

    CUDA sources are included when CUDA_HOME is set and torch has CUDA. Takes ~20-60 s the first
    time (cached under TORCH_EXTENSIONS_DIR afterwards). Returns the loaded module.
    """
    with _Extension.lock:
        if _Extension.module is not None:
            return _Extension.module
        from torch.utils.cpp_extension import load

        with_cuda = bool(os.environ.get("CUDA_HOME")) and torch.version.cuda is not None
        sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
        flags = ["-O3", "-g0"]
        if with_cuda:
            sources += sorted(str(p) for p in (_CSRC / "cuda").glob("*.cu"))
            flags.append("-DKDHPC_WITH_CUDA=1")
        module = load(name="kdhpc_C", sources=sources, extra_cflags=flags,
                      extra_cuda_cflags=["-O3"], extra_include_paths=[str(_CSRC)],
                      with_cuda=with_cuda, verbose=verbose)
        _Extension.module, _Extension.error, _Extension.tried = module, None, True
        _register_python_side()
        return module


def _extension():
    """The loaded extension module or None (then ``_Extension.error`` says why); loads once."""
    if _Extension.tried:
        return _Extension.module
    with _Extension.lock:
        if not _Extension.tried:
            module, error = _import_built()
            _Extension.module, _Extension.error, _Extension.tried = module, error, True
            if module is not None:
                _register_python_side()
    if _Extension.module is None and os.environ.get("KDHPC_JIT", "") == "1":
        try:
            build_extension()
        except Exception as exc:  # a failed JIT build falls back like a missing extension
            _Extension.error = f"{_Extension.error}; the KDHPC_JIT=1 build failed too ({exc})"
    return _Extension.module


def _fast_available(x: torch.Tensor) -> bool | str:
    module = _extension()
    if module is None:
        return _Extension.error
    if x.device.type == "cuda" and not module.with_cuda:
        return "kdhpc._C was built without CUDA (CUDA_HOME was not set when it was built)"
    if x.device.type not in ("cpu", "cuda"):
        return f"kdhpc._C has no kernel for device {x.device}"
    return True


def _warn_fallback(reason: str) -> None:
    if reason in _Extension.warned:
        return
    _Extension.warned.add(reason)
    warnings.warn(f"kdhpc.ops.data_consistency: using the plain-PyTorch reference because "
                  f"{reason}. Build the extension with `{BUILD_COMMAND}` in the repository root "
                  f"(or set KDHPC_JIT=1 to compile it just in time).", RuntimeWarning,
                  stacklevel=3)


# ---------------------------------------------------------------------------------------------
# torch.library: fake (meta) kernels and autograd for the C++ ops.

def _spectrum_size(H: int, W: int, mask_shape, hermitian: bool) -> tuple[int, int]:
    """Spectrum shape of the fast path (mirrors make_geometry in csrc/data_consistency.cpp)."""
    mask_h, mask_w = mask_shape[-2], mask_shape[-1]
    transform_h, transform_w = mask_h > 1, mask_w > 1 or mask_h == 1
    spec_h = H // 2 + 1 if hermitian and transform_h and not transform_w else H
    spec_w = W // 2 + 1 if hermitian and transform_w else W
    return spec_h, spec_w


def _k0_term_fake(k0, mask, centered, hermitian):
    N, H, W = k0.shape
    return k0.new_empty((N, *_spectrum_size(H, W, mask.shape, hermitian)))


def _apply_fake(x, q, mask, lam, centered, hermitian):
    real = _REAL_OF_COMPLEX.get(x.dtype, x.dtype)
    return x.new_empty(x.shape, dtype=real if hermitian else _COMPLEX_OF_REAL[real])


def _apply_backward_fake(grad, x, q, mask, lam, centered, hermitian, needs):
    def maybe(flag, like):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if flag \
            else like.new_empty((0,))
    return maybe(needs[0], x), maybe(needs[1], q), maybe(needs[2], lam)


def _k0_term_setup(ctx, inputs, output):
    k0, mask, centered, hermitian = inputs
    ctx.save_for_backward(mask)
    ctx.flags = (centered, hermitian, k0.shape[-2], k0.shape[-1])  # [N, H, W]


def _k0_term_backward(ctx, grad_q):
    """grad_k0 = M F_c(R^H(T^H grad_q)), the adjoint of the k0 term (in C++)."""
    (mask,) = ctx.saved_tensors
    grad_k0 = torch.ops.kdhpc.data_consistency_k0_term_backward(grad_q, mask, *ctx.flags)
    return grad_k0, None, None, None


def _k0_term_backward_fake(grad_q, mask, centered, hermitian, height, width):
    return grad_q.new_empty((grad_q.shape[0], height, width))


def _apply_setup(ctx, inputs, output):
    x, q, mask, lam, centered, hermitian = inputs
    ctx.save_for_backward(x, q, mask, lam)
    ctx.flags = (centered, hermitian)


def _apply_backward(ctx, grad):
    x, q, mask, lam = ctx.saved_tensors
    need_x, need_q, _, need_lam = ctx.needs_input_grad[:4]
    grad_x, grad_q, grad_lam = torch.ops.kdhpc.data_consistency_apply_backward(
        grad, x, q, mask, lam, *ctx.flags, [need_x, need_q, need_lam])
    return (grad_x if need_x else None, grad_q if need_q else None, None,
            grad_lam if need_lam else None, None, None)


def _register_python_side() -> None:
    if _Extension.registered:
        return
    _Extension.registered = True
    torch.library.register_fake("kdhpc::data_consistency_k0_term", _k0_term_fake)
    torch.library.register_fake("kdhpc::data_consistency_k0_term_backward", _k0_term_backward_fake)
    torch.library.register_fake("kdhpc::data_consistency_apply", _apply_fake)
    torch.library.register_fake("kdhpc::data_consistency_apply_backward", _apply_backward_fake)
    torch.library.register_autograd("kdhpc::data_consistency_k0_term", _k0_term_backward,
                                    setup_context=_k0_term_setup)
    torch.library.register_autograd("kdhpc::data_consistency_apply", _apply_backward,
                                    setup_context=_apply_setup)


# ---------------------------------------------------------------------------------------------
# The public op.

_K0_TERM_CACHE: OrderedDict = OrderedDict()
_K0_TERM_CACHE_SIZE = 4


def _k0_term(k0_user, mask_user, mask, centered: bool, hermitian: bool) -> torch.Tensor:
    """The k0 term, reused across calls while the caller's k0 and mask tensors are unchanged.

    DC-CNN passes the same k0 and mask to every cascade, so the term (one 2-D inverse FFT and
    one forward transform) is paid once per batch. Not cached when k0 needs a gradient, under
    torch.compile, or for inference tensors (they have no version counter to detect edits).
    """
    # Nor under inference mode: q would be an inference tensor, and a training forward on the
    # same k0 (a streamed teacher runs on the student's batch) could not save it for backward.
    cacheable = not (k0_user.requires_grad or torch.compiler.is_compiling()
                     or torch.is_inference_mode_enabled()
                     or k0_user.is_inference() or mask_user.is_inference())
    k0 = k0_user.reshape(-1, *k0_user.shape[-2:])                       # [N, H, W]
    if not cacheable:
        return torch.ops.kdhpc.data_consistency_k0_term(k0, mask, centered, hermitian)
    key = (id(k0_user), id(mask_user), centered, hermitian, tuple(k0.shape), tuple(mask.shape))
    hit = _K0_TERM_CACHE.get(key)
    if hit is not None:
        k0_ref, k0_version, mask_ref, mask_version, q = hit
        if (k0_ref() is k0_user and mask_ref() is mask_user and k0_user._version == k0_version
                and mask_user._version == mask_version):
            _K0_TERM_CACHE.move_to_end(key)
            return q
    q = torch.ops.kdhpc.data_consistency_k0_term(k0, mask, centered, hermitian)
    _K0_TERM_CACHE[key] = (weakref.ref(k0_user), k0_user._version, weakref.ref(mask_user),
                           mask_user._version, q)
    while len(_K0_TERM_CACHE) > _K0_TERM_CACHE_SIZE:
        _K0_TERM_CACHE.popitem(last=False)
    return q


def _data_consistency_fast(x, k0, mask_user, mask, lam, centered, output):
    H, W = x.shape[-2:]
    lead = x.shape[:-2]
    x3 = x.reshape(-1, H, W)                                       # [N, H, W]
    if all(d == 1 for d in mask.shape[:-2]):
        mask3 = mask.reshape(1, *mask.shape[-2:])                  # [1, Hm, Wm]
    else:
        mask3 = mask.expand(*lead, *mask.shape[-2:]).reshape(-1, *mask.shape[-2:])  # [N, Hm, Wm]
    hermitian = not x.is_complex() and output == "real"
    if (torch.is_grad_enabled() and (x.requires_grad or k0.requires_grad or lam.requires_grad)
            or torch.compiler.is_compiling()):
        q = _k0_term(k0, mask_user, mask3, centered, hermitian)    # [N, spec_h, spec_w]
        out = torch.ops.kdhpc.data_consistency_apply(x3, q, mask3, lam, centered, hermitian)
    else:
        # Nothing needs a gradient: skip the Python autograd kernels of torch.library, which
        # cost as much as the whole op on small images (~10 us a call).
        with torch._C._AutoDispatchBelowAutograd():
            q = _k0_term(k0, mask_user, mask3, centered, hermitian)
            out = torch.ops.kdhpc.data_consistency_apply(x3, q, mask3, lam, centered, hermitian)
    out = out.reshape(x.shape)
    if hermitian or output == "complex":
        return out
    return out.real if output == "real" else out.abs()


def data_consistency(x: torch.Tensor, k0: torch.Tensor, mask: torch.Tensor,
                     lam: float | torch.Tensor = 1.0, centered: bool = False,
                     output: str = "real", impl: str = "auto") -> torch.Tensor:
    """Data consistency ``IFFT2(FFT2(x) + lam * M * (k0 - FFT2(x)))`` (see the module docstring).

    ``x`` real or complex ``[..., H, W]``, ``k0`` complex of x's shape, ``mask`` broadcastable
    (``[H, 1]``, ``[1, W]``, ``[H, W]``, optionally with leading dims); ``lam`` a float or a
    one-element tensor (it receives a gradient); ``centered`` fastMRI's centred FFT (True) or
    KD-MRI's unshifted one (False); ``output`` one of ``"real"`` (KD-MRI), ``"magnitude"`` or
    ``"complex"``; ``impl`` as in :mod:`kdhpc.ops.dispatch`. The real output of a complex
    input is a view of the complex result.
    """
    mask_user = mask
    mask, lam = _check_inputs(x, k0, mask, lam, centered, output)
    unavailable: list[str] = []

    def available(explicit: bool):  # the C++ path is never a slow stand-in: same answer
        ok = _fast_available(x)
        if ok is not True:
            unavailable.append(ok)
        return ok

    if resolve("data_consistency", impl, available) == "reference":
        if unavailable:
            _warn_fallback(unavailable[0])
        return data_consistency_reference(x, k0, mask, lam, centered, output)
    return _data_consistency_fast(x, k0, mask_user, mask, lam, centered, output)
