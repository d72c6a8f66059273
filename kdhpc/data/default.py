"""The embedded default dataset: simulated brain k-space and cardiac short-axis labels, no download.

Run it::

    python -m kdhpc.data.default [CONFIG.yaml] [key=value ...] [--kind brain|cardiac|all]
                                 [--out DIR] [--force]

``key=value`` overrides are dotted config keys (``default_data.seed=3``); a bare field of
:class:`kdhpc.config.DefaultDataConfig` may drop the prefix (``seed=3 brain_size=128``). The
datasets are written under ``--out``, else ``$KDHPC_DATA``, else the user cache directory
(``$XDG_CACHE_HOME/kdhpc`` or ``~/.cache/kdhpc``), and the command prints what it made
(subjects, slices, sizes, seconds). Training code calls :func:`ensure_default` (or
:func:`dataset_root` with a whole :class:`~kdhpc.config.Config`), which generates a set the
first time a config names it and reuses it afterwards.

Folders (``digest12`` = first 12 hex digits of the SHA-256 of the generator version and the
config fields the set depends on, so a changed config never reuses an old set)::

    <root>/brain-<digest12>/{multicoil,singlecoil}_{train,val,test}/file_brain_<ACQ>_<NNN>.h5
    <root>/cardiac-<digest12>/{train,val,test}/patientNNN/...      (ACDC layout)
    <root>/<kind>-<digest12>/manifest.json

The manifest holds the generator version, the config and its digest, every file with its
size and SHA-256, every subject's parameters and split, and the generation time. A set is
generated in a hidden temporary folder and renamed into place when complete, under an
exclusive lock file, so a second process (another DeepSpeed rank) waits and then reuses it;
where the file system ignores locks the first rename wins and the loser discards its copy.

Brain (fastMRI layout, centred orthonormal FFT, :func:`kdhpc.data.degrade.fft2`)
---------------------------------------------------------------------------------
Anatomy is the MNI ICBM152 2009a symmetric template shipped in the nilearn wheel (T1 and grey/
white-matter probability maps, 197 x 233 x 189 at 1 mm, skull stripped), read by path with
nibabel. Brain probability ``b = [T1 > 0]``; CSF probability
``p_csf = clip(b - p_gm - p_wm, 0, 1)``. Each pseudo-subject draws, from
``numpy.random.default_rng([seed, 1, subject])``:

- a geometry: in-plane rotation, pitch, anisotropic scale, translation and a smooth random
  displacement field (cubic-spline upsampled coarse Gaussian grid), applied by
  ``scipy.ndimage.map_coordinates`` (linear) to the template pre-smoothed for the pixel size
  and slice thickness; ``brain_slices`` axial planes across the cerebrum; in-plane the
  233 x 233 mm square around the template's padded 197 x 233 slice, resampled to
  ``brain_size``, radiological orientation (image left = patient right, anterior up);
- a contrast (acquisition attr): ``m = sum_t I_t p_t`` over CSF/GM/WM with per-subject jittered
  intensities ``I_t`` (AXT1 is blended with the template T1, which carries the real deep-grey
  contrast; AXT2, AXFLAIR and AXPD are tissue models, AXPD is not a fastMRI name), a fine
  texture and a multiplicative bias field ``exp(0.15 g)``;
- a smooth phase ``phi``: complex image ``x = m exp(i phi)``;
- ``brain_coils`` coil maps ``S_c`` (Gaussian profiles around coil centres on a circle outside
  the field of view, birdcage-like phase ``arg(r - r_c)``), normalised so
  ``sum_c |S_c|^2 = 1`` at every pixel;
- k-space ``k_c = F(S_c x) + n_c``, ``F`` centred orthonormal, ``n_c`` complex Gaussian with
  standard deviation ``sigma`` = 1-3 % of the median brain intensity (the same in the image
  domain, F being unitary).

Multi-coil files hold ``kspace`` ``(S, C, N, N)`` complex64 and ``reconstruction_rss`` =
``sqrt(sum_c |F^-1 k_c|^2)`` of the stored k-space. Single-coil files emulate one coil
(fastMRI's "esc"): ``x_sc = sum_c conj(S_c) F^-1 k_c``, ``kspace = F x_sc`` ``(S, N, N)`` and
``reconstruction_esc = |F^-1 kspace|``. Every split, test included, is fully sampled with its
target (masks are applied by the training code, :mod:`kdhpc.data.masks`). Both carry the
extra dataset ``tissue`` ``(S, N, N)`` uint8 (0 background, 1 CSF, 2 GM, 3 WM; argmax of the
sampled probabilities inside ``b >= 0.5``) for SNR regions of interest. Intensities are in
arbitrary units with the white matter near 1 (real fastMRI files are ~1e-4: normalise per
slice either way).

Cardiac (ACDC layout, :func:`kdhpc.data.acdc.write_acdc_patient`)
-----------------------------------------------------------------
An analytic short-axis cine generator on a 288 mm field of view (``cardiac_size`` pixels):
body ellipse with subcutaneous fat, lungs, vertebral body, descending aorta, pericardial fat,
LV myocardium (annulus with harmonic boundary irregularity; infarcts thin a sector), LV blood
pool with papillary muscles, RV blood crescent (an ellipse beside the LV minus the LV
epicardium) with its free wall. ``cardiac_slices`` slices go from base to 85 % of the LV long
axis; radii follow a half-ellipsoid ``r(z) = r_0 sqrt(1 - (z / L)^2)`` so the cavity shrinks
to the apex and the shorter RV disappears first. End systole shortens the long axis, shrinks
the cavities by a group-dependent factor and thickens the wall at constant myocardial area per
slice. Groups (Info.cfg) cycle through ACDC's NOR, MINF, DCM, HCM, RV and set the parameter
ranges.

Labels (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity; papillary muscles belong to
the LV cavity as in ACDC) are the drawn regions exactly. The image assigns each drawn region a
per-patient intensity (bSSFP-like: blood bright, myocardium dark, lungs black), multiplies a
smooth texture, blurs by the point-spread function (Gaussian, 0.6 px), multiplies a bias field
and adds Rician noise ``|y + n|``, ``n`` complex Gaussian (the image is magnitude MRI).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage

from kdhpc.config import (Config, ConfigError, DefaultDataConfig, digest, load_config, sha256_file,
                          write_atomic)

GENERATOR_VERSION = 2  # bump whenever the generated bytes change
KINDS = ("brain", "cardiac")
SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # the split of default_data.brain_unlabelled_subjects
MANIFEST = "manifest.json"

# fastMRI-style acquisition -> mean (CSF, GM, WM) intensity and weight of the template T1
BRAIN_CONTRASTS = {
    "AXT1": ((0.30, 0.62, 0.88), 0.6),
    "AXT2": ((1.00, 0.58, 0.42), 0.0),
    "AXFLAIR": ((0.08, 0.70, 0.50), 0.0),
    "AXPD": ((0.85, 0.78, 0.64), 0.0),
}
TEMPLATE_FOV_MM = 233.0   # the 197 x 233 axial template slice padded to a square
TEMPLATE_CENTRE = (98.0, 116.0)  # voxel (x, y) at the centre of that square
BRAIN_Z_RANGE = (32.0, 146.0)    # template z voxels covered by the slab (cerebellum to vertex)
CARDIAC_FOV_MM = 288.0           # 192 px at ACDC's typical 1.5 mm
CARDIAC_GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")


class DefaultDataError(RuntimeError):
    """A cached default dataset that cannot be used; the message names the folder and file."""


# ---------------------------------------------------------------------------------------------
# shared pieces

def smooth_random_field(rng: np.random.Generator, shape: Sequence[int],
                        cells: Sequence[int]) -> np.ndarray:
    """A smooth random field of ``shape``: standard normals on a ``cells`` grid, cubic-spline
    upsampled (corners aligned, as ``scipy.ndimage.zoom(order=3)``), so it varies on the scale
    ``shape / cells``; float32. The upsampling is separable, applied as one matrix per axis."""
    cells = tuple(max(1, min(int(c), int(s))) for c, s in zip(cells, shape))
    field = rng.standard_normal(cells)
    for axis, (n_out, n_in) in enumerate(zip(shape, cells)):
        field = np.moveaxis(np.tensordot(spline_upsampling(n_in, n_out), field, axes=(1, axis)),
                            0, axis)
    return field.astype(np.float32)


@functools.lru_cache(maxsize=64)
def spline_upsampling(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` matrix of cubic-spline interpolation from ``n_in`` to ``n_out`` samples
    (zoom is linear, so zooming the identity gives its matrix)."""
    if n_in == n_out:
        return np.eye(n_in)
    return ndimage.zoom(np.eye(n_in), (n_out / n_in, 1.0), order=3, mode="nearest")


