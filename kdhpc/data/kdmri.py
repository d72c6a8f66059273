"""KD-MRI HDF5 volumes: writer, (volume, slice) dataset and a converter from fastMRI.

Layout (github Bala93/KD-MRI; conventions in docs/methods.md), one file per volume (knee: one
per slice)::

    datasets/<type>/<train|validation>/acc_<acc>/<name>.h5
        volfs              float  (H, W, S)   fully sampled image
        img_volus_<acc>    float  (H, W, S)   zero-filled magnitude |ifft2(k * M)|
        kspace_volus_<acc> complex (H, W, S)  undersampled k-space k * M

Slices are the *last* axis. The FFT is the orthonormal 2-D FFT *without* shifts (DC at index 0;
:func:`kdhpc.data.degrade.fft2` with ``centered=False``), the opposite of fastMRI's centred
layout. ``<acc>`` is KD-MRI's own spelling: ``4x``, ``5x``, ``8x``, and ``3_3x`` for 3.3
(:func:`acc_key`); its code builds the keys as ``'img_volus_{}'.format(acc)``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from kdhpc.config import MaskConfig
from kdhpc.data.degrade import fft2, ifft2
from kdhpc.data.fastmri import (MAX_OPEN_FILES, RECON_KEYS, DataFormatError, H5Handles,
                                VolumeSliceDataset, atomic_output, central_slices, check_finite,
                                list_files, open_h5, read_h5)
from kdhpc.data.masks import apply_mask, load_mask, make_mask, to_layout


def acc_key(acceleration: float | str) -> str:
    """KD-MRI's spelling of an acceleration: ``4 -> '4x'``, ``3.3 -> '3_3x'``, ``'5x'`` kept."""
    if isinstance(acceleration, str):
        return acceleration if acceleration.endswith("x") else acceleration + "x"
    if not acceleration >= 1:
        raise ValueError(f"acceleration: expected >= 1, found {acceleration!r}")
    if float(acceleration).is_integer():
        return f"{int(acceleration)}x"
    return f"{acceleration:g}".replace(".", "_") + "x"


