"""1-D Cartesian undersampling masks, their layouts, seeds and the sign-safe masking rule.

Layouts (see :mod:`kdhpc.data.degrade` for the matching FFTs):

- ``centered`` (fastMRI): DC at index ``n // 2``; a centre block of ``k`` lines occupies
  ``[(n - k + 1) // 2, (n - k + 1) // 2 + k)``.
- ``unshifted`` (KD-MRI): DC at index 0; the same block is split across both ends.
  ``unshifted = ifftshift(centered)`` and ``centered = fftshift(unshifted)``.

A 1-D mask of length W acts on the last dimension (fastMRI's phase-encode columns); a 2-D mask
(KD-MRI's stored ``.npy`` masks) acts on the last two. Mask kinds:

- :func:`random_mask` (fastMRI ``RandomMaskFunc``): the centre block of ``n_low = round(W * cf)``
  columns, and every other column independently with probability
  ``p = (W / acc - n_low) / (W - n_low)``, so that ``E[lines] = W / acc``.
- :func:`equispaced_fraction_mask` (fastMRI ``EquispacedMaskFractionFunc``): the centre block and
  columns ``round(offset + j * a)`` with the spacing ``a = acc (W - n_low) / (W - acc n_low)``
  chosen so that ``n_low + (W - n_low) / a = W / acc``; ``offset`` uniform in ``[0, round(a))``.
- :func:`variable_density_mask` (KD-MRI / DC-CNN style, unshifted): exactly
  ``floor(n / acc)`` lines, of which ``round(n * cf)`` form the fully sampled centre block and the
  rest are drawn without replacement with weight ``exp(-f^2 / (2 (n/10)^2)) + 1 / (2 acc)``
  over the frequency ``f`` of each remaining line (a Gaussian of width n/10 over a uniform floor).
- :func:`load_mask`: a fixed mask from ``.npy`` (KD-MRI ships one per dataset and acceleration).

Masking is ``kspace * mask + 0.0``: the product of a negative value and 0 is -0.0, whose sign
bit would reveal which lines were dropped (it once leaked the fastMRI test set); adding +0.0
turns every -0.0 into +0.0 (IEEE 754: -0.0 + 0.0 = +0.0) and leaves other values unchanged.

Seeds: validation masks are seeded per file (:func:`file_seed`), so every run and rank sees the
same mask for a file; training randomness is seeded per (run seed, rank, worker, epoch)
(:func:`train_seed`), so workers never repeat each other and a resumed run repeats itself.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from kdhpc.config import MaskConfig

LAYOUTS = ("centered", "unshifted")
Rng = np.random.Generator | int


def _rng(rng: Rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_args(width: int, acceleration: float, center_fraction: float) -> None:
    if int(width) != width or width < 1:
        raise ValueError(f"width: expected a positive integer, found {width!r}")
    if not acceleration >= 1:
        raise ValueError(f"acceleration: expected >= 1, found {acceleration!r}")
    if not 0 < center_fraction < 1:
        raise ValueError(f"center_fraction: expected a value in (0, 1), found {center_fraction!r}")


def num_center_lines(width: int, center_fraction: float) -> int:
    """fastMRI's ``round(W * cf)`` (Python rounding, half to even), at least one line."""
    return max(1, round(width * center_fraction))


def center_block(width: int, n_center: int) -> np.ndarray:
    """float32 ``[W]``, ones on the ``n_center`` central lines of the centred layout."""
    mask = np.zeros(width, dtype=np.float32)
    start = (width - n_center + 1) // 2
    mask[start:start + n_center] = 1.0
    return mask


def random_mask(width: int, acceleration: float, center_fraction: float,
                rng: Rng) -> np.ndarray:
    """fastMRI RandomMaskFunc semantics (module docstring); float32 ``[W]``, centred layout.

    ``p`` is clipped at 0 when the centre block alone exceeds ``W / acc``.
    """
    _check_args(width, acceleration, center_fraction)
    n_low = num_center_lines(width, center_fraction)
    mask = center_block(width, n_low)
    if n_low < width:
        prob = max(0.0, (width / acceleration - n_low) / (width - n_low))
        mask[_rng(rng).uniform(size=width) < prob] = 1.0
    return mask


def equispaced_spacing(width: int, acceleration: float, n_low: int) -> float:
    """Spacing ``a = acc (W - n_low) / (W - acc n_low)`` of the equispaced-fraction mask."""
    if acceleration * n_low >= width:
        raise ValueError(f"equispaced mask: the centre block ({n_low} of {width} lines) already "
                         f"holds W/acceleration = {width / acceleration:.2f} lines; expected a "
                         f"smaller center_fraction or acceleration")
    return acceleration * (width - n_low) / (width - acceleration * n_low)


def equispaced_fraction_mask(width: int, acceleration: float, center_fraction: float,
                             rng: Rng, offset: int | None = None) -> np.ndarray:
    """fastMRI EquispacedMaskFractionFunc semantics (module docstring); float32 ``[W]``, centred.

    Lines ``round(offset + j * a)`` for ``offset + j * a < W - 1``, plus the centre block.
    """
    _check_args(width, acceleration, center_fraction)
    n_low = num_center_lines(width, center_fraction)
    spacing = equispaced_spacing(width, acceleration, n_low)
    if offset is None:
        offset = int(_rng(rng).integers(0, max(1, round(spacing))))
    mask = center_block(width, n_low)
    lines = np.round(np.arange(offset, width - 1, spacing)).astype(np.int64)
    mask[lines] = 1.0
    return mask


