"""ACDC / M&Ms cine short-axis NIfTI: writer and a lazily reading (volume, slice) dataset.

Layout (ACDC challenge; nnU-Net's dataset conversion reads the same; labels in docs/methods.md)::

    <root>/.../patientNNN/Info.cfg                      "ED: 1", "ES: 12", "Group: DCM", ...
    <root>/.../patientNNN/patientNNN_frameFF.nii.gz     image, array (H, W, S), S short-axis slices
    <root>/.../patientNNN/patientNNN_frameFF_gt.nii.gz  labels, same shape as the image

Labels: 0 background, 1 right-ventricle cavity (RV), 2 left-ventricle myocardium, 3 left-ventricle
cavity (LV). Frame numbers are 1-based as in ACDC; ED/ES in Info.cfg name the labelled frames.
Images are written as float32 and labels as uint8, with affine ``diag(spacing, 1)`` (mm).
M&Ms data are read in this layout too: convert them with :func:`write_acdc_patient`, remapping
their labels to ACDC's numbering first (M&Ms's own files number LV 1 and RV 3).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from kdhpc.data.fastmri import DataFormatError, VolumeSliceDataset, atomic_output, check_finite

LABELS = {0: "background", 1: "RV", 2: "myocardium", 3: "LV"}
INFO_ORDER = ("ED", "ES", "Group", "Height", "NbFrame", "Weight")
FRAME_CHOICES = ("ED+ES", "ED", "ES", "all")


def patient_name(patient: int) -> str:
    return f"patient{patient:03d}"


def frame_files(folder: Path, patient: str, frame: int) -> tuple[Path, Path]:
    """(image, label) paths of one frame of patient ``patient`` (``patientNNN``) in ``folder``."""
    stem = f"{patient}_frame{frame:02d}"
    return folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz"


def read_info(path: str | os.PathLike) -> dict:
    """Info.cfg as a dict; ``ED``, ``ES`` and ``NbFrame`` as int, numbers as float, else str."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: Info.cfg not found")
    info: dict = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise DataFormatError(f"{path}: line {number}: expected 'Key: value', found {line!r}")
        key, value = key.strip(), value.strip()
        try:
            info[key] = int(value) if key in ("ED", "ES", "NbFrame") else float(value)
        except ValueError:
            if key in ("ED", "ES", "NbFrame"):
                raise DataFormatError(f"{path}: {key}: expected an integer frame number, found "
                                      f"{value!r}") from None
            info[key] = value
    for key in ("ED", "ES"):
        if key not in info:
            raise DataFormatError(f"{path}: missing key '{key}'; found keys {sorted(info)}")
    return info


def _check_label(label: np.ndarray, where: str) -> None:
    values = np.unique(label)
    unknown = [v for v in values.tolist() if v not in LABELS]
    if unknown:
        raise DataFormatError(f"{where}: expected labels in {sorted(LABELS)} "
                              f"({', '.join(LABELS.values())}), found {unknown}")


def write_acdc_patient(root: str | os.PathLike, patient: int,
                       frames: dict[int, tuple[np.ndarray, np.ndarray | None]], info: dict,
                       spacing: Sequence[float] = (1.5, 1.5, 10.0)) -> Path:
    """Write ``<root>/patientNNN/`` in ACDC layout and return that folder.

    ``frames`` maps a 1-based frame number to ``(image, label)``, both ``(H, W, S)``; a label
    may be None (an unlabelled frame). ``info`` must hold ``ED`` and ``ES`` (frames present in
    ``frames``); Group, Height, NbFrame (default: the largest frame number) and Weight are
    written when given, in ACDC's order, then any other keys. The whole folder is built under a
    temporary name and renamed when complete; everything is checked before writing.
    """
    patient_dir = Path(root) / patient_name(patient)
    where = f"write_acdc_patient({patient_dir})"
    if len(spacing) != 3 or min(spacing) <= 0:
        raise DataFormatError(f"{where}: spacing: expected three positive mm values, found "
                              f"{tuple(spacing)}")
    for key in ("ED", "ES"):
        if key not in info:
            raise DataFormatError(f"{where}: info: missing key '{key}'")
        if info[key] not in frames:
            raise DataFormatError(f"{where}: info['{key}'] = {info[key]}: expected one of the "
                                  f"frames {sorted(frames)}")
    checked = {}
    for frame, (image, label) in frames.items():
        image = np.asarray(image)
        if image.ndim != 3 or np.iscomplexobj(image):
            raise DataFormatError(f"{where}: frame {frame} image: expected a real (H, W, S) "
                                  f"array, found shape {image.shape} dtype {image.dtype}")
        check_finite(image, f"{where}: frame {frame} image")
        if label is not None:
            label = np.asarray(label)
            if label.shape != image.shape:
                raise DataFormatError(f"{where}: frame {frame} label: expected the image's shape "
                                      f"{image.shape}, found {label.shape}")
            _check_label(label, f"{where}: frame {frame} label")
            label = label.astype(np.uint8)
        checked[frame] = (image.astype(np.float32), label)
    info = {"NbFrame": max(frames), **info}
    ordered = [k for k in INFO_ORDER if k in info] + [k for k in info if k not in INFO_ORDER]
    affine = np.diag([*map(float, spacing), 1.0])

    with atomic_output(patient_dir) as tmp:
        tmp.mkdir()
        (tmp / "Info.cfg").write_text("".join(f"{k}: {info[k]}\n" for k in ordered))
        for frame, (image, label) in checked.items():
            image_file, label_file = frame_files(tmp, patient_dir.name, frame)
            nib.save(nib.Nifti1Image(image, affine), image_file)
            if label is not None:
                nib.save(nib.Nifti1Image(label, affine), label_file)
    return patient_dir


