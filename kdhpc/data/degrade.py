"""Degradations that turn a target image into a network input, all defined in k-space.

FFT conventions are explicit per dataset and never guessed (docs/methods.md, FFT centring):

- ``centered=True``  fastMRI: ifftshift -> orthonormal FFT -> fftshift; DC in the array centre.
- ``centered=False`` KD-MRI: plain orthonormal FFT; DC at index 0.

All transforms act on the last two dimensions (H, W) and keep any leading batch/coil dims.
W (the last dim) is the phase-encode axis that 1-D masks and ``phase_encode`` truncation act on.

Degradations (docs/methods.md, one section per recipe):

- :func:`undersample`: Cartesian undersampling, ``k * M + 0.0`` and its zero-filled image.
- :func:`nsa_noise`: fewer signal averages. Averaging N acquisitions divides the noise std by
  sqrt(N), so keeping 1/r of them multiplies it by sqrt(r): complex Gaussian k-space noise of
  std ``sigma * sqrt(r)`` (``E|n|^2 = sigma^2 r``, real and imaginary parts each of std
  ``sigma * sqrt(r / 2)``). The orthonormal FFT keeps that std per image pixel.
- :func:`truncate`: super-resolution input, the central ``round(n / s)`` lines kept (phase
  encode only, or a central block on both axes: KD-MRI's 64 of 256 at s = 4), on the same grid.
- :func:`dihedral`: the 8 flips / rot90s, applied to the *image* before any k-space step (a flip
  of centred k-space is not the k-space of the flipped image for even sizes: it is off by one).
- :func:`view_key` / :func:`make_view`: a sample's finite pool of views, each named by a
  :class:`ViewKey` (dihedral id, mask seed, noise seed), so that a teacher can later be shown
  exactly the view the student saw (a teacher must be consistent with its student's input).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from kdhpc.config import DegradeConfig
from kdhpc.data.masks import apply_mask, center_block, seed_from, to_layout
from kdhpc.ops.fft import fft2, ifft2  # noqa: F401  (the convention, defined with the ops)


def undersample(kspace: torch.Tensor, mask, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k * M + 0.0, ifft2(k * M + 0.0))``: masked k-space and its complex zero-filled image.

    ``mask`` (numpy or torch) is 1-D ``[W]`` over the last dim or 2-D ``[H, W]``, in the layout
    that ``centered`` names. Take ``.abs()`` of the image for a magnitude input (KD-MRI's
    ``img_volus``) or ``.real`` for DC-CNN's real channel.
    """
    masked = apply_mask(kspace, mask)
    return masked, ifft2(masked, centered)


def nsa_noise(kspace: torch.Tensor, nsa_factor: float, sigma: float,
              generator: torch.Generator | None = None, *,
              data_has_noise: bool = False) -> torch.Tensor:
    """k-space as if acquired with 1/r of the averages (r = ``nsa_factor`` >= 1).

    ``sigma`` is the k-space noise std at the full number of averages. Clean (simulated) data
    gets noise of std ``sigma * sqrt(r)``; data that already carries noise of std ``sigma``
    (``data_has_noise``) gets the missing part, std ``sigma * sqrt(r - 1)``, since independent
    variances add. Noise is drawn on the generator's device (CPU by default) then moved.
    """
    if not nsa_factor >= 1:
        raise ValueError(f"nsa_factor: expected >= 1, found {nsa_factor!r}")
    if not sigma >= 0:
        raise ValueError(f"sigma: expected >= 0, found {sigma!r}")
    if not kspace.is_complex():
        raise ValueError(f"kspace: expected a complex tensor, found {kspace.dtype}")
    std = sigma * math.sqrt(nsa_factor - 1 if data_has_noise else nsa_factor)
    device = generator.device if generator is not None else "cpu"
    # torch's complex randn has E|z|^2 = 1 (each part variance 1/2).
    noise = torch.randn(kspace.shape, dtype=kspace.dtype, generator=generator, device=device)
    return kspace + std * noise.to(kspace.device)


def random_noise_sigma(cfg: DegradeConfig, image_max: float,
                       generator: torch.Generator | None = None) -> float:
    """``cfg.noise_sigma * image_max * u``, u uniform in ``cfg.noise_jitter`` (augmentation)."""
    low, high = cfg.noise_jitter
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return cfg.noise_sigma * float(image_max) * (low + (high - low) * u)


def truncation_mask(n: int, scale: float, centered: bool) -> torch.Tensor:
    """float32 ``[n]``: ones on the central ``max(1, round(n / scale))`` lines."""
    if not scale >= 1:
        raise ValueError(f"scale: expected >= 1, found {scale!r}")
    block = center_block(n, max(1, round(n / scale)))
    return torch.from_numpy(to_layout(block, "centered", "centered" if centered else "unshifted"))


