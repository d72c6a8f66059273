"""Score reconstruction files as fastMRI does: ``python -m kdhpc.evaluate``.

Run::

    python -m kdhpc.evaluate --target DIR --pred DIR [--out FILE.json] [--crop H W]
                             [--target-key reconstruction_esc|reconstruction_rss|reconstruction]

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


def volume_scores(target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """NMSE, PSNR, SSIM of one volume with data range ``target.max()`` (fastMRI)."""
    peak = float(target.max())
    return {"nmse": nmse(target, pred), "psnr": psnr(target, pred, peak),
            "ssim": ssim(target, pred, peak), "slices": int(target.shape[0])}


def evaluate(target_dir: str | Path, pred_dir: str | Path, crop: tuple[int, int] | None = None,
             target_key: str | None = None) -> dict:
    """Per-volume and total metrics of the prediction files against the targets (module
    docstring)."""
    preds = {p.name: p for p in list_files(pred_dir, "*.h5")}
    targets = {p.name: p for p in list_files(target_dir, "*.h5")}
    missing = sorted(set(preds) - set(targets))
    if missing:
        raise EvaluateError(f"{target_dir}: no target for prediction(s) {', '.join(missing)}")
    unpredicted = sorted(set(targets) - set(preds))
    if unpredicted:
        raise EvaluateError(f"{pred_dir}: no prediction for target(s) {', '.join(unpredicted)}")
    keys = (target_key,) if target_key else TARGET_KEYS
    per_volume = {}
    for name in sorted(targets):
        target = read_volume(targets[name], keys)
        pred = read_volume(preds[name], (PRED_KEY,))
        if crop is not None:
            target, pred = center_crop(target, crop), center_crop(pred, crop)
        if pred.shape != target.shape:
            raise EvaluateError(f"{preds[name]}: reconstruction: expected the target's shape "
                                f"{target.shape} ({targets[name]}), found {pred.shape} "
                                f"(--crop H W crops both)")
        try:
            per_volume[name] = volume_scores(target, pred)
        except ValueError as err:
            raise EvaluateError(f"{preds[name]}: {err}") from None
    total = {m: summarize([v[m] for v in per_volume.values()]) for m in METRICS}
    return {"per_volume": per_volume, "total": total, "volumes": len(per_volume)}


def format_scores(scores: dict) -> str:
    """A plain-text table: one line per volume and the mean +- std line."""
    lines = [f"{'volume':<40} {'NMSE':>10} {'PSNR':>8} {'SSIM':>8}"]
    for name, v in scores["per_volume"].items():
        lines.append(f"{name:<40} {v['nmse']:>10.4g} {v['psnr']:>8.3f} {v['ssim']:>8.4f}")
    t = scores["total"]
    lines.append(f"{'total (mean +- std, ' + str(scores['volumes']) + ' volumes)':<40} "
                 f"{t['nmse']['mean_pm_std']:>10} {t['psnr']['mean_pm_std']:>8} "
                 f"{t['ssim']['mean_pm_std']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdhpc.evaluate",
                                     description="NMSE, PSNR and SSIM of reconstruction files "
                                                 "against targets, as fastMRI's evaluate.py.")
    parser.add_argument("--target", required=True, help="folder of target .h5 files")
    parser.add_argument("--pred", required=True, help="folder of prediction .h5 files")
    parser.add_argument("--out", help="write the scores as JSON to this file")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"),
                        help="centre crop target and prediction first")
    parser.add_argument("--target-key", choices=TARGET_KEYS,
                        help="target dataset (default: the first of these the file has)")
    args = parser.parse_args(argv)
    try:
        scores = evaluate(args.target, args.pred, args.crop, args.target_key)
    except (EvaluateError, DataFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_scores(scores))
    if args.out:
        write_atomic(args.out, json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
