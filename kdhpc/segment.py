"""Segment a cine short-axis NIfTI with a distilled student: ``python -m kdhpc.segment``.

Run::

    python -m kdhpc.segment IMAGE.nii.gz --model RUN_DIR [--out OUT.nii.gz] [--eager]
                            [--device cpu|cuda]
    python -m kdhpc.segment FOLDER --model RUN_DIR [--out OUT_FOLDER]     # every image in it

Folder mode segments every ``*.nii.gz`` / ``*.nii`` image of FOLDER and its sub-folders (an ACDC
patient or the whole ``testing/`` tree; files ending in ``_gt`` or ``_seg`` are labels, not
images) into OUT_FOLDER (default: beside each image), keeping the sub-folder layout. When an
image has its labels beside it (``<stem>_gt.nii.gz``, ACDC's naming), Dice per class (RV,
myocardium, LV; ``kdhpc.metrics.dice``) is printed per image and as the mean over images, and
written to ``OUT_FOLDER/dice.json``.

``RUN_DIR`` is a finished segmentation run (``python -m kdhpc.distill configs/seg_default.yaml``).
The model is the exported TorchScript KD student ``RUN_DIR/export/student_kd.torchscript.pt``
when present (``--eager`` skips it), else the KD student's weights
(``RUN_DIR/student_kd/best_model.pt``) in the architecture ``model.student`` of
``RUN_DIR/config.yaml``. The output (default ``<IMAGE stem>_seg.nii.gz`` beside the image) holds
uint8 labels (0 background, 1 RV, 2 myocardium, 3 LV; ACDC's numbering) with the image's shape,
affine and header spacing; it is written under a temporary name and renamed when complete.

Preprocessing is the training pipeline's view 0 (:func:`prepare_slice`), per short-axis slice:
centre crop or zero pad the in-plane dims to ``S x S`` (``S`` = the run's ``data.crop``, 192 for
the published setting; :func:`kdhpc.data.acdc.crop_or_pad`), then z-score the slice
(:func:`kdhpc.data.acdc.normalize_slice`). Labels are predicted by the argmax of the
full-resolution logits and put back on the original grid by the inverse crop/pad
(:func:`fit_to`): pixels outside the ``S x S`` window of a larger slice are labelled background.

Resampling: a run trained with ``data.spacing`` (in-plane mm; the ACDC recipe resamples every
slice to it) predicts through the same resampling (:func:`segment_image`): the image is
resampled in-plane from its own spacing (the lengths of its affine's first two columns,
:func:`kdhpc.data.acdc.voxel_spacing`) to the run's with
:func:`kdhpc.data.acdc.resample_inplane` (bilinear), segmented there, and the labels are
brought back onto the image's grid with :func:`kdhpc.data.acdc.restore_inplane` (nearest
neighbour), so the output keeps the input's shape and affine. A run without ``data.spacing``
predicts on the image's own grid.

Accepted images: 2-D ``(H, W)`` (one slice) or 3-D ``(H, W, S)`` (ACDC's layout, slices last).
A 1-D or 4-D array (e.g. a whole cine ``(H, W, S, T)``: pass one frame) is refused with a message
naming the file and its shape; so are non-finite values.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch

from kdhpc.data.acdc import (crop_or_pad, fit_to, normalize_slice, resample_inplane,
                             restore_inplane, voxel_spacing)
from kdhpc.data.fastmri import atomic_output

EXPORT_FOLDER = "export"
TORCHSCRIPT_FILE = "student_kd.torchscript.pt"
ONNX_FILE = "student_kd.onnx"
STUDENT_STAGE = "student_kd"
WEIGHT_FILES = ("best_model.pt", "final_model.pt")

Segmenter = Callable[[torch.Tensor], torch.Tensor]
"""``x`` [B, 1, S, S] normalised slices -> full-resolution logits [B, K, S, S]."""


@dataclass(frozen=True)
class RunModel:
    """A run's KD student ready to segment: the network, its input size ``S`` (``data.crop``),
    the in-plane spacing it was trained at (``data.spacing``, mm; None: the images' own) and
    where it came from."""

    segment: Segmenter
    size: int
    spacing: tuple[float, float] | None
    source: str


class SegmentError(ValueError):
    """Input or model that cannot be used; the message names the file, expected and found."""


# ---------------------------------------------------------------------------------------------
# preprocessing (view 0 of the training views, kdhpc.data.acdc.make_view)

def prepare_slice(image: np.ndarray, size: int) -> np.ndarray:
    """Network input of a raw ``[H, W]`` slice: ``normalize_slice(crop_or_pad(image, size))``."""
    return normalize_slice(crop_or_pad(np.asarray(image, dtype=np.float32), size))


# ---------------------------------------------------------------------------------------------
# inference

def segment_volume(segmenter: Segmenter, volume: np.ndarray, size: int,
                   batch_size: int = 8, device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 labels of ``volume`` (``[H, W]`` or ``[H, W, S]``), same shape, slice by slice."""
    volume = np.asarray(volume)
    slices = volume[..., None] if volume.ndim == 2 else volume   # [H, W, S]
    height, width, n_slices = slices.shape
    labels = np.zeros((n_slices, height, width), dtype=np.uint8)
    for start in range(0, n_slices, batch_size):
        stop = min(n_slices, start + batch_size)
        batch = np.stack([prepare_slice(slices[:, :, s], size) for s in range(start, stop)])
        x = torch.from_numpy(batch[:, None]).to(device)            # [b, 1, size, size]
        with torch.inference_mode():
            logits = segmenter(x)                                  # [b, K, size, size]
        pred = logits.argmax(1).to(torch.uint8).cpu().numpy()      # [b, size, size]
        labels[start:stop] = fit_to(pred, height, width)
    out = np.moveaxis(labels, 0, -1)                               # [H, W, S]
    return out[..., 0] if volume.ndim == 2 else out


def segment_image(model: RunModel, image: nib.Nifti1Image, path: str | Path,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 labels of a NIfTI image on its own grid (its shape): resampled in-plane to the
    run's ``data.spacing`` and back when the run was trained with one (module docstring)."""
    data = image_array(image, path)
    if model.spacing is None:
        return segment_volume(model.segment, data, model.size, device=device)
    spacing = voxel_spacing(image.affine)
    resampled = resample_inplane(data, spacing, model.spacing)
    labels = segment_volume(model.segment, resampled, model.size, device=device)
    return restore_inplane(labels, data.shape, spacing, model.spacing, label=True)


def read_image(path: str | Path) -> nib.Nifti1Image:
    """Load a NIfTI image and check it is a finite 2-D or 3-D array."""
    path = Path(path)
    if not path.is_file():
        raise SegmentError(f"{path}: image file not found")
    try:
        image = nib.load(path)
        shape = tuple(image.shape)
    except Exception as err:  # nibabel raises several types for non-NIfTI or damaged files
        raise SegmentError(f"{path}: cannot read as NIfTI: {err}") from None
    if len(shape) not in (2, 3):
        raise SegmentError(f"{path}: expected a 2-D (H, W) slice or a 3-D (H, W, S) stack of "
                           f"short-axis slices, found a {len(shape)}-D image of shape {shape}"
                           + ("; pass one frame of a cine series" if len(shape) == 4 else ""))
    if min(shape) < 1:
        raise SegmentError(f"{path}: expected a non-empty image, found shape {shape}")
    return image


def image_array(image: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """The image's float32 array, refusing NaN/Inf."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise SegmentError(f"{path}: expected finite intensities, found {bad} NaN/Inf voxels")
    return data


def write_labels(labels: np.ndarray, reference: nib.Nifti1Image, out: str | Path) -> Path:
    """Write uint8 ``labels`` with ``reference``'s affine and header (spacing, orientation)."""
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(labels.astype(np.uint8), reference.affine, header=header)
    image.header.set_slope_inter(1.0, 0.0)
    out = Path(out)
    with atomic_output(out) as tmp:
        nib.save(image, tmp)
    return out


def _student_weights(run_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        path = run_dir / STUDENT_STAGE / name
        if path.is_file():
            return path
    raise SegmentError(f"{run_dir}: expected a finished segmentation run with "
                       f"{STUDENT_STAGE}/{WEIGHT_FILES[0]} or "
                       f"{EXPORT_FOLDER}/{TORCHSCRIPT_FILE}, found neither")


def load_segmenter(run_dir: str | Path, eager: bool = False,
                   device: torch.device | str = "cpu") -> RunModel:
    """The KD student of the run in ``run_dir`` with its input size and training spacing."""
    from kdhpc.config import ConfigError, load_config

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SegmentError(f"{run_dir}: expected a run folder with config.yaml (made by python -m "
                           f"kdhpc.distill), found none")
    try:
        cfg = load_config(config_file)
    except ConfigError as err:
        raise SegmentError(str(err)) from None
    if cfg.recipe != "segmentation":
        raise SegmentError(f"{config_file}: recipe: expected 'segmentation', found {cfg.recipe!r}")
    size = cfg.data.crop[0]
    spacing = tuple(float(v) for v in cfg.data.spacing) if cfg.data.spacing else None
    scripted = run_dir / EXPORT_FOLDER / TORCHSCRIPT_FILE
    if scripted.is_file() and not eager:
        try:
            module = torch.jit.load(str(scripted), map_location=device).eval()
        except Exception as err:  # torch raises several types for damaged archives
            raise SegmentError(f"{scripted}: cannot load the TorchScript model: {err}") from None
        return RunModel(module, size, spacing, f"TorchScript {scripted}")
    from kdhpc.models.external import full_resolution_logits, load_run_network

    weights = _student_weights(run_dir)
    try:  # the run's model section: a factory student is rebuilt with its keyword arguments
        model = load_run_network(cfg.model, cfg.model.student, weights, foreign=False)
    except ConfigError as err:
        raise SegmentError(f"{weights}: does not hold {cfg.model.student} weights: "
                           f"{err}") from None
    model.to(device).eval()
    return RunModel(lambda x: full_resolution_logits(model, x), size, spacing,
                    f"{cfg.model.student} weights {weights}")


def default_output(image: str | Path) -> Path:
    """``<folder>/<stem>_seg.nii.gz`` for ``<folder>/<stem>.nii[.gz]``."""
    image = Path(image)
    name = image.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return image.with_name(f"{name}_seg.nii.gz")


LABEL_SUFFIXES = ("_gt", "_seg")
CLASS_NAMES = {1: "RV", 2: "myocardium", 3: "LV"}


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def folder_images(folder: Path) -> list[Path]:
    """The images of ``folder`` (recursively, symlinks followed), labels left out."""
    found = sorted(p for pattern in ("*.nii.gz", "*.nii") for p in folder.rglob(pattern)
                   if not _stem(p).endswith(LABEL_SUFFIXES))
    if not found:
        raise SegmentError(f"{folder}: expected NIfTI images (*.nii.gz, *.nii), found none")
    return found


def label_dice(labels: np.ndarray, truth_path: Path) -> dict[str, float]:
    """Dice per class of ``labels`` against the label file ``truth_path`` (same grid)."""
    from kdhpc.metrics import dice

    truth = np.rint(image_array(read_image(truth_path), truth_path)).astype(np.int64)
    if truth.shape != labels.shape:
        raise SegmentError(f"{truth_path}: expected labels of the image's shape "
                           f"{tuple(labels.shape)}, found {tuple(truth.shape)}")
    scores = dice(labels, truth, len(CLASS_NAMES) + 1)  # the whole volume, |P| + |G| = 0 -> 1
    row = {CLASS_NAMES[k]: float(scores[k]) for k in CLASS_NAMES}
    row["mean"] = float(np.mean(list(row.values())))
    return row


def segment_folder(folder: Path, out_folder: Path | None, model: RunModel,
                   device: str) -> dict[str, dict[str, float]]:
    """Segment every image of ``folder``; returns Dice per image that has ``_gt`` labels."""
    scores = {}
    for path in folder_images(folder):
        image = read_image(path)
        labels = segment_image(model, image, path, device)
        target = (default_output(path) if out_folder is None
                  else out_folder / path.relative_to(folder).parent / f"{_stem(path)}_seg.nii.gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_labels(labels, image, target)
        truth = path.with_name(f"{_stem(path)}_gt{path.name[len(_stem(path)):]}")
        line = f"{target}: labels {tuple(labels.shape)}"
        if truth.is_file():
            scores[str(path.relative_to(folder))] = row = label_dice(labels, truth)
            line += "; Dice " + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
        print(line, flush=True)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdhpc.segment",
                                     description="Label RV, myocardium and LV in a short-axis "
                                                 "NIfTI with a distilled student.")
    parser.add_argument("image", help="2-D (H, W) or 3-D (H, W, S) NIfTI image, or a folder of "
                                      "them (every image in it; Dice where _gt labels exist)")
    parser.add_argument("--model", required=True, help="segmentation run folder (RUN_DIR)")
    parser.add_argument("--out", help="output label NIfTI, or folder in folder mode (default: "
                                      "<image stem>_seg.nii.gz beside each image)")
    parser.add_argument("--eager", action="store_true",
                        help="use the student weights even when a TorchScript export exists")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    args = parser.parse_args(argv)
    try:
        if Path(args.image).is_dir():
            return _main_folder(args)
        image = read_image(args.image)
        model = load_segmenter(args.model, args.eager, args.device)
        labels = segment_image(model, image, args.image, args.device)
        out = write_labels(labels, image, args.out or default_output(args.image))
    except SegmentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = np.bincount(labels.ravel(), minlength=4)
    print(f"{out}: labels {tuple(labels.shape)} from {model.source}; voxels RV {counts[1]}, "
          f"myocardium {counts[2]}, LV {counts[3]}")
    return 0



def _main_folder(args: argparse.Namespace) -> int:
    import json

    model = load_segmenter(args.model, args.eager, args.device)
    out_folder = Path(args.out) if args.out else None
    scores = segment_folder(Path(args.image), out_folder, model, args.device)
    print(f"segmented with {model.source}")
    if scores:
        mean = {k: float(np.mean([row[k] for row in scores.values()]))
                for k in next(iter(scores.values()))}
        print(f"mean Dice over {len(scores)} labelled images: "
              + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
        report = (out_folder or Path(args.image)) / "dice.json"
        with atomic_output(report) as tmp:
            Path(tmp).write_text(json.dumps({"per_image": scores, "mean": mean}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