def split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """(train, val, test) counts of ``n`` subjects: val and test get ``round(n f)`` but at
    least one each, train the rest (at least one; needs n >= 3)."""
    if n < 3:
        raise ConfigError(f"default_data: expected at least 3 subjects to fill train/val/test, "
                          f"found {n}")
    val = max(1, int(round(n * fractions[1])))
    test = max(1, int(round(n * fractions[2])))
    while n - val - test < 1:
        if val >= test:
            val -= 1
        else:
            test -= 1
    return n - val - test, val, test


def assign_splits(n: int, fractions: Sequence[float], seed: int, kind_id: int) -> list[str]:
    """Split name of each subject 0..n-1: a seeded permutation cut by :func:`split_counts`."""
    order = np.random.default_rng([seed, kind_id, 1_000_000]).permutation(n)
    counts = split_counts(n, fractions)
    names = [name for name, count in zip(SPLITS, counts) for _ in range(count)]
    out = [""] * n
    for position, subject in enumerate(order):
        out[int(subject)] = names[position]
    return out


def pixel_centres_mm(size: int, fov_mm: float) -> np.ndarray:
    """Positions (mm) of ``size`` pixel centres across ``fov_mm``, relative to its centre."""
    return ((np.arange(size) + 0.5) * (fov_mm / size) - fov_mm / 2).astype(np.float32)


def ellipse_radius(x: np.ndarray, y: np.ndarray, centre: Sequence[float],
                   semi_axes: Sequence[float], angle: float) -> np.ndarray:
    """Normalised elliptical radius: < 1 inside the ellipse of ``semi_axes`` (a, b) rotated by
    ``angle`` (rad) about ``centre``."""
    dx, dy = x - centre[0], y - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2)


# ---------------------------------------------------------------------------------------------
# brain: template