def truncate(kspace: torch.Tensor, scale: float, mode: str = "phase_encode",
             centered: bool = True) -> torch.Tensor:
    """Keep the central 1/``scale`` of k-space, zero the rest (+0.0), on the same grid.

    ``phase_encode``: the central ``round(W / s)`` columns (last dim); ``central_block``: the
    central ``round(H / s) x round(W / s)`` block (KD-MRI's 64 x 64 of 256 x 256 at s = 4).
    """
    height, width = kspace.shape[-2:]
    mask = truncation_mask(width, scale, centered)  # [W]
    if mode == "central_block":
        mask = truncation_mask(height, scale, centered)[:, None] * mask  # [H, W]
    elif mode != "phase_encode":
        raise ValueError(f"mode: expected 'phase_encode' or 'central_block', found {mode!r}")
    return apply_mask(kspace, mask.to(kspace.device))


# ---------------------------------------------------------------------------------------------
# views

def _check_view(view: int) -> None:
    if view not in range(8):
        raise ValueError(f"view: expected a dihedral id 0..7, found {view!r}")


def dihedral(x, view: int):
    """View ``view`` of the dihedral group on the last two dims (torch or numpy).

    ``view = 4 * f + k``: flip the last dim when ``f = 1``, then rotate by ``k`` quarter turns
    (``rot90`` from dim -2 towards dim -1, numpy's and torch's convention). View 0 is identity.
    """
    _check_view(view)
    turns, flip = view % 4, view >= 4
    if isinstance(x, torch.Tensor):
        x = torch.flip(x, dims=(-1,)) if flip else x
        return torch.rot90(x, turns, dims=(-2, -1))
    x = np.flip(x, axis=-1) if flip else x
    return np.rot90(x, turns, axes=(-2, -1))


def dihedral_inverse(x, view: int):
    """Undo :func:`dihedral`: ``dihedral_inverse(dihedral(x, v), v) == x``."""
    _check_view(view)
    turns, flip = view % 4, view >= 4
    if isinstance(x, torch.Tensor):
        x = torch.rot90(x, -turns, dims=(-2, -1))
        return torch.flip(x, dims=(-1,)) if flip else x
    x = np.rot90(x, -turns, axes=(-2, -1))
    return np.flip(x, axis=-1) if flip else x


class ViewKey(NamedTuple):
    """One view of a sample: dihedral id (0-7), mask seed, noise seed (63-bit ints)."""

    dihedral: int
    mask_seed: int
    noise_seed: int


def view_key(sample_key: Any, view: int, cfg: DegradeConfig, *, base_seed: int = 0) -> ViewKey:
    """The key of view number ``view`` (0 .. ``cfg.views_per_sample - 1``) of a sample.

    ``sample_key`` is anything whose ``str()`` names the sample (e.g. ``"file.h5:12"``). The
    dihedral id is ``view % 8`` when ``cfg.dihedral`` (else 0); the seeds hash (sample, view,
    ``base_seed``) with SHA-256 and SeedSequence, so they are the same in every process and
    differ between views. A pool larger than 8 repeats dihedral ids with fresh seeds.
    """
    if view not in range(cfg.views_per_sample):
        raise ValueError(f"view: expected 0..{cfg.views_per_sample - 1} "
                         f"(degrade.views_per_sample = {cfg.views_per_sample}), found {view!r}")
    name = str(sample_key)
    return ViewKey(dihedral=view % 8 if cfg.dihedral else 0,
                   mask_seed=seed_from("mask", name, view, base_seed),
                   noise_seed=seed_from("noise", name, view, base_seed))


def make_view(target: torch.Tensor, key: ViewKey, cfg: DegradeConfig, *, centered: bool,
              mask=None) -> dict[str, torch.Tensor]:
    """The (input, target) pair of one view of an image ``target`` ``[..., H, W]``.

    Steps: ``x = dihedral(target, key.dihedral)``; ``k = fft2(x)``; then by ``cfg.task``:
    ``undersample`` applies ``mask`` (required; in the layout ``centered`` names, already
    drawn for this view, e.g. ``make_mask(cfg_mask, W, seed=key.mask_seed)``), ``denoise``
    adds :func:`nsa_noise` with sigma from :func:`random_noise_sigma` (image max = max |x|),
    both drawn from a generator seeded with ``key.noise_seed``; ``superres`` applies
    :func:`truncate`. Returns ``target`` (the transformed x), ``kspace`` (degraded) and
    ``image`` (complex ``ifft2`` of the degraded k-space).
    """
    x = dihedral(target, key.dihedral)
    kspace = fft2(x if x.is_complex() else x.to(torch.complex64), centered)
    if cfg.task == "undersample":
        if mask is None:
            raise ValueError("make_view: degrade.task is 'undersample', expected a mask, "
                             "found None")
        kspace = apply_mask(kspace, mask)
    elif cfg.task == "denoise":
        generator = torch.Generator().manual_seed(key.noise_seed)
        sigma = random_noise_sigma(cfg, x.abs().max().item(), generator)
        kspace = nsa_noise(kspace, cfg.nsa_factor, sigma, generator)
    elif cfg.task == "superres":
        kspace = truncate(kspace, cfg.sr_scale, cfg.sr_mode, centered)
    else:
        raise ValueError(f"degrade.task: expected undersample, denoise or superres, found "
                         f"{cfg.task!r}")
    return {"target": x, "kspace": kspace, "image": ifft2(kspace, centered)}
