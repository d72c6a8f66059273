"""Degradations that turn a target image into a network input, all defined in k-space.

FFT conventions are explicit per dataset and never guessed (DESIGN.md, Data):

- ``centered=True``  fastMRI: ifftshift -> orthonormal FFT -> fftshift; DC in the array centre.
- ``centered=False`` KD-MRI: plain orthonormal FFT; DC at index 0.

All transforms act on the last two dimensions (H, W) and keep any leading batch/coil dims.
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