def template_files() -> dict[str, Path]:
    """Paths of the MNI ICBM152 2009a T1/GM/WM NIfTI files inside the installed nilearn wheel."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DefaultDataError("default brain data: expected the nilearn package (it ships the "
                               "MNI ICBM152 template), found it not installed; pip install "
                               "nilearn")
    folder = Path(spec.origin).parent / "datasets" / "data"
    files = {k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz"
             for k in ("t1", "gm", "wm")}
    for name, path in files.items():
        if not path.is_file():
            raise DefaultDataError(f"{path}: expected nilearn's MNI ICBM152 {name} template, "
                                   f"found no file")
    return files


@functools.lru_cache(maxsize=1)
def load_template() -> dict[str, np.ndarray]:
    """The template as float32 volumes in [0, 1] indexed [x, y, z] (1 mm voxels): ``t1``
    (scaled so white matter is ~1), ``gm``, ``wm`` and the brain mask ``brain``."""
    import nibabel as nib

    out = {}
    for name, path in template_files().items():
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32) / 255.0
        if volume.shape != (197, 233, 189):
            raise DefaultDataError(f"{path}: expected shape (197, 233, 189), found {volume.shape}")
        out[name] = volume
    out["brain"] = (out["t1"] > 0).astype(np.float32)
    out["t1"] /= np.percentile(out["t1"][out["wm"] > 0.9], 50)
    return out


@functools.lru_cache(maxsize=4)
def smoothed_template(sigma: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """The template low-pass filtered with a Gaussian of ``sigma`` voxels per axis, so that
    linear sampling at the output pixel size and slice thickness does not alias."""
    return {k: ndimage.gaussian_filter(v, sigma, mode="constant") if max(sigma) > 0 else v
            for k, v in load_template().items()}


# ---------------------------------------------------------------------------------------------
# brain: subjects

@dataclasses.dataclass
class BrainSubject:
    """Everything drawn for one pseudo-subject (recorded in the manifest)."""

    index: int
    split: str
    acquisition: str
    patient_id: str
    intensities: tuple[float, float, float]   # CSF, GM, WM
    template_weight: float
    z_voxels: list[float]                     # template z of each slice centre, before warping
    rotation_deg: float
    pitch_deg: float
    scale: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    noise_fraction: float


def subject_rng(seed: int, kind_id: int, index: int) -> np.random.Generator:
    """The generator of one subject; independent of how many subjects a set has."""
    return np.random.default_rng([seed, kind_id, index])


def plan_brain_subject(cfg: DefaultDataConfig, index: int, split: str,
                       rng: np.random.Generator) -> BrainSubject:
    """Draw one brain subject's scalar parameters (the first draws of its generator)."""
    acquisition = list(BRAIN_CONTRASTS)[int(rng.integers(len(BRAIN_CONTRASTS)))]
    means, weight = BRAIN_CONTRASTS[acquisition]
    intensities = tuple(float(m * rng.uniform(0.9, 1.1)) for m in means)
    lo, hi = BRAIN_Z_RANGE
    lo += rng.uniform(-4, 4)
    hi += rng.uniform(-4, 4)
    step = (hi - lo) / cfg.brain_slices
    z = [float(lo + (k + 0.5) * step) for k in range(cfg.brain_slices)]
    return BrainSubject(
        index=index, split=split, acquisition=acquisition,
        patient_id=f"kdhpc-brain-s{cfg.seed}-{index:03d}", intensities=intensities,
        template_weight=weight, z_voxels=z,
        rotation_deg=float(rng.uniform(-10, 10)), pitch_deg=float(rng.uniform(-6, 6)),
        scale=tuple(float(s) for s in rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, 3)),
        shift_mm=tuple(float(s) for s in rng.uniform(-6, 6, 3) * (1, 1, 0.5)),
        noise_fraction=float(rng.uniform(0.01, 0.03)))


def brain_sampling_grid(subject: BrainSubject, size: int, rng: np.random.Generator,
                        warp_mm: float = 2.5) -> np.ndarray:
    """Template voxel coordinates ``[3, S, N, N]`` (x, y, z) of every output pixel.

    Output pixel (row r, column c) of slice k sits at ``q = (X, Y, Z)`` mm with X = patient
    left-to-right reversed (radiological), Y anterior up, Z = z_k - slab centre. The template
    point is ``centre + R_pitch R_yaw (scale * q) + shift + d(q)``, d a smooth random field with
    ``warp_mm`` standard deviation per component.
    """
    n_slices = len(subject.z_voxels)
    u = pixel_centres_mm(size, TEMPLATE_FOV_MM)
    z = np.asarray(subject.z_voxels, dtype=np.float32)
    z_centre = float(z.mean())
    qz, qy, qx = np.meshgrid(z - z_centre, -u, -u, indexing="ij")  # [S, N, N] each
    q = np.stack([qx, qy, qz]) * np.asarray(subject.scale, np.float32)[:, None, None, None]
    yaw, pitch = np.deg2rad(subject.rotation_deg), np.deg2rad(subject.pitch_deg)
    rot_yaw = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    rot_pitch = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)],
                          [0, np.sin(pitch), np.cos(pitch)]])
    rotation = (rot_pitch @ rot_yaw).astype(np.float32)
    coords = np.einsum("ij,j...->i...", rotation, q)  # [3, S, N, N]
    cells = (min(n_slices, 3), 5, 5)
    for axis in range(3):
        coords[axis] += warp_mm * smooth_random_field(rng, (n_slices, size, size), cells)
    origin = (TEMPLATE_CENTRE[0], TEMPLATE_CENTRE[1], z_centre)
    for axis in range(3):
        coords[axis] += origin[axis] + subject.shift_mm[axis]
    return coords