def write_kdmri(path: str | os.PathLike, volfs: np.ndarray,
                undersampled: dict[float | str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write one KD-MRI volume: ``volfs`` real ``(H, W, S)`` and, per acceleration,
    ``(img_volus, kspace_volus)`` real / complex ``(H, W, S)`` (unshifted k-space).

    All arrays are checked (shape, dtype kind, finite) before anything is written; the file is
    written under a temporary name and renamed when complete. Returns the path.
    """
    where = f"write_kdmri({path})"
    volfs = np.asarray(volfs)
    if volfs.ndim != 3 or np.iscomplexobj(volfs):
        raise DataFormatError(f"{where}: volfs: expected a real (H, W, S) array, found shape "
                              f"{volfs.shape} dtype {volfs.dtype}")
    check_finite(volfs, f"{where}: volfs")
    datasets = {"volfs": volfs.astype(np.float32)}
    for acc, (image, kspace) in undersampled.items():
        key = acc_key(acc)
        image, kspace = np.asarray(image), np.asarray(kspace)
        for name, array, complex_expected in ((f"img_volus_{key}", image, False),
                                              (f"kspace_volus_{key}", kspace, True)):
            if array.shape != volfs.shape:
                raise DataFormatError(f"{where}: {name}: expected volfs's shape {volfs.shape}, "
                                      f"found {array.shape}")
            if np.iscomplexobj(array) != complex_expected:
                raise DataFormatError(f"{where}: {name}: expected "
                                      f"{'complex' if complex_expected else 'real'} values, "
                                      f"found {array.dtype}")
            check_finite(array, f"{where}: {name}")
            datasets[name] = array.astype(np.complex64 if complex_expected else np.float32)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        for name, array in datasets.items():
            f.create_dataset(name, data=array)
    return Path(path)


class KDMRISliceDataset(VolumeSliceDataset):
    """Slices of KD-MRI volumes at one acceleration, opened lazily in ``__getitem__``.

    ``root`` is a folder of ``.h5`` files, or its parent holding ``acc_<acc>/``. ``mask``
    (an array or a ``.npy`` path, unshifted layout, 1-D ``[W]`` or 2-D ``[H, W]``) is returned
    with each item only when given (so ``default_collate`` works either way); KD-MRI keeps
    masks beside the data, not in the files. Items:
    ``target`` float32 ``[H, W]`` (volfs), ``image`` float32 ``[H, W]`` (zero-filled),
    ``kspace`` complex64 ``[H, W]`` (unshifted), ``mask``, ``fname``, ``slice``, ``volume``.
    Items are read through at most ``max_open_files`` open handles (KD-MRI's knee layout is one
    file per slice: tens of thousands of files).
    """

    def __init__(self, root: str | os.PathLike, acceleration: float | str, *,
                 mask: np.ndarray | str | os.PathLike | None = None,
                 slice_fraction: float = 1.0, max_volumes: int = 0,
                 max_open_files: int = MAX_OPEN_FILES):
        key = acc_key(acceleration)
        self.handles = H5Handles(max_open_files)
        self.image_key, self.kspace_key = f"img_volus_{key}", f"kspace_volus_{key}"
        root = Path(root)
        if (root / f"acc_{key}").is_dir():
            root = root / f"acc_{key}"
        files = list_files(root, "*.h5")
        self.files = files[:max_volumes] if max_volumes else files
        if isinstance(mask, (str, os.PathLike)):
            mask = load_mask(mask)
        self.mask = None if mask is None else torch.from_numpy(np.asarray(mask, np.float32))
        self.volumes, self._index = [], []
        for number, fname in enumerate(self.files):
            n_slices = self._check_file(fname)
            self.volumes.append((str(fname), n_slices))
            self._index += [(number, s) for s in central_slices(n_slices, slice_fraction)]

    def _check_file(self, fname: Path) -> int:
        with open_h5(fname) as f:
            shapes = {}
            for key in ("volfs", self.image_key, self.kspace_key):
                if key not in f:
                    raise DataFormatError(f"{fname}: missing key '{key}'; found keys "
                                          f"{sorted(f.keys())}")
                shapes[key] = f[key].shape
            if len(shapes["volfs"]) != 3:
                raise DataFormatError(f"{fname}: volfs: expected (H, W, S), found shape "
                                      f"{shapes['volfs']}")
            for key in (self.image_key, self.kspace_key):
                if shapes[key] != shapes["volfs"]:
                    raise DataFormatError(f"{fname}: {key}: expected volfs's shape "
                                          f"{shapes['volfs']}, found {shapes[key]}")
            if f[self.kspace_key].dtype.kind != "c":
                raise DataFormatError(f"{fname}: {self.kspace_key}: expected complex values, "
                                      f"found {f[self.kspace_key].dtype}")
        if self.mask is not None and self.mask.shape[-1] != shapes["volfs"][1]:
            raise DataFormatError(f"{fname}: mask width {self.mask.shape[-1]} differs from the "
                                  f"k-space width {shapes['volfs'][1]}")
        return shapes["volfs"][2]

    def __getitem__(self, i: int) -> dict:
        number, s = self._index[i]
        fname = self.volumes[number][0]
        f = self.handles.get(fname)
        arrays = {key: read_h5(fname, f, key, (slice(None), slice(None), s))
                  for key in ("volfs", self.image_key, self.kspace_key)}  # each [H, W]
        for key, array in arrays.items():
            check_finite(array, f"{fname}: {key}[:, :, {s}]")
        item = {"target": torch.from_numpy(arrays["volfs"].astype(np.float32)),
                "image": torch.from_numpy(arrays[self.image_key].astype(np.float32)),
                "kspace": torch.from_numpy(arrays[self.kspace_key].astype(np.complex64)),
                "fname": fname, "slice": s, "volume": number}
        if self.mask is not None:
            item["mask"] = self.mask
        return item


def _fastmri_images(fname: Path, challenge: str, from_kspace: bool) -> np.ndarray:
    """float32 ``(S, H, W)`` images of a fastMRI file: its reconstruction, or the magnitude
    (root-sum-of-squares over coils) of its centred k-space's inverse FFT."""
    with open_h5(fname) as f:
        key = "kspace" if from_kspace else RECON_KEYS[challenge]
        data = read_h5(fname, f, key)
    check_finite(data, f"{fname}: {key}")
    if not from_kspace:
        if data.ndim != 3:
            raise DataFormatError(f"{fname}: {key}: expected (S, h, w), found {data.shape}")
        return data.astype(np.float32)
    expected = 3 if challenge == "singlecoil" else 4
    if data.ndim != expected:
        raise DataFormatError(f"{fname}: kspace: expected {expected} dims for {challenge}, found "
                              f"shape {data.shape}")
    image = ifft2(torch.from_numpy(data.astype(np.complex64)), centered=True).abs()
    if challenge == "multicoil":
        image = image.square().sum(dim=1).sqrt()  # [S, H, W] root-sum-of-squares
    return image.numpy().astype(np.float32)


def convert_fastmri(src: str | os.PathLike | Sequence[str | os.PathLike],
                    dst: str | os.PathLike, accelerations: Sequence[float],
                    mask_cfg: MaskConfig, *, challenge: str = "singlecoil",
                    from_kspace: bool = False, normalize: bool = True,
                    one_slice_per_file: bool = False) -> list[Path]:
    """Convert fastMRI volumes into KD-MRI layout under ``dst``; returns the files written.

    Per volume: images ``x`` ``(S, H, W)`` are the reconstruction (default) or, with
    ``from_kspace``, ``|ifft2_centred(kspace)|`` (RSS for multi-coil). With ``normalize`` the
    volume is divided by its max. KD-MRI's k-space is then computed explicitly in its own
    layout, ``k = fft2(x, centered=False)``; fastMRI's centred k-space is never just
    ``ifftshift``-ed (for even sizes that differs by a (-1)^(i+j) checkerboard: the image
    would move by half the field of view). Per acceleration one fixed mask over the columns
    (W, the phase-encode axis), ``make_mask(mask_cfg with that acceleration, W)`` moved to the
    unshifted layout, is used for every volume (KD-MRI: one mask per dataset x acceleration)
    and saved as ``dst/us_masks/mask_<acc>.npy``; files go to ``dst/acc_<acc>/<stem>.h5``
    (``<stem>_<slice>.h5`` with ``one_slice_per_file``, KD-MRI's knee layout).
    """
    if challenge not in RECON_KEYS:
        raise ValueError(f"challenge: expected one of {sorted(RECON_KEYS)}, found {challenge!r}")
    dst = Path(dst)
    written: list[Path] = []
    masks: dict[str, np.ndarray] = {}
    for fname in list_files(src, "*.h5"):
        images = _fastmri_images(fname, challenge, from_kspace)  # [S, H, W]
        if normalize:
            peak = float(images.max())
            images = images / peak if peak > 0 else images
        x = torch.from_numpy(images.astype(np.float32)).to(torch.complex64)
        kspace = fft2(x, centered=False)  # [S, H, W] unshifted
        undersampled = {}
        for acc in accelerations:
            key = acc_key(acc)
            if key not in masks:
                cfg = dataclasses.replace(mask_cfg, acceleration=float(acc))
                masks[key] = to_layout(make_mask(cfg, images.shape[-1]), cfg.layout, "unshifted")
            masked = apply_mask(kspace, masks[key])  # [S, H, W]
            zero_filled = ifft2(masked, centered=False).abs()
            undersampled[key] = (zero_filled.numpy(), masked.numpy())
        # KD-MRI keeps slices last: (S, H, W) -> (H, W, S).
        volfs = images.transpose(1, 2, 0)
        parts = [(slice(None), fname.stem)]
        if one_slice_per_file:
            parts = [(slice(s, s + 1), f"{fname.stem}_{s:03d}") for s in range(images.shape[0])]
        for acc in accelerations:
            key = acc_key(acc)
            image, masked = undersampled[key]
            for part, stem in parts:
                pair = (image[part].transpose(1, 2, 0), masked[part].transpose(1, 2, 0))
                written.append(write_kdmri(dst / f"acc_{key}" / f"{stem}.h5",
                                           volfs[:, :, part], {key: pair}))
    for key, mask in masks.items():
        with atomic_output(dst / "us_masks" / f"mask_{key}.npy") as tmp:
            np.save(tmp, mask)
    return written
