"""Score reconstruction files as fastMRI does: ``python -m kdhpc.evaluate``.

Run::

    python -m kdhpc.evaluate --target DIR --pred DIR [--out FILE.json] [--crop H W]
                             [--target-key reconstruction_esc|reconstruction_rss|reconstruction]
                             [--metrics auto|fastmri|enhancement]

``--pred`` holds one ``.h5`` per volume with dataset ``reconstruction`` ``(S, h, w)`` (fastMRI's
submission layout, as ``python -m kdhpc.predict`` writes it). ``--target`` holds the files of
the same names: fastMRI volumes (``reconstruction_esc`` or ``reconstruction_rss``, whichever the
file has; ``--target-key`` picks one) or ``reconstruction`` files. Every prediction needs a
target and every target a prediction; a missing file, a missing key or a shape mismatch is a
one-line error naming the file(s).

Metrics per volume (:mod:`kdhpc.metrics`, identical to fastMRI's ``evaluate.py``): NMSE, PSNR
and SSIM (mean over slices, 7x7 window), with data range ``R = target.max()`` of the volume,
on the original scale. ``--crop H W`` centre crops target and prediction first (fastMRI's
evaluation crops both to the target's square, e.g. ``--crop 320 320``). The total is the mean
over volumes, with the sample standard deviation (fastMRI prints mean +- 2 std; both are in the
JSON). ``--out`` writes ``{"per_volume": {file: {nmse, psnr, ssim, slices}}, "total": {metric:
summary}, "volumes": n}`` through a temporary name.

Enhancement metrics (``--metrics enhancement``; ``auto``, the default, picks them when the
prediction files carry ``kdhpc_metrics = "enhancement"``, as ``python -m kdhpc.predict`` writes
for an enhancement run): those the enhancement recipe's evaluation reports
(:func:`kdhpc.metrics.enhancement_slice_metrics`, :func:`~kdhpc.metrics.volume_table`).
The data range ``R`` is the target file's ``max`` attribute, else the maximum of its whole
(uncropped) target volume; per slice PSNR, SSIM (range ``R``) and SNR in ROIs (mean over a
tissue ROI / std over the background ROI; ROIs from the target file's ``tissue`` label map when
it has one, else automatic from the target, :func:`~kdhpc.metrics.roi_labels`). Per
volume: ``psnr`` from the mean slice MSE, ``ssim`` the mean over slices, ``snr`` the mean over
the volume's (slice, ROI) units.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from kdhpc.config import write_atomic
from kdhpc.data.fastmri import DataFormatError, list_files, open_h5, read_h5
from kdhpc.data.views import center_crop
from kdhpc.metrics import nmse, psnr, ssim, summarize

PRED_KEY = "reconstruction"
TARGET_KEYS = ("reconstruction_esc", "reconstruction_rss", "reconstruction")
METRICS = ("nmse", "psnr", "ssim")
ENHANCEMENT_METRICS = ("psnr", "ssim", "snr")
METRIC_SETS = ("auto", "fastmri", "enhancement")
TISSUE_KEY = "tissue"


class EvaluateError(ValueError):
    """Missing or mismatched files, keys or shapes; one line naming them."""


def read_volume(path: Path, keys: tuple[str, ...]) -> np.ndarray:
    """The first of ``keys`` that ``path`` holds, as float64 ``(S, H, W)``."""
    with open_h5(path) as f:
        present = [k for k in keys if k in f]
        if not present:
            raise EvaluateError(f"{path}: expected a dataset {' or '.join(keys)}, found keys "
                                f"{sorted(f.keys())}")
        volume = read_h5(path, f, present[0])
    if volume.ndim != 3 or np.iscomplexobj(volume):
        raise EvaluateError(f"{path}: {present[0]}: expected a real (S, H, W) volume, found "
                            f"shape {volume.shape} {volume.dtype}")
    return volume.astype(np.float64)


def metric_set(preds: dict[str, Path], requested: str) -> str:
    """``fastmri`` or ``enhancement``: ``requested``, or for ``auto`` what the prediction files'
    ``kdhpc_metrics`` attribute says (absent: fastmri); files that disagree are an error."""
    from kdhpc.predict import METRICS_ATTRIBUTE

    if requested not in METRIC_SETS:
        raise EvaluateError(f"--metrics: expected one of {METRIC_SETS}, found {requested!r}")
    if requested != "auto":
        return requested
    kinds: dict[str, list[str]] = {}
    for name, path in sorted(preds.items()):
        with open_h5(path) as f:
            kind = f.attrs.get(METRICS_ATTRIBUTE, "fastmri")
        kinds.setdefault(kind.decode() if isinstance(kind, bytes) else str(kind), []).append(name)
    if len(kinds) > 1:
        raise EvaluateError(f"--pred: expected prediction files of one kind, found "
                            f"{'; '.join(f'{k}: {v[0]}' for k, v in kinds.items())} (give "
                            f"--metrics)")
    return next(iter(kinds), "fastmri")


def enhancement_target(path: Path, keys: tuple[str, ...]
                       ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(target ``(S, H, W)`` float64, ``tissue`` label map or None, data range ``R``) of one
    target file (module docstring)."""
    target = read_volume(path, keys)
    with open_h5(path) as f:
        peak = float(f.attrs["max"]) if "max" in f.attrs else float(target.max())
        tissue = read_h5(path, f, TISSUE_KEY) if TISSUE_KEY in f else None
    if tissue is not None and tissue.shape != target.shape:
        raise EvaluateError(f"{path}: {TISSUE_KEY}: expected the target's shape {target.shape}, "
                            f"found {tissue.shape}")
    return target, tissue, peak