def render_brain(subject: BrainSubject, size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude ``[S, N, N]`` float32 and tissue labels ``[S, N, N]`` uint8 of one subject."""
    n_slices = len(subject.z_voxels)
    pixel_mm = TEMPLATE_FOV_MM / size
    thickness_mm = min(5.0, (BRAIN_Z_RANGE[1] - BRAIN_Z_RANGE[0]) / n_slices)
    # Gaussian ~ box of one pixel / one slice thickness (sigma = 0.4 width), none when finer.
    sigma_xy = round(0.4 * pixel_mm, 2) if pixel_mm > 1.0 else 0.0
    sigma_z = round(0.4 * thickness_mm, 2) if thickness_mm > 1.0 else 0.0
    template = smoothed_template((sigma_xy, sigma_xy, sigma_z))
    coords = brain_sampling_grid(subject, size, rng)
    w = subject.template_weight
    needed = ("gm", "wm", "brain", "t1") if w > 0 else ("gm", "wm", "brain")
    sampled = {k: ndimage.map_coordinates(template[k], coords, order=1, mode="constant", cval=0.0)
               for k in needed}  # [S, N, N] each
    gm, wm, brain = sampled["gm"], sampled["wm"], sampled["brain"]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    i_csf, i_gm, i_wm = subject.intensities
    magnitude = i_csf * csf + i_gm * gm + i_wm * wm
    if w > 0:
        magnitude = (1 - w) * magnitude + w * i_wm * sampled["t1"]
    shape = (n_slices, size, size)
    texture = 1.0 + 0.03 * smooth_random_field(rng, shape, (n_slices, size // 6, size // 6))
    bias = np.exp(0.15 * smooth_random_field(rng, shape, (min(n_slices, 2), 3, 3)))
    magnitude = np.clip(magnitude * texture * bias, 0.0, None).astype(np.float32)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    tissue[brain < 0.5] = 0
    return magnitude, tissue


def coil_maps(rng: np.random.Generator, size: int, coils: int) -> np.ndarray:
    """Coil sensitivities ``[C, N, N]`` complex64 with ``sum_c |S_c|^2 = 1`` at every pixel.

    Coil c sits at angle ``2 pi c / C + offset`` on a circle of radius 1.1-1.4 (field of view
    half-width = 1); its profile is ``exp(-|r - r_c|^2 / (2 w^2)) exp(i (arg(r - r_c) + theta_c))``.
    """
    u = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(-u, u, indexing="ij")
    offset = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(1.1, 1.4)
    maps = np.empty((coils, size, size), np.complex128)
    for c in range(coils):
        angle = offset + 2 * np.pi * c / coils + rng.uniform(-0.1, 0.1)
        cx, cy = radius * np.cos(angle), radius * np.sin(angle)
        width = rng.uniform(0.7, 1.0)
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        phase = np.arctan2(y - cy, x - cx) + rng.uniform(0, 2 * np.pi)
        maps[c] = np.exp(-d2 / (2 * width**2)) * np.exp(1j * phase)
    maps /= np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    return maps.astype(np.complex64)


def centred_fft2(x: np.ndarray, inverse: bool = False) -> np.ndarray:
    """fastMRI's centred orthonormal (inverse) 2-D FFT of a numpy array, through
    :mod:`kdhpc.data.degrade` so the convention lives in one place."""
    from kdhpc.data.degrade import fft2, ifft2

    out = (ifft2 if inverse else fft2)(torch.from_numpy(np.ascontiguousarray(x)), centered=True)
    return out.numpy()


def root_sum_of_squares(coil_images: np.ndarray, axis: int) -> np.ndarray:
    """``sqrt(sum_c |x_c|^2)`` along ``axis``, float32."""
    return np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=axis)).astype(np.float32)


def simulate_brain_kspace(magnitude: np.ndarray, subject: BrainSubject, coils: int,
                          rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Multi-coil and emulated single-coil k-space and their targets for ``magnitude``
    ``[S, N, N]`` (formulas in the module docstring)."""
    n_slices, size, _ = magnitude.shape
    phase = np.pi * (0.5 * smooth_random_field(rng, magnitude.shape, (min(n_slices, 2), 3, 3))
                     + rng.uniform(-1, 1))
    image = magnitude * np.exp(1j * phase).astype(np.complex64)  # [S, N, N]
    maps = coil_maps(rng, size, coils)  # [C, N, N]
    kspace = centred_fft2(image[:, None] * maps[None])  # [S, C, N, N]
    sigma = subject.noise_fraction * float(np.median(magnitude[magnitude > 0.1 * magnitude.max()]))
    noise = rng.standard_normal((2, *kspace.shape), dtype=np.float32)
    noise *= np.float32(sigma / np.sqrt(2))
    kspace = kspace.astype(np.complex64)
    kspace.real += noise[0]
    kspace.imag += noise[1]
    coil_images = centred_fft2(kspace, inverse=True)  # [S, C, N, N]
    combined = np.sum(np.conj(maps)[None] * coil_images, axis=1)  # [S, N, N]
    # |F^-1 F x| = |x| up to float32 rounding, so the esc target skips one transform.
    return {"kspace_multicoil": kspace,
            "rss": root_sum_of_squares(coil_images, axis=1),
            "kspace_singlecoil": centred_fft2(combined).astype(np.complex64),
            "esc": np.abs(combined).astype(np.float32)}


def generate_brain(cfg: DefaultDataConfig, out: Path) -> list[dict]:
    """Write every brain subject under ``out``; returns one manifest record per subject."""
    from kdhpc.data.fastmri import write_fastmri

    # Unlabelled subjects come after the others, so the train/val/test files do not change.
    splits = (assign_splits(cfg.brain_subjects, cfg.split, cfg.seed, kind_id=1)
              + [UNLABELLED] * cfg.brain_unlabelled_subjects)
    records = []
    for index in range(len(splits)):
        rng = subject_rng(cfg.seed, 1, index)
        subject = plan_brain_subject(cfg, index, splits[index], rng)
        magnitude, tissue = render_brain(subject, cfg.brain_size, rng)
        data = simulate_brain_kspace(magnitude, subject, cfg.brain_coils, rng)
        name = f"file_brain_{subject.acquisition}_{index:03d}.h5"
        files = []
        for challenge, kspace, target in (("multicoil", data["kspace_multicoil"], data["rss"]),
                                          ("singlecoil", data["kspace_singlecoil"], data["esc"])):
            path = out / f"{challenge}_{subject.split}" / name
            write_fastmri(path, kspace, target, acquisition=subject.acquisition,
                          patient_id=subject.patient_id, extra={"tissue": tissue})
            files.append(str(path.relative_to(out)))
        records.append({**dataclasses.asdict(subject), "files": files})
    return records


# ---------------------------------------------------------------------------------------------
# cardiac

@dataclasses.dataclass
class CardiacPatient:
    """Everything drawn for one pseudo-patient (recorded in the manifest); lengths in mm,
    angles in radians, image x to the right and y up (anterior)."""

    number: int
    split: str
    group: str
    nb_frames: int
    es_frame: int
    height_cm: float
    weight_kg: float
    long_axis_mm: float
    slice_gap_mm: float
    es_shortening: float
    lv_centre: tuple[float, float]
    lv_drift: tuple[float, float]          # LV centre displacement from base to apex slice
    lv_angle: float
    lv_ellipticity: float
    endo_radius_ed: float
    endo_radius_es: float
    wall_ed: float
    wall_harmonics: list[tuple[float, float]]   # (amplitude, phase) of cos(h theta), h = 2, 3, 4
    infarct: tuple[float, float]           # (angle, depth) of a thinned sector, depth 0 = none
    rv_direction: float
    rv_distance: float                     # of the RV centre, in LV epicardial radii
    rv_semi_axes: tuple[float, float]      # radial, tangential, in LV epicardial radii
    rv_length: float                       # RV long axis as a fraction of the LV's
    rv_es_scale: float
    body_centre: tuple[float, float]
    body_semi_axes: tuple[float, float]
    body_angle: float
    fat_mm: float
    intensities: dict[str, float]
    noise_sigma: float


GROUP_RANGES = {   # endocardial radius at ED (mm), ED wall (mm), ES/ED radius, RV scale
    "NOR": ((22, 27), (7, 10), (0.62, 0.72), (1.0, 1.15)),
    "MINF": ((26, 32), (6, 9), (0.78, 0.88), (1.0, 1.15)),
    "DCM": ((30, 37), (5, 8), (0.85, 0.93), (1.0, 1.2)),
    "HCM": ((18, 23), (13, 18), (0.45, 0.6), (0.95, 1.1)),
    "RV": ((21, 26), (7, 10), (0.62, 0.75), (1.35, 1.65)),
}
CARDIAC_REGIONS = ("air", "body", "fat", "lung", "spine", "aorta", "pericardial_fat", "rv_wall",
                   "rv_blood", "myocardium", "lv_blood", "papillary")
REGION_LABEL = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 3], np.uint8)


