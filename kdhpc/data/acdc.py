"""ACDC / M&Ms cine short-axis NIfTI: writer, a lazily reading (volume, slice) dataset and its
augmentation views.

Layout (ACDC challenge; nnU-Net's dataset conversion reads the same; labels in docs/methods.md)::

    <root>/.../patientNNN/Info.cfg                      "ED: 1", "ES: 12", "Group: DCM", ...
    <root>/.../patientNNN/patientNNN_frameFF.nii.gz     image, array (H, W, S), S short-axis slices
    <root>/.../patientNNN/patientNNN_frameFF_gt.nii.gz  labels, same shape as the image

Labels: 0 background, 1 right-ventricle cavity (RV), 2 left-ventricle myocardium, 3 left-ventricle
cavity (LV). Frame numbers are 1-based as in ACDC; ED/ES in Info.cfg name the labelled frames.
Images are written as float32 and labels as uint8, with affine ``diag(spacing, 1)`` (mm).
M&Ms data are read in this layout too: convert them with :func:`write_acdc_patient`, remapping
their labels to ACDC's numbering first (M&Ms's own files number LV 1 and RV 3).

ACDC as downloaded (:func:`is_acdc_download`, :func:`download_split`): ``<root>/training/`` (100
patients) and ``<root>/testing/`` (50), each holding ``patientNNN/`` folders (symlinked folders
are followed). Train and validation are a seeded, patient-level split of ``training/``
(:func:`split_patients`: a fraction ``val_fraction`` of the patients, at least one, drawn with
``seed``; the same patients for the same seed on every machine); test is ``testing/``. Nothing
is copied or re-split on disk.

In-plane resampling (:func:`resample_inplane`, :func:`restore_inplane`): ACDC's pixel spacing
varies (about 0.7 to 1.9 mm). With ``spacing=(sy, sx)`` every slice is resampled to that
spacing before the crop or pad: output pixel ``j`` samples the input at the continuous index
``(j + 0.5) * s_new / s_old - 0.5`` (pixel centres, the field of view's centre kept; PyTorch's
``interpolate(align_corners=False)`` with ``scale_factor = s_old / s_new``), bilinear for images
and nearest for labels, edges replicated; the output has ``round(n * s_old / s_new)`` pixels.
:func:`restore_inplane` maps predictions back to the original grid with the inverse map
(nearest for labels), and :func:`write_like` saves them with the original image's affine and
header, so a prediction keeps its input's geometry.

Views (:class:`CardiacViews`, the segmentation recipe's training data; enumerable augmentation,
identical for teacher and student): sample i has ``degrade.views_per_sample`` views; view v has
the key (:func:`view_params`) ``(dihedral id, rotation in millidegrees, shift y, shift x in
pixels, gamma x 1000)``: the dihedral id and a seed come from
:func:`kdhpc.data.degrade.view_key` of (slice name, v), and the seed draws the rotation
(uniform, +-``degrade.max_rotation_deg``), the translation (integers,
+-``degrade.max_shift_fraction`` of S) and the gamma (log-uniform in ``degrade.gamma_range``);
view 0 is the identity. A view is made from the raw cropped slice (:func:`make_view`):
rotation and translation (bilinear for the image, nearest for the labels, zero = air outside),
the dihedral flip/rotation, gamma on the min-max rescaled image (nnU-Net's contrast
augmentation), z-score (:func:`normalize_slice`). The key travels in each batch (``view_key``) and the teacher
cache stores it, so a cached logit always belongs to the student's exact input.
"""

from __future__ import annotations

import math
import os
import random
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from kdhpc.config import DegradeConfig
from kdhpc.data.degrade import dihedral, view_key
from kdhpc.data.fastmri import DataFormatError, VolumeSliceDataset, atomic_output, check_finite

LABELS = {0: "background", 1: "RV", 2: "myocardium", 3: "LV"}
INFO_ORDER = ("ED", "ES", "Group", "Height", "NbFrame", "Weight")
FRAME_CHOICES = ("ED+ES", "ED", "ES", "all")
DOWNLOAD_FOLDERS = ("training", "testing")
DOWNLOAD_SPLITS = ("train", "val", "test")


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


