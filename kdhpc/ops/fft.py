"""The two k-space conventions every part of kdhpc shares: orthonormal 2-D FFTs over the last
two dims (H, W), centred or unshifted.

- ``centered=True``  fastMRI: ifftshift -> orthonormal FFT -> fftshift; DC in the array centre.
- ``centered=False`` KD-MRI: plain orthonormal FFT; DC at index 0.

They live with the ops (which import nothing of the data or model code) and
:mod:`kdhpc.data.degrade` re-exports them, so the convention is defined once.
"""

from __future__ import annotations

import torch

_DIMS = (-2, -1)


def fft2(image: torch.Tensor, centered: bool) -> torch.Tensor:
    """Orthonormal 2-D FFT over the last two dims, centred (fastMRI) or unshifted (KD-MRI)."""
    if centered:
        image = torch.fft.ifftshift(image, dim=_DIMS)
    k = torch.fft.fft2(image, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(k, dim=_DIMS) if centered else k


def ifft2(kspace: torch.Tensor, centered: bool) -> torch.Tensor:
    """Inverse of :func:`fft2` for the same ``centered`` flag."""
    if centered:
        kspace = torch.fft.ifftshift(kspace, dim=_DIMS)
    x = torch.fft.ifft2(kspace, dim=_DIMS, norm="ortho")
    return torch.fft.fftshift(x, dim=_DIMS) if centered else x