def plan_cardiac_patient(cfg: DefaultDataConfig, index: int, split: str,
                         rng: np.random.Generator) -> CardiacPatient:
    """Draw one patient's parameters; the group cycles with the index like ACDC's 20 per group."""
    group = CARDIAC_GROUPS[index % len(CARDIAC_GROUPS)]
    endo, wall, es_ratio, rv_scale = GROUP_RANGES[group]
    nb_frames = int(rng.integers(12, 36))
    long_axis = float(rng.uniform(78, 98))
    endo_ed = float(rng.uniform(*endo))
    blood = float(rng.uniform(0.8, 1.0))
    return CardiacPatient(
        number=index + 1, split=split, group=group, nb_frames=nb_frames,
        es_frame=int(round(rng.uniform(0.3, 0.45) * nb_frames)) + 1,
        height_cm=float(round(rng.uniform(150, 195), 1)),
        weight_kg=float(round(rng.uniform(50, 110), 1)),
        long_axis_mm=long_axis, slice_gap_mm=0.85 * long_axis / cfg.cardiac_slices,
        es_shortening=float(rng.uniform(0.84, 0.92)),
        lv_centre=(float(rng.uniform(0, 25)), float(rng.uniform(-5, 20))),
        lv_drift=(float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8))),
        lv_angle=float(rng.uniform(0, np.pi)), lv_ellipticity=float(rng.uniform(0.88, 1.0)),
        endo_radius_ed=endo_ed, endo_radius_es=endo_ed * float(rng.uniform(*es_ratio)),
        wall_ed=float(rng.uniform(*wall)),
        wall_harmonics=[(float(rng.uniform(0, 0.035)), float(rng.uniform(0, 2 * np.pi)))
                        for _ in range(3)],
        infarct=(float(rng.uniform(0, 2 * np.pi)),
                 float(rng.uniform(0.35, 0.6)) if group == "MINF" else 0.0),
        rv_direction=float(np.pi + rng.uniform(-0.45, 0.05)),
        rv_distance=float(rng.uniform(0.7, 0.95)),
        rv_semi_axes=tuple(float(a) * float(rng.uniform(*rv_scale))
                           for a in (rng.uniform(0.7, 0.9), rng.uniform(1.25, 1.5))),
        rv_length=float(rng.uniform(0.72, 0.85)), rv_es_scale=float(rng.uniform(0.7, 0.82)),
        body_centre=(float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8))),
        body_semi_axes=(float(rng.uniform(125, 160)), float(rng.uniform(90, 115))),
        body_angle=float(rng.uniform(-0.1, 0.1)), fat_mm=float(rng.uniform(6, 18)),
        intensities={"air": 0.0, "body": float(rng.uniform(0.3, 0.42)),
                     "fat": float(rng.uniform(0.65, 0.85)), "lung": float(rng.uniform(0.02, 0.06)),
                     "spine": float(rng.uniform(0.4, 0.55)),
                     "aorta": blood * float(rng.uniform(0.85, 1.0)),
                     "pericardial_fat": float(rng.uniform(0.55, 0.75)),
                     "rv_wall": float(rng.uniform(0.2, 0.32)),
                     "rv_blood": blood * float(rng.uniform(0.9, 1.0)),
                     "myocardium": float(rng.uniform(0.2, 0.32)), "lv_blood": blood,
                     "papillary": float(rng.uniform(0.22, 0.35))},
        noise_sigma=float(rng.uniform(0.015, 0.04)))