def fit_to(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop or zero-pad the last two dims to ``height x width``.

    A dim of n > target keeps ``[(n - target) // 2, (n - target) // 2 + target)``; n < target
    puts the data at ``[(target - n) // 2, (target - n) // 2 + n)`` of a zero array. The offsets
    are symmetric, so ``fit_to(fit_to(x, s, s), H, W)`` puts every pixel of the ``s x s`` window
    back where it came from (and zeros elsewhere).
    """
    *lead, h, w = x.shape
    out = np.zeros((*lead, height, width), dtype=x.dtype)
    src, dst = [], []
    for n, target in ((h, height), (w, width)):
        if n >= target:
            start = (n - target) // 2
            src.append(slice(start, start + target))
            dst.append(slice(0, target))
        else:
            start = (target - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[(..., *dst)] = x[(..., *src)]
    return out


def crop_or_pad(x: np.ndarray, size: int) -> np.ndarray:
    """Centre crop or zero-pad the last two dims to ``size x size`` (:func:`fit_to`)."""
    return fit_to(x, size, size)


def normalize_slice(image: np.ndarray) -> np.ndarray:
    """z-score one slice: ``(x - mean) / std`` over all its pixels (std 0: mean removed only)."""
    image = np.asarray(image, dtype=np.float32)
    std = float(image.std())
    return ((image - image.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ACDC as downloaded: training/ and testing/

def patient_folders(folder: str | os.PathLike) -> list[Path]:
    """The ``patientNNN`` folders (with an Info.cfg) directly in ``folder``, sorted by name;
    symlinked folders are followed and listed under their link name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: expected a folder of patientNNN/ folders, found "
                              f"{'a file' if folder.exists() else 'nothing'}")
    found = sorted(p for p in folder.iterdir() if p.name.startswith("patient") and p.is_dir()
                   and (p / "Info.cfg").is_file())
    if not found:
        raise DataFormatError(f"{folder}: expected patientNNN/ folders with Info.cfg, found "
                              f"none")
    return found


def is_acdc_download(root: str | os.PathLike) -> bool:
    """True when ``root`` is the unpacked ACDC download (``training/`` and ``testing/``)."""
    root = Path(root)
    return all((root / name).is_dir() for name in DOWNLOAD_FOLDERS)


def split_patients(patients: Sequence[Path], val_fraction: float, seed: int
                   ) -> tuple[list[Path], list[Path]]:
    """(train, val) of ``patients``: ``max(1, round(n * val_fraction))`` patients drawn for
    validation by ``random.Random(seed)`` from the name-sorted list (the draw depends on the
    names and the seed only); both lists keep name order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), found {val_fraction!r}")
    ordered = sorted(patients, key=lambda p: p.name)
    n_val = max(1, int(round(len(ordered) * val_fraction)))
    if n_val >= len(ordered):
        raise ValueError(f"val_fraction {val_fraction}: {len(ordered)} patient(s) leave none "
                         f"for training")
    chosen = set(random.Random(seed).sample(range(len(ordered)), n_val))
    return ([p for i, p in enumerate(ordered) if i not in chosen],
            [p for i, p in enumerate(ordered) if i in chosen])


def download_split(root: str | os.PathLike, split: str, val_fraction: float = 0.2,
                   seed: int = 0) -> list[Path]:
    """The patient folders of ``split`` (``train``, ``val`` or ``test``) of the ACDC download
    at ``root`` (module docstring); pass the list to :class:`ACDCSliceDataset`."""
    root = Path(root)
    if split not in DOWNLOAD_SPLITS:
        raise ValueError(f"split: expected one of {DOWNLOAD_SPLITS}, found {split!r}")
    if not is_acdc_download(root):
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "no folder"
        raise DataFormatError(f"{root}: expected the ACDC download with folders training/ and "
                              f"testing/, found {found}")
    if split == "test":
        return patient_folders(root / "testing")
    train, val = split_patients(patient_folders(root / "training"), val_fraction, seed)
    return train if split == "train" else val


# ---------------------------------------------------------------------------------------------
# in-plane resampling and its inverse

def resampled_size(n: int, old_spacing: float, new_spacing: float) -> int:
    """Pixels along one axis after resampling: ``max(1, round(n * old / new))``."""
    return max(1, int(round(n * float(old_spacing) / float(new_spacing))))


def _source_coordinates(n_out: int, step: float) -> np.ndarray:
    """Continuous input indices of ``n_out`` output pixel centres, ``step = s_out / s_in``."""
    return (np.arange(n_out) + 0.5) * step - 0.5


def _resample(x: np.ndarray, shape: Sequence[int], steps: Sequence[float], order: int
              ) -> np.ndarray:
    """``x`` [H, W, ...] sampled on the ``shape`` grid whose pixel centres sit at
    :func:`_source_coordinates` (per in-plane axis); trailing axes kept."""
    rows = _source_coordinates(shape[0], steps[0])
    cols = _source_coordinates(shape[1], steps[1])
    grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
    out = np.empty((shape[0], shape[1], *x.shape[2:]), dtype=np.float64 if order else x.dtype)
    flat_in = x.reshape(x.shape[0], x.shape[1], -1)
    flat_out = out.reshape(shape[0], shape[1], -1)
    for k in range(flat_in.shape[2]):
        flat_out[:, :, k] = ndi.map_coordinates(flat_in[:, :, k], [grid_r, grid_c],
                                                order=order, mode="nearest")
    return out


def resample_inplane(x: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                     label: bool = False) -> np.ndarray:
    """``x`` ``[H, W]`` or ``[H, W, S]`` with in-plane ``spacing`` (mm along H, W) resampled to
    ``target`` spacing (module docstring); bilinear (float32 out) or, for ``label``, nearest
    (dtype kept). Equal spacings return ``x`` unchanged."""
    spacing, target = [float(v) for v in spacing[:2]], [float(v) for v in target[:2]]
    if min(spacing + target) <= 0:
        raise ValueError(f"spacing: expected positive mm values, found {spacing} -> {target}")
    if np.allclose(spacing, target, rtol=1e-6, atol=0.0):
        return x
    shape = [resampled_size(n, s, t) for n, s, t in zip(x.shape[:2], spacing, target)]
    out = _resample(x, shape, [t / s for s, t in zip(spacing, target)], 0 if label else 1)
    return out if label else out.astype(np.float32)


def restore_inplane(x: np.ndarray, original_shape: Sequence[int], spacing: Sequence[float],
                    target: Sequence[float], label: bool = True) -> np.ndarray:
    """Invert :func:`resample_inplane`: ``x`` on the ``target``-spacing grid back onto the
    original ``[H, W]`` grid of ``original_shape`` (its ``spacing``); nearest for labels."""
    spacing, target = [float(v) for v in spacing[:2]], [float(v) for v in target[:2]]
    if np.allclose(spacing, target, rtol=1e-6, atol=0.0):
        return x
    expected = [resampled_size(n, s, t) for n, s, t in zip(original_shape[:2], spacing, target)]
    if list(x.shape[:2]) != expected:
        raise ValueError(f"restore_inplane: expected a resampled grid of {tuple(expected)} for "
                         f"original {tuple(original_shape[:2])} at {spacing} -> {target} mm, "
                         f"found {tuple(x.shape[:2])}")
    out = _resample(x, original_shape[:2], [s / t for s, t in zip(spacing, target)],
                    0 if label else 1)
    return out if label else out.astype(np.float32)


def resampled_affine(affine: np.ndarray, spacing: Sequence[float], target: Sequence[float]
                     ) -> np.ndarray:
    """The affine of the resampled grid: voxel ``j`` of an in-plane axis lies at the original
    continuous index ``(j + 0.5) * r - 0.5``, ``r = target / spacing``."""
    scale = np.eye(4)
    for axis in range(2):
        r = float(target[axis]) / float(spacing[axis])
        scale[axis, axis] = r
        scale[axis, 3] = 0.5 * r - 0.5
    return np.asarray(affine, dtype=np.float64) @ scale


def write_like(data: np.ndarray, reference: str | os.PathLike, out: str | os.PathLike,
               dtype=np.uint8) -> Path:
    """Save ``data`` (the reference image's shape) with the reference NIfTI's affine and header
    (a prediction back in its input's geometry), through a temporary name."""
    ref = nib.load(reference)
    if tuple(data.shape) != tuple(ref.shape):
        raise DataFormatError(f"{out}: expected the shape of {reference} {tuple(ref.shape)}, "
                              f"found {tuple(data.shape)} (restore_inplane first)")
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    with atomic_output(out) as tmp:
        nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), ref.affine, header), tmp)
    return Path(out)


def find_infos(root: Path) -> list[Path]:
    """Every ``Info.cfg`` under ``root``, sorted; symlinked folders are followed (pathlib's
    ``**`` does not follow them before Python 3.13)."""
    found = []
    for folder, _, files in os.walk(root, followlinks=True):
        if "Info.cfg" in files:
            found.append(Path(folder) / "Info.cfg")
    return sorted(found)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """In-plane spacing (mm along the array's first two axes) from a NIfTI affine: the lengths
    of its first two columns."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :2], axis=0)


class ACDCSliceDataset(VolumeSliceDataset):
    """2-D short-axis slices of labelled ACDC frames, read lazily in ``__getitem__``.

    A volume is one (patient, frame). ``frames``: ``"ED+ES"`` (the two labelled phases named by
    Info.cfg), ``"ED"``, ``"ES"`` or ``"all"`` (every frame with a ``_gt`` file). Each slice is
    normalised by its own z-score ``(x - mean) / std`` (std 0 -> mean removed only) when
    ``normalize``, then centre cropped or zero padded to ``size x size``. With ``spacing``
    (in-plane mm along H, W) each slice is first resampled to that spacing
    (:func:`resample_inplane`; labels nearest). Items are dicts:
    ``image`` float32 ``[1, size, size]``, ``label`` int64 ``[size, size]``, ``volume``
    (``patientNNN_frameFF``), ``slice``, ``affine`` float64 ``[4, 4]`` (the file's),
    ``spacing`` float64 ``[2]`` (the file's in-plane spacing), ``phase`` (ED/ES/"").

    ``root``: a folder searched recursively for ``Info.cfg`` (symlinked folders followed), or a
    list of patient folders (:func:`download_split`).
    A label whose shape differs from its image, a missing file, a non-finite image or a label
    outside 0-3 is a DataFormatError naming the file(s).
    """

    def __init__(self, root: str | os.PathLike | Sequence[str | os.PathLike], size: int = 192,
                 frames: str = "ED+ES", normalize: bool = True, max_volumes: int = 0,
                 spacing: Sequence[float] | None = None):
        if frames not in FRAME_CHOICES:
            raise ValueError(f"frames: expected one of {FRAME_CHOICES}, found {frames!r}")
        if size < 1:
            raise ValueError(f"size: expected a positive integer, found {size}")
        if spacing is not None and (len(spacing) != 2 or min(spacing) <= 0):
            raise ValueError(f"spacing: expected two positive in-plane mm values, found "
                             f"{spacing!r}")
        if isinstance(root, (str, os.PathLike)):
            root = Path(root)
            infos = find_infos(root)
            if not infos:
                raise DataFormatError(f"{root}: expected patientNNN folders with Info.cfg, found "
                                      f"none")
        else:
            infos = [Path(folder) / "Info.cfg" for folder in root]
        self.size, self.normalize = size, normalize
        self.spacing = None if spacing is None else tuple(float(v) for v in spacing)
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
        spacing = voxel_spacing(affine)
        if self.spacing is not None:
            image = resample_inplane(image, spacing, self.spacing)
            label = resample_inplane(label, spacing, self.spacing, label=True)
        if self.normalize:
            image = normalize_slice(image)
        image = crop_or_pad(image, self.size)
        label = crop_or_pad(label.astype(np.int64), self.size)
        return {"image": torch.from_numpy(image[None]), "label": torch.from_numpy(label),
                "volume": self.volumes[number][0], "slice": s, "affine": affine,
                "spacing": spacing, "phase": phase}


# ---------------------------------------------------------------------------------------------
# augmentation views of a slice (module docstring)

class ViewParams(NamedTuple):
    """One augmentation view: the integers are its key (stored beside cached teacher logits)."""

    dihedral: int
    rotation_mdeg: int
    shift_y: int
    shift_x: int
    gamma_milli: int


IDENTITY = ViewParams(0, 0, 0, 0, 1000)


def view_params(sample_name: str, view: int, degrade: DegradeConfig, size: int) -> ViewParams:
    """The parameters of view ``view`` of the sample named ``sample_name`` (module docstring)."""
    key = view_key(sample_name, view, degrade)  # checks 0 <= view < views_per_sample
    if view == 0:
        return IDENTITY
    rng = np.random.default_rng(key.noise_seed)
    max_mdeg = int(round(degrade.max_rotation_deg * 1000))
    max_shift = int(math.floor(degrade.max_shift_fraction * size))
    low, high = (math.log(g) for g in degrade.gamma_range)
    return ViewParams(dihedral=key.dihedral,
                      rotation_mdeg=int(rng.integers(-max_mdeg, max_mdeg + 1)),
                      shift_y=int(rng.integers(-max_shift, max_shift + 1)),
                      shift_x=int(rng.integers(-max_shift, max_shift + 1)),
                      gamma_milli=int(round(1000 * math.exp(rng.uniform(low, high)))))


def rigid_warp(image: torch.Tensor, label: torch.Tensor, rotation_deg: float, shift_y: float,
               shift_x: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate about the centre by ``rotation_deg`` and shift by (``shift_y``, ``shift_x``) pixels.

    ``image`` [H, W] float (bilinear), ``label`` [H, W] int64 (nearest); zeros enter from
    outside. Output pixel p takes the input at ``R^-1 (p - c - t) + c`` (c the centre, t the
    shift), in grid_sample's normalised coordinates (align_corners=False, square images).
    """
    height, width = image.shape
    angle = math.radians(rotation_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    inverse = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64)
    shift = torch.tensor([2.0 * shift_x / width, 2.0 * shift_y / height], dtype=torch.float64)
    theta = torch.cat([inverse, -(inverse @ shift)[:, None]], dim=1)[None].float()  # [1, 2, 3]
    grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)  # [1, H, W, 2]
    warped = F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)[0, 0]
    labels = F.grid_sample(label[None, None].float(), grid, mode="nearest",
                           padding_mode="zeros", align_corners=False)[0, 0]
    return warped, labels.round().long()


def gamma_contrast(image: torch.Tensor, gamma: float) -> torch.Tensor:
    """``lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma`` with the slice's min and max."""
    lo, hi = image.min(), image.max()
    span = hi - lo
    if span <= 0:
        return image
    return lo + span * ((image - lo) / span).clamp(0, 1) ** gamma


def make_view(image: np.ndarray, label: np.ndarray,
              params: ViewParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(z-scored image [S, S] float32, labels [S, S] int64) of a raw S x S slice's view."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))   # [S, S]
    y = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))     # [S, S]
    if params.rotation_mdeg or params.shift_y or params.shift_x:
        x, y = rigid_warp(x, y, params.rotation_mdeg / 1000.0, params.shift_y, params.shift_x)
    if params.dihedral:
        x, y = dihedral(x, params.dihedral), dihedral(y, params.dihedral)
    if params.gamma_milli != 1000:
        x = gamma_contrast(x, params.gamma_milli / 1000.0)
    return torch.from_numpy(normalize_slice(x.contiguous().numpy())), y.contiguous()