def variable_density_mask(n: int, acceleration: float, center_fraction: float,
                          seed: int) -> np.ndarray:
    """KD-MRI-style 1-D variable-density mask; float32 ``[n]``, unshifted layout (DC at 0).

    Exactly ``floor(n / acc)`` lines: the ``round(n * cf)`` central ones and the rest drawn
    without replacement (weights in the module docstring). With cf = 10/150 and 9/240 this gives
    KD-MRI's published line counts: cardiac 150 -> 37 / 30 / 18 and brain 240 -> 60 / 48 / 30
    at 4x / 5x / 8x (docs/reference.md).
    """
    _check_args(n, acceleration, center_fraction)
    n_total = int(n / acceleration)
    n_center = num_center_lines(n, center_fraction)
    if n_center > n_total:
        raise ValueError(f"variable_density_mask: the centre block ({n_center} lines = "
                         f"round({n} * {center_fraction})) exceeds floor(n / acceleration) = "
                         f"{n_total}; expected a smaller center_fraction or acceleration")
    centered = center_block(n, n_center)
    freq = np.arange(n) - n // 2  # frequency of each centred index
    weight = np.exp(-freq.astype(np.float64) ** 2 / (2 * (n / 10) ** 2)) + 1 / (2 * acceleration)
    free = np.flatnonzero(centered == 0)
    prob = weight[free] / weight[free].sum()
    chosen = np.random.default_rng(seed).choice(free, size=n_total - n_center, replace=False,
                                                p=prob)
    centered[chosen] = 1.0
    return to_layout(centered, "centered", "unshifted")


def to_layout(mask, src: str, dst: str):
    """Move a mask (numpy or torch, 1-D or 2-D) between the centred and unshifted layouts."""
    for name, value in (("src", src), ("dst", dst)):
        if value not in LAYOUTS:
            raise ValueError(f"{name}: expected one of {LAYOUTS}, found {value!r}")
    if src == dst:
        return mask
    lib = torch.fft if isinstance(mask, torch.Tensor) else np.fft
    return lib.ifftshift(mask) if dst == "unshifted" else lib.fftshift(mask)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A fixed 1-D ``[W]`` or 2-D ``[H, W]`` mask of zeros and ones from ``.npy``, as float32."""
    path = Path(path)
    try:
        mask = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: mask file not found") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read as a .npy mask: {err}") from None
    if mask.ndim not in (1, 2) or mask.size == 0:
        raise ValueError(f"{path}: expected a 1-D [W] or 2-D [H, W] mask, found shape "
                         f"{mask.shape}")
    if np.iscomplexobj(mask) or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{path}: expected only zeros and ones, found values "
                         f"{np.unique(mask)[:8].tolist()}")
    return mask.astype(np.float32)


def apply_mask(kspace, mask):
    """``kspace * mask + 0.0`` (numpy or torch): zero where the mask is 0, never -0.0.

    A numpy mask applied to a torch tensor is moved to the tensor's device first.
    """
    if isinstance(kspace, torch.Tensor) and not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask, device=kspace.device)
    return kspace * mask + 0.0


def make_mask(cfg: MaskConfig, n: int, *, seed: int | None = None) -> np.ndarray:
    """The mask ``cfg`` describes for ``n`` lines, float32, in ``cfg.layout``.

    ``seed`` (default ``cfg.seed``) draws the random kinds: pass :func:`file_seed` for
    validation and :func:`train_seed`-derived seeds for training; a fixed KD-MRI mask keeps
    ``cfg.seed``. ``kind="file"`` loads ``cfg.path``, taken to be in ``cfg.layout`` already, and
    checks that its last dimension is ``n``.
    """
    seed = cfg.seed if seed is None else seed
    if cfg.kind == "file":
        mask = load_mask(cfg.path)
        if mask.shape[-1] != n:
            raise ValueError(f"{cfg.path}: mask width {mask.shape[-1]} differs from the k-space "
                             f"width {n}")
        return mask
    if cfg.kind == "kdmri":
        mask, native = variable_density_mask(n, cfg.acceleration, cfg.center_fraction,
                                             seed), "unshifted"
    elif cfg.kind == "random":
        mask, native = random_mask(n, cfg.acceleration, cfg.center_fraction, seed), "centered"
    elif cfg.kind == "equispaced":
        mask, native = equispaced_fraction_mask(n, cfg.acceleration, cfg.center_fraction,
                                                seed), "centered"
    else:
        raise ValueError(f"mask.kind: expected one of kdmri, random, equispaced, file, found "
                         f"{cfg.kind!r}")
    return to_layout(mask, native, cfg.layout)


def seed_from(*parts: int | str) -> int:
    """A 63-bit seed from integers and strings, through numpy's SeedSequence.

    Strings enter as the first 16 bytes of their SHA-256, so the result is the same on every
    platform and Python process (unlike ``hash()``); negative integers enter modulo 2^64.
    """
    entropy = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:16], "little")
               if isinstance(p, str) else int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]
    low, high = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(high & 0x7FFFFFFF) << 32 | int(low)


def file_seed(fname: str | os.PathLike, base_seed: int) -> int:
    """Validation seed of a file: depends on its name (not its folder) and ``base_seed`` only."""
    return seed_from("file", Path(fname).name, base_seed)


def train_seed(run_seed: int, rank: int, worker: int, epoch: int) -> int:
    """Training seed of one (run seed, rank, DataLoader worker, epoch)."""
    for name, value in (("run_seed", run_seed), ("rank", rank), ("worker", worker),
                        ("epoch", epoch)):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative integer, found {value}")
    return seed_from("train", run_seed, rank, worker, epoch)