def cardiac_regions(patient: CardiacPatient, size: int, n_slices: int, phase: str) -> np.ndarray:
    """Region index map ``[S, N, N]`` uint8 (into :data:`CARDIAC_REGIONS`) of one frame;
    slice 0 is the base. ``phase`` is ``"ED"`` or ``"ES"``."""
    u = pixel_centres_mm(size, CARDIAC_FOV_MM)
    y, x = np.meshgrid(-u, u, indexing="ij")  # [N, N], y anterior up
    p = patient
    regions = np.zeros((n_slices, size, size), np.uint8)
    index = {name: i for i, name in enumerate(CARDIAC_REGIONS)}
    body_axes = np.asarray(p.body_semi_axes)
    bx, by = p.body_centre
    body = ellipse_radius(x, y, p.body_centre, body_axes, p.body_angle)
    inner = ellipse_radius(x, y, p.body_centre, body_axes - p.fat_mm, p.body_angle)
    lungs = np.minimum(
        ellipse_radius(x, y, (bx - 70, by - 10), (48, 68), 0.15),
        ellipse_radius(x, y, (bx + 78, by - 12), (46, 66), -0.15))
    aorta = ellipse_radius(x, y, (bx + 22, by - 62), (12, 12), 0.0)
    spine = ellipse_radius(x, y, (bx, by - 82), (17, 14), 0.0)
    es = phase == "ES"
    shortening = p.es_shortening if es else 1.0
    for k in range(n_slices):
        depth = (k + 0.5) / n_slices * 0.85           # fraction of the ED long axis from base
        lv_profile = np.sqrt(max(0.0, 1 - (depth / shortening) ** 2))
        rv_profile = np.sqrt(max(0.0, 1 - (depth / (p.rv_length * shortening)) ** 2))
        endo_ed = p.endo_radius_ed * np.sqrt(max(0.0, 1 - depth**2))
        epi_ed = endo_ed + p.wall_ed * (0.8 + 0.2 * np.sqrt(max(0.0, 1 - depth**2)))
        if es:
            endo = p.endo_radius_es * lv_profile
            epi = np.sqrt(endo**2 + epi_ed**2 - endo_ed**2)  # myocardial area kept per slice
        else:
            endo, epi = endo_ed, epi_ed
        if endo < 2.0:                                   # apical cap: no cavity left
            endo = 0.0
        cx = p.lv_centre[0] + bx + p.lv_drift[0] * depth
        cy = p.lv_centre[1] + by + p.lv_drift[1] * depth
        dx, dy = x - cx, y - cy
        ca, sa = np.cos(p.lv_angle), np.sin(p.lv_angle)
        lu, lv = ca * dx + sa * dy, (-sa * dx + ca * dy) / p.lv_ellipticity
        rho, theta = np.hypot(lu, lv), np.arctan2(lv, lu) + p.lv_angle
        wobble = 1 + sum(a * np.cos((h + 2) * theta + ph)
                         for h, (a, ph) in enumerate(p.wall_harmonics))
        angle, thinning = p.infarct
        sector = np.exp(4.0 * (np.cos(theta - angle) - 1))
        endo_t = endo * wobble
        epi_t = endo_t + (epi - endo) * wobble * (1 - thinning * sector)
        scale = epi * rv_profile * (p.rv_es_scale if es else 1.0)
        rv_centre = (cx + p.rv_distance * epi * np.cos(p.rv_direction),
                     cy + p.rv_distance * epi * np.sin(p.rv_direction))
        rv_axes = np.asarray(p.rv_semi_axes) * max(scale, 1e-3)
        rv = ellipse_radius(x, y, rv_centre, rv_axes, p.rv_direction)
        rv_wall = ellipse_radius(x, y, rv_centre, rv_axes + 2.5, p.rv_direction)
        rv_fat = ellipse_radius(x, y, rv_centre, rv_axes + 5.5, p.rv_direction)
        has_rv = scale > 2.0
        out = regions[k]
        out[body < 1] = index["body"]
        out[(body < 1) & (inner >= 1)] = index["fat"]
        out[(lungs < 1) & (inner < 1)] = index["lung"]
        out[spine < 1] = index["spine"]
        out[aorta < 1] = index["aorta"]
        out[(rho < epi_t + 3.0) | (has_rv & (rv_fat < 1))] = index["pericardial_fat"]
        if has_rv:
            out[rv_wall < 1] = index["rv_wall"]
            out[(rv < 1) & (rho >= epi_t)] = index["rv_blood"]
        out[rho < epi_t] = index["myocardium"]
        out[rho < endo_t] = index["lv_blood"]
        if endo > 10.0:
            for offset in (0.9, -0.9):   # anterolateral and posteromedial papillary muscles
                pa = p.lv_angle + offset
                px, py = cx + 0.72 * endo * np.cos(pa), cy + 0.72 * endo * np.sin(pa)
                papillary = np.hypot(x - px, y - py) < 0.16 * endo
                out[papillary & (rho < endo_t)] = index["papillary"]
    return regions