def center_patch(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The central ``patch x patch`` square of the last two dims (all of ``x`` when 0)."""
    size = x.shape[-1]
    if not patch or patch >= size:
        return x
    start = (size - patch) // 2
    return x[..., start:start + patch, start:start + patch].contiguous()


class CardiacViews:
    """Dataset of views (:mod:`kdhpc.train`) over the slices of one split (module docstring).

    ``get_view(i, v)`` -> ``image`` float32 [1, P, P], ``label`` int64 [P, P] and ``view_key``
    int64 [5] (:class:`ViewParams`), P = ``patch`` or S; with a patch also ``context``, the
    whole view [1, S, S] the teacher sees. ``num_views`` = ``degrade.views_per_sample`` when
    ``augment``, else 1 (evaluation reads view 0 only).
    """

    def __init__(self, slices: ACDCSliceDataset, degrade: DegradeConfig, size: int,
                 patch: int = 0, augment: bool = True):
        self.slices, self.degrade, self.size = slices, degrade, size
        self.patch = patch if patch and patch < size else 0
        self.num_views = degrade.views_per_sample if augment else 1

    def __len__(self) -> int:
        return len(self.slices)

    def volume_of(self, index: int) -> str:
        return self.slices.volumes[self.slices._index[index][0]][0]

    def sample_name(self, index: int) -> str:
        volume, s = self.slices._index[index]
        return f"{self.slices.volumes[volume][0]}:{s}"

    def view_key(self, index: int, view: int) -> list[int]:
        if view not in range(self.num_views):
            raise ValueError(f"view: expected 0..{self.num_views - 1}, found {view}")
        return list(view_params(self.sample_name(index), view, self.degrade, self.size))

    def get_view(self, index: int, view: int) -> dict[str, torch.Tensor]:
        params = ViewParams(*self.view_key(index, view))
        item = self.slices[index]
        image, label = make_view(item["image"][0].numpy(), item["label"].numpy(), params)
        out = {"image": center_patch(image, self.patch)[None],
               "label": center_patch(label, self.patch),
               "view_key": torch.tensor(list(params), dtype=torch.int64)}
        if self.patch:
            out["context"] = image[None]
        return out