def enhancement_scores(target: np.ndarray, pred: np.ndarray, tissue: np.ndarray | None,
                       peak: float) -> dict[str, float]:
    """PSNR, SSIM and SNR of one volume as the enhancement recipe's evaluation reports them."""
    from kdhpc.metrics import enhancement_slice_metrics, roi_labels, volume_table

    rows = []
    for s in range(target.shape[0]):
        rois = roi_labels(None if tissue is None else tissue[s], target[s])
        rows.append({"task": "", "model": "", "volume": "", "volume_max": peak,
                     **enhancement_slice_metrics(target[s], pred[s], rois, peak)})
    volume = volume_table(rows)[0]
    snr = [v for row in rows for k, v in row.items() if k.startswith("snr_")]
    return {"psnr": volume["psnr"], "ssim": volume["ssim"],
            "snr": float(np.mean(snr)) if snr else float("nan"), "slices": len(rows)}


def volume_scores(target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """NMSE, PSNR, SSIM of one volume with data range ``target.max()`` (fastMRI)."""
    peak = float(target.max())
    return {"nmse": nmse(target, pred), "psnr": psnr(target, pred, peak),
            "ssim": ssim(target, pred, peak), "slices": int(target.shape[0])}


def evaluate(target_dir: str | Path, pred_dir: str | Path, crop: tuple[int, int] | None = None,
             target_key: str | None = None, metrics: str = "auto") -> dict:
    """Per-volume and total metrics of the prediction files against the targets (module
    docstring); ``metrics``: ``auto``, ``fastmri`` or ``enhancement``."""
    preds = {p.name: p for p in list_files(pred_dir, "*.h5")}
    targets = {p.name: p for p in list_files(target_dir, "*.h5")}
    missing = sorted(set(preds) - set(targets))
    if missing:
        raise EvaluateError(f"{target_dir}: no target for prediction(s) {', '.join(missing)}")
    unpredicted = sorted(set(targets) - set(preds))
    if unpredicted:
        raise EvaluateError(f"{pred_dir}: no prediction for target(s) {', '.join(unpredicted)}")
    keys = (target_key,) if target_key else TARGET_KEYS
    kind = metric_set(preds, metrics)
    per_volume = {}
    for name in sorted(targets):
        tissue = None
        if kind == "enhancement":
            target, tissue, peak = enhancement_target(targets[name], keys)
        else:
            target = read_volume(targets[name], keys)
        pred = read_volume(preds[name], (PRED_KEY,))
        if crop is not None:
            target, pred = center_crop(target, crop), center_crop(pred, crop)
            tissue = None if tissue is None else center_crop(tissue, crop)
        if pred.shape != target.shape:
            raise EvaluateError(f"{preds[name]}: reconstruction: expected the target's shape "
                                f"{target.shape} ({targets[name]}), found {pred.shape} "
                                f"(--crop H W crops both)")
        try:
            per_volume[name] = (enhancement_scores(target, pred, tissue, peak)
                                if kind == "enhancement" else volume_scores(target, pred))
        except ValueError as err:
            raise EvaluateError(f"{preds[name]}: {err}") from None
    names = ENHANCEMENT_METRICS if kind == "enhancement" else METRICS
    total = {m: summarize([v[m] for v in per_volume.values()]) for m in names}
    return {"metrics": kind, "per_volume": per_volume, "total": total,
            "volumes": len(per_volume)}


def format_scores(scores: dict) -> str:
    """A plain-text table: one line per volume and the mean +- std line."""
    formats = {"nmse": ">10.4g", "psnr": ">8.3f", "ssim": ">8.4f", "snr": ">8.3f"}
    names = list(scores["total"])
    widths = {m: int(formats[m][1:].split(".")[0]) for m in names}
    lines = [f"{'volume':<40} " + " ".join(f"{m.upper():>{widths[m]}}" for m in names)]
    for name, v in scores["per_volume"].items():
        lines.append(f"{name:<40} " + " ".join(f"{v[m]:{formats[m]}}" for m in names))
    t = scores["total"]
    lines.append(f"{'total (mean +- std, ' + str(scores['volumes']) + ' volumes)':<40} "
                 + " ".join(f"{t[m]['mean_pm_std']:>{widths[m]}}" for m in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdhpc.evaluate",
                                     description="NMSE, PSNR and SSIM of reconstruction files "
                                                 "against targets, as fastMRI's evaluate.py; "
                                                 "PSNR, SSIM and SNR of enhancement outputs.")
    parser.add_argument("--target", required=True, help="folder of target .h5 files")
    parser.add_argument("--pred", required=True, help="folder of prediction .h5 files")
    parser.add_argument("--out", help="write the scores as JSON to this file")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                        help="centre crop target and prediction first")
    parser.add_argument("--target-key", choices=TARGET_KEYS,
                        help="target dataset (default: the first of these the file has)")
    parser.add_argument("--metrics", choices=METRIC_SETS, default="auto",
                        help="fastmri (NMSE, PSNR, SSIM) or enhancement (PSNR, SSIM, SNR in "
                             "ROIs); auto (default): enhancement for files kdhpc.predict wrote "
                             "from an enhancement run")
    args = parser.parse_args(argv)
    try:
        scores = evaluate(args.target, args.pred, args.crop, args.target_key, args.metrics)
    except (EvaluateError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_scores(scores))
    if args.out:
        write_atomic(args.out, json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