def render_cardiac(patient: CardiacPatient, regions: np.ndarray,
                   rng: np.random.Generator, texture: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Magnitude image ``[S, N, N]`` float32 of a region map (see the module docstring)."""
    levels = np.array([patient.intensities[name] for name in CARDIAC_REGIONS], np.float32)
    image = levels[regions] * texture
    pixel_sigma = 0.6
    image = ndimage.gaussian_filter(image, (0, pixel_sigma, pixel_sigma), mode="constant")
    image *= bias
    noise = rng.standard_normal((2, *image.shape), dtype=np.float32)
    noise *= np.float32(patient.noise_sigma)
    return np.hypot(image + noise[0], noise[1]).astype(np.float32)


def generate_cardiac(cfg: DefaultDataConfig, out: Path) -> list[dict]:
    """Write every cardiac patient under ``out``; returns one manifest record per patient."""
    from kdhpc.data.acdc import write_acdc_patient

    splits = assign_splits(cfg.cardiac_patients, cfg.split, cfg.seed, kind_id=2)
    size, n_slices = cfg.cardiac_size, cfg.cardiac_slices
    shape = (n_slices, size, size)
    records = []
    for index in range(cfg.cardiac_patients):
        rng = subject_rng(cfg.seed, 2, index)
        patient = plan_cardiac_patient(cfg, index, splits[index], rng)
        texture = 1.0 + 0.06 * smooth_random_field(rng, shape, (n_slices, size // 12, size // 12))
        bias = np.exp(0.2 * smooth_random_field(rng, shape, (min(n_slices, 2), 3, 3)))
        frames = {}
        for frame, phase in ((1, "ED"), (patient.es_frame, "ES")):
            regions = cardiac_regions(patient, size, n_slices, phase)
            image = render_cardiac(patient, regions, rng, texture, bias)
            # ACDC arrays are (H, W, S)
            frames[frame] = (np.moveaxis(image, 0, -1), np.moveaxis(REGION_LABEL[regions], 0, -1))
        info = {"ED": 1, "ES": patient.es_frame, "Group": patient.group,
                "Height": patient.height_cm, "NbFrame": patient.nb_frames,
                "Weight": patient.weight_kg}
        pixel = CARDIAC_FOV_MM / size
        folder = write_acdc_patient(out / patient.split, patient.number, frames, info,
                                    spacing=(pixel, pixel, patient.slice_gap_mm))
        files = sorted(str(f.relative_to(out)) for f in folder.iterdir())
        records.append({**dataclasses.asdict(patient), "files": files})
    return records


# ---------------------------------------------------------------------------------------------
# cache folder, manifest, locking

def cache_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$KDHPC_DATA``, else ``$XDG_CACHE_HOME/kdhpc``, else ``~/.cache/kdhpc``."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("KDHPC_DATA"):
        return Path(os.environ["KDHPC_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdhpc"


def dataset_config(cfg: DefaultDataConfig, kind: str) -> dict:
    """The generator version and the config fields a ``kind`` set depends on."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, found {kind!r}")
    fields = dataclasses.asdict(cfg)
    mine = {k: v for k, v in fields.items() if k in ("seed", "split") or k.startswith(kind)}
    if not cfg.brain_unlabelled_subjects:  # a set made before the field existed keeps its name
        mine.pop("brain_unlabelled_subjects", None)
    return {"kind": kind, "generator_version": GENERATOR_VERSION, **mine}


def dataset_name(cfg: DefaultDataConfig, kind: str) -> str:
    """``<kind>-<first 12 hex digits of the config digest>``."""
    return f"{kind}-{digest(dataset_config(cfg, kind))[:12]}"


