"""Data consistency (DC): put the measured k-space lines back into a network's estimate.

    k    = FFT2(x)                                  orthonormal, over the last two dims (H, W)
    x_dc = IFFT2( k + lam * M * (k0 - k) )          then the real part, the magnitude, or as is

``lam = 1`` is KD-MRI's hard DC (measured lines replace the estimate), ``lam = v / (1 + v)``
Schlemper's noisy DC, a learned ``lam`` VarNet's soft DC (REFERENCE.md s.1). ``centered`` picks
fastMRI's centred FFT (ifftshift, FFT, fftshift) or KD-MRI's unshifted one (DC at index 0); see
:mod:`kdhpc.data.degrade`. Masking writes +0.0, never -0.0.

Shapes: ``x`` real or complex ``[..., H, W]`` (single-coil images ``[B, 1, H, W]``, or multi-coil
coil images ``[B, C, H, W]`` whose coil dim is passed through), ``k0`` complex with the same shape,
``mask`` real and broadcastable to ``x`` with its last two dims ``[H, 1]`` or ``[1, W]`` (1-D
Cartesian: whole lines) or ``[H, W]`` (2-D), optionally with leading dims (per-sample masks).
"""

from __future__ import annotations

import torch

from kdhpc.data.degrade import fft2, ifft2
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
        lam = torch.tensor(float(lam), dtype=real_dtype, device=x.device)
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


def _fast_available(x: torch.Tensor) -> bool | str:
    return "the C++ extension kdhpc._C is not built yet"


def data_consistency(x: torch.Tensor, k0: torch.Tensor, mask: torch.Tensor,
                     lam: float | torch.Tensor = 1.0, centered: bool = False,
                     output: str = "real", impl: str = "auto") -> torch.Tensor:
    """Data consistency ``IFFT2(FFT2(x) + lam * M * (k0 - FFT2(x)))`` (see the module docstring).

    ``lam`` is a float or a one-element tensor (it receives a gradient), ``output`` one of
    ``"real"`` (KD-MRI), ``"magnitude"`` or ``"complex"``; ``impl`` as in
    :mod:`kdhpc.ops.dispatch`.
    """
    if resolve("data_consistency", impl, lambda: _fast_available(x)) == "reference":
        return data_consistency_reference(x, k0, mask, lam, centered, output)
    raise AssertionError("unreachable until the extension exists")