def crop_or_pad(x: np.ndarray, size: int) -> np.ndarray:
    """Centre crop or zero-pad the last two dims to ``size x size``.

    A dim of n > size keeps ``[(n - size) // 2, (n - size) // 2 + size)``; n < size puts the
    data at ``[(size - n) // 2, (size - n) // 2 + n)`` of a zero array.
    """
    *lead, height, width = x.shape
    out = np.zeros((*lead, size, size), dtype=x.dtype)
    src, dst = [], []
    for n in (height, width):
        if n >= size:
            start = (n - size) // 2
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
        else:
            start = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[(..., *dst)] = x[(..., *src)]
    return out


class ACDCSliceDataset(VolumeSliceDataset):
    """2-D short-axis slices of labelled ACDC frames, read lazily in ``__getitem__``.

    A volume is one (patient, frame). ``frames``: ``"ED+ES"`` (the two labelled phases named by
    Info.cfg), ``"ED"``, ``"ES"`` or ``"all"`` (every frame with a ``_gt`` file). Each slice is
    normalised by its own z-score ``(x - mean) / std`` (std 0 -> mean removed only) when
    ``normalize``, then centre cropped or zero padded to ``size x size``. Items are dicts:
    ``image`` float32 ``[1, size, size]``, ``label`` int64 ``[size, size]``, ``volume``
    (``patientNNN_frameFF``), ``slice``, ``affine`` float64 ``[4, 4]``, ``phase`` (ED/ES/"").
    A label whose shape differs from its image, a missing file, a non-finite image or a label
    outside 0-3 is a DataFormatError naming the file(s).
    """

    def __init__(self, root: str | os.PathLike, size: int = 192, frames: str = "ED+ES",
                 normalize: bool = True, max_volumes: int = 0):
        if frames not in FRAME_CHOICES:
            raise ValueError(f"frames: expected one of {FRAME_CHOICES}, found {frames!r}")
        if size < 1:
            raise ValueError(f"size: expected a positive integer, found {size}")
        root = Path(root)
        infos = sorted(root.glob("**/Info.cfg"))
        if not infos:
            raise DataFormatError(f"{root}: expected patientNNN folders with Info.cfg, found none")
        self.size, self.normalize = size, normalize
        self.volumes, self._index = [], []
        self._files: list[tuple[Path, Path, str]] = []
        for info_file in infos:
            patient_dir = info_file.parent
            info = read_info(info_file)
            for frame, phase in self._frames_of(patient_dir, info, frames):
                image_file, label_file = frame_files(patient_dir, patient_dir.name, frame)
                n_slices = self._check_pair(image_file, label_file)
                number = len(self.volumes)
                self.volumes.append((image_file.name[: -len(".nii.gz")], n_slices))
                self._files.append((image_file, label_file, phase))
                self._index += [(number, s) for s in range(n_slices)]
                if max_volumes and len(self.volumes) == max_volumes:
                    return

    @staticmethod
    def _frames_of(patient_dir: Path, info: dict, frames: str) -> list[tuple[int, str]]:
        if frames == "all":
            phase = {info["ED"]: "ED", info["ES"]: "ES"}
            numbers = sorted(int(p.name.split("_frame")[1][:2])
                             for p in patient_dir.glob(f"{patient_dir.name}_frame??_gt.nii.gz"))
            return [(n, phase.get(n, "")) for n in numbers]
        wanted = frames.split("+")
        out = [(info[p], p) for p in wanted]
        return out if len({n for n, _ in out}) == len(out) else out[:1]

    @staticmethod
    def _check_pair(image_file: Path, label_file: Path) -> int:
        """Number of slices of a checked (image, label) pair, from the headers only."""
        shapes = []
        for path in (image_file, label_file):
            if not path.is_file():
                raise DataFormatError(f"{path}: file not found")
            try:
                shapes.append(tuple(nib.load(path).shape))
            except Exception as err:  # nibabel raises several types for a damaged header
                raise DataFormatError(f"{path}: cannot read the NIfTI header: {err}") from None
        if len(shapes[0]) != 3:
            raise DataFormatError(f"{image_file}: expected an (H, W, S) volume, found shape "
                                  f"{shapes[0]}")
        if shapes[1] != shapes[0]:
            raise DataFormatError(f"{label_file}: label shape {shapes[1]} differs from its image "
                                  f"{image_file} shape {shapes[0]}")
        return shapes[0][2]

    def __getitem__(self, i: int) -> dict:
        number, s = self._index[i]
        image_file, label_file, phase = self._files[number]
        arrays = []
        for path in (image_file, label_file):
            try:
                proxy = nib.load(path)
                arrays.append((np.asarray(proxy.dataobj[:, :, s]), proxy.affine))
            except (OSError, EOFError, zlib.error, ValueError) as err:
                raise DataFormatError(f"{path}: cannot read slice {s} (truncated or corrupted "
                                      f"file?): {err}") from None
        (image, affine), (label, _) = arrays
        image = image.astype(np.float32)  # [H, W]
        check_finite(image, f"{image_file}: slice {s}")
        if not np.array_equal(label, np.round(label)):
            raise DataFormatError(f"{label_file}: expected integer labels, found fractions")
        _check_label(label, f"{label_file}: slice {s}")
        if self.normalize:
            std = float(image.std())
            image = (image - image.mean()) / (std if std > 0 else 1.0)
        image = crop_or_pad(image, self.size)
        label = crop_or_pad(label.astype(np.int64), self.size)
        return {"image": torch.from_numpy(image[None]), "label": torch.from_numpy(label),
                "volume": self.volumes[number][0], "slice": s, "affine": affine, "phase": phase}