def read_manifest(folder: Path) -> dict:
    """The manifest of a generated set, checked cheaply (digest, every file present with its
    recorded size); a problem is a DefaultDataError naming the folder and file."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DefaultDataError(f"{path}: missing; {folder} is not a complete default dataset "
                               f"(delete it or regenerate with --force)") from None
    except json.JSONDecodeError as err:
        raise DefaultDataError(f"{path}: expected JSON, found unparsable text ({err}); "
                               f"delete {folder} or regenerate with --force") from None
    expected = folder.name.rsplit("-", 1)[-1]
    if not str(manifest.get("digest", "")).startswith(expected):
        raise DefaultDataError(f"{path}: digest: expected one starting with {expected} (the "
                               f"folder name), found {manifest.get('digest')!r}")
    for entry in manifest.get("files", []):
        file = folder / entry["path"]
        if not file.is_file():
            raise DefaultDataError(f"{file}: listed in {path} but missing; delete {folder} or "
                                   f"regenerate with --force")
        if file.stat().st_size != entry["bytes"]:
            raise DefaultDataError(f"{file}: expected {entry['bytes']} bytes as listed in "
                                   f"{path}, found {file.stat().st_size} (truncated or changed)")
    return manifest


def verify_default(folder: str | os.PathLike) -> dict:
    """:func:`read_manifest` plus the SHA-256 of every file (slow for big sets)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for entry in manifest["files"]:
        found = sha256_file(folder / entry["path"])
        if found != entry["sha256"]:
            raise DefaultDataError(f"{folder / entry['path']}: expected SHA-256 "
                                   f"{entry['sha256']} from the manifest, found {found}")
    return manifest


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing); blocks until free."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def generate_set(cfg: DefaultDataConfig, kind: str, folder: Path) -> dict:
    """Generate a ``kind`` set into the empty ``folder``, write its manifest and return it."""
    start = time.perf_counter()
    records = (generate_brain if kind == "brain" else generate_cardiac)(cfg, folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {
        "generator_version": GENERATOR_VERSION, "kind": kind,
        "config": dataset_config(cfg, kind), "digest": digest(dataset_config(cfg, kind)),
        "files": [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size,
                   "sha256": sha256_file(p)} for p in files],
        "subjects": records,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def ensure_default(cfg: DefaultDataConfig, kind: str = "brain",
                   root: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """The folder of the ``kind`` ("brain" or "cardiac") default set for ``cfg``, generated
    first if missing (or when ``force``). Safe to call from many processes at once."""
    return find_or_generate(cfg, kind, root, force)[0]


def find_or_generate(cfg: DefaultDataConfig, kind: str, root: str | os.PathLike | None,
                     force: bool) -> tuple[Path, bool]:
    """(:func:`ensure_default`'s folder, whether this call generated it)."""
    name = dataset_name(cfg, kind)
    base = cache_root(root)
    final = base / name
    # Sets appear by an atomic rename, so an existing folder is complete unless damaged since:
    # read_manifest refuses a damaged one rather than silently generating over it.
    if not force and final.exists():
        read_manifest(final)
        return final, False
    base.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(base / f".{name}.lock"):
        if not force and final.exists():   # another process made it while this one waited
            read_manifest(final)
            return final, False
        # Holding the lock, any temporary folder of this name is a crashed run's leftover.
        for stale in base.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = base / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            generate_set(cfg, kind, tmp)
            if final.exists():
                old = base / f".{name}.tmp-old-{os.getpid()}-{secrets.token_hex(4)}"
                old.mkdir()
                os.replace(final, old / name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.rename(tmp, final)
                except OSError:
                    # Lock-less file system and another process renamed first: theirs wins.
                    if not (final / MANIFEST).is_file():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def dataset_root(cfg: Config) -> Path:
    """The data root a run reads: ``cfg.data.root`` when set, else for ``default_brain`` /
    ``default_cardiac`` the embedded set (generated on first use)."""
    if cfg.data.root:
        return Path(cfg.data.root)
    kinds = {"default_brain": "brain", "default_cardiac": "cardiac"}
    if cfg.data.dataset not in kinds:
        raise ConfigError(f"data.root: expected a folder for dataset {cfg.data.dataset!r}, "
                          f"found ''")
    return ensure_default(cfg.default_data, kinds[cfg.data.dataset])


# ---------------------------------------------------------------------------------------------
# command line

def describe_set(folder: Path, manifest: dict) -> list[str]:
    """Lines that say what a set holds: subjects per split, slices, sizes, bytes, seconds."""
    cfg = manifest["config"]
    subjects = manifest["subjects"]
    per_split = {s: sum(r["split"] == s for r in subjects) for s in (*SPLITS, UNLABELLED)}
    if not per_split[UNLABELLED]:
        del per_split[UNLABELLED]
    megabytes = sum(f["bytes"] for f in manifest["files"]) / 1e6
    if manifest["kind"] == "brain":
        what = (f"{len(subjects)} subjects x {cfg['brain_slices']} slices, "
                f"{cfg['brain_size']}x{cfg['brain_size']}, {cfg['brain_coils']} coils, "
                f"acquisitions {sorted({r['acquisition'] for r in subjects})}")
    else:
        what = (f"{len(subjects)} patients x 2 frames (ED, ES) x {cfg['cardiac_slices']} slices, "
                f"{cfg['cardiac_size']}x{cfg['cardiac_size']}, "
                f"groups {sorted({r['group'] for r in subjects})}")
    split_text = ", ".join(f"{s} {n}" for s, n in per_split.items())
    return [f"{manifest['kind']}: {folder}",
            f"  {what}",
            f"  split: {split_text}; {len(manifest['files'])} files, {megabytes:.1f} MB; "
            f"generated in {manifest['seconds']:.1f} s"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kdhpc.data.default",
        description="Generate (or find) the embedded default brain and cardiac datasets.")
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                        help="optional YAML config, then overrides (default_data.seed=1 or seed=1)")
    parser.add_argument("--kind", choices=("brain", "cardiac", "all"), default="all")
    parser.add_argument("--out", default=None,
                        help="cache root (default: $KDHPC_DATA, else ~/.cache/kdhpc)")
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    options = parser.parse_args(argv)
    config_path = None
    overrides = []
    fields = {f.name for f in dataclasses.fields(DefaultDataConfig)}
    for position, arg in enumerate(options.args):
        if "=" in arg:
            key = arg.split("=", 1)[0]
            overrides.append(f"default_data.{arg}" if key in fields else arg)
        elif position == 0:
            config_path = arg
        else:
            parser.error(f"{arg!r}: expected key=value after the config file")
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kinds = KINDS if options.kind == "all" else (options.kind,)
    for kind in kinds:
        start = time.perf_counter()
        try:
            folder, generated = find_or_generate(cfg.default_data, kind, options.out,
                                                 options.force)
        except (DefaultDataError, PermissionError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        elapsed = time.perf_counter() - start
        lines = describe_set(folder, read_manifest(folder))
        lines.append(f"  {'generated' if generated else 'reused the cached set'}: "
                     f"{elapsed:.1f} s")
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
