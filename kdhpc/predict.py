"""Reconstruct or enhance files with a trained run: ``python -m kdhpc.predict``.

Run::

    python -m kdhpc.predict RUN_DIR --data PATH --out DIR [--model student_kd|student|teacher]
                            [--input target|kspace] [--task denoise|superres]

``RUN_DIR`` is a finished ``reconstruction`` (DC-CNN) or ``superres`` (VDSR) run of
``python -m kdhpc.distill``; ``PATH`` a folder of ``.h5`` volumes (or one file) in the layout of
the run's ``data.dataset`` (fastMRI: ``kspace`` and ``reconstruction_esc`` / ``_rss``; KD-MRI:
``volfs``). One file ``DIR/<input name>`` is written per input file, in fastMRI's submission
layout: dataset ``reconstruction`` float32 ``(S, h, w)``, every slice of the volume, on the
target's scale (original units, not the [0, 1] training scale) and shape: the run's
``data.crop`` centre crop, as its evaluation and fastMRI's ``evaluate.py`` compare. Files are
written under a temporary name and renamed when complete.

Enhancement runs (``recipe: enhancement``): ``PATH`` holds fastMRI-layout ``.h5`` volumes with
target images; each slice's input is made as the run's evaluation makes it (the test split's
view 0: the target centre cropped to ``data.crop``, divided by the volume maximum ``R``, degraded
by the run's ``degrade.*`` for ``--task``, default ``degrade.task``, with the noise seeded by the
file name and slice, so the same file gets the same input), and the file ``DIR/<input name>``
holds the enhanced image as dataset ``reconstruction`` float32 ``(S, h, w)`` on the target's
scale (multiplied by ``R``), every slice. The file attribute ``kdhpc_metrics = "enhancement"``
tells ``python -m kdhpc.evaluate`` to score it with the enhancement metrics (PSNR, SSIM, SNR in
ROIs) the run's own evaluation reports. ``--model`` defaults to ``student_kd`` where the run has
it (sweep trials), else the KD student at ``loss.alpha`` (stage ``student_a<alpha>``); any
trained network of the run may be named (``student_a0.00``, ``teacher``, ``expert_superres``,
``multitask_kd``: a multi-task network gets ``--task``'s id).

Inputs of reconstruction runs (``--input``):

- ``target`` (default): the run's own convention, so the predictions score exactly what the
  run's ``evaluate`` stage reports for the same files. A run is trained and evaluated on
  k-space *simulated* from the file's real target image (single-coil, KD-MRI's data model,
  :mod:`kdhpc.data.views`): the target is centre cropped, divided by its volume maximum ``R``
  (the file's ``max`` attribute, else the volume's), transformed with the unshifted FFT and
  undersampled with the run's mask (``mask.*`` of its config; random kinds draw the same
  per-slice masks as the run's view 0); the network's output is multiplied by ``R``. Every
  slice is reconstructed; the run's evaluation reads only the central ``data.slice_fraction``
  of each volume, so its numbers equal ``kdhpc.evaluate``'s when that fraction is 1.
- ``kspace``: the file's *measured* single-coil k-space (fastMRI ``kspace`` ``(S, H, W)``,
  centred layout), undersampled by the file's own ``mask`` dataset where it has one (fastMRI
  test files; their k-space is already undersampled) and else by the run's mask config. The
  zero-filled image is ``Re(ifft2c(k * M))`` on the full k-space grid (data consistency needs
  the whole grid), k-space and mask are moved to the DC-CNN's unshifted layout exactly (through
  the image, not by a shift of k-space), the image is divided by ``R`` (the ``max`` attribute,
  else the volume's largest zero-filled magnitude), and the output is multiplied by ``R`` and
  centre cropped to ``data.crop``. Multi-coil k-space is refused: the DC-CNN's data
  consistency is single-coil. Such predictions are *not* what the run evaluated (measured data
  carries phase; the run's targets are real magnitude images).

:func:`load_run_model` is the one place that knows the run folder's layout (``config.yaml``,
``<stage>/stage.json`` with ``result.arch`` and ``result.weights``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from kdhpc.config import Config, ConfigError, load_config
from kdhpc.data.degrade import fft2, ifft2
from kdhpc.data.fastmri import (DataFormatError, FastMRISliceDataset, atomic_output,
                                list_files, open_h5, read_h5)
from kdhpc.data.kdmri import KDMRISliceDataset
from kdhpc.data.masks import make_mask, to_layout
from kdhpc.data.views import SliceViews, center_crop
from kdhpc.models.external import load_run_network

RECON_RECIPES = ("reconstruction", "superres")
ENHANCEMENT = "enhancement"
INPUTS = ("target", "kspace")
OUTPUT_KEY = "reconstruction"
METRICS_ATTRIBUTE = "kdhpc_metrics"
"""File attribute naming the metrics kdhpc.evaluate scores a prediction with (enhancement)."""


class PredictError(ValueError):
    """A run, data file or option that cannot be used; one line naming it."""


# ---------------------------------------------------------------------------------------------
# the run

def load_run_model(run_dir: str | Path, which: str = "student_kd") -> tuple[nn.Module, Config]:
    """(network in eval mode with the weights of stage ``which``, the run's resolved config).

    Reads ``RUN_DIR/config.yaml`` and ``RUN_DIR/<which>/stage.json`` (``result.arch``: the
    model spec, built with ``model.teacher_kwargs`` or ``model.student_kwargs``; a factory's
    module must be importable, e.g. on ``PYTHONPATH``; ``result.weights``: relative to
    ``RUN_DIR`` or absolute).
    """
    run_dir = Path(run_dir)
    config_file, stage_file = run_dir / "config.yaml", run_dir / which / "stage.json"
    if not config_file.is_file():
        raise PredictError(f"{run_dir}: expected a run folder with config.yaml (made by python "
                           f"-m kdhpc.distill), found none")
    if not stage_file.is_file():
        stages = sorted(p.parent.name for p in run_dir.glob("*/stage.json")
                        if '"arch"' in p.read_text())
        raise PredictError(f"{stage_file}: not found; expected a finished stage {which!r}; this "
                           f"run has trained networks {', '.join(stages) or '(none)'}")
    try:
        cfg = load_config(config_file)
        result = json.loads(stage_file.read_text())["result"]
        arch, weights = result["arch"], Path(result["weights"])
    except (ConfigError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise PredictError(f"{stage_file}: expected result.arch and result.weights: "
                           f"{err}") from None
    weights = weights if weights.is_absolute() else run_dir / weights
    # A loaded teacher's weights are the user's checkpoint (Lightning / DDP layouts, or a
    # TorchScript / torch.export program); weights a stage trained are plain state dicts.
    foreign = which == "teacher" and bool(cfg.model.teacher_checkpoint)
    try:
        model = load_run_network(cfg.model, arch, weights, foreign=foreign)
    except ConfigError as err:
        raise PredictError(str(err)) from None
    return model.eval(), cfg


def check_predict_run(cfg: Config) -> None:
    if cfg.recipe not in (*RECON_RECIPES, ENHANCEMENT):
        raise PredictError(f"recipe: expected one of {(*RECON_RECIPES, ENHANCEMENT)} (a "
                           f"reconstruction or enhancement run; segmentation: python -m "
                           f"kdhpc.segment), found {cfg.recipe!r}")


def default_network(run_dir: str | Path) -> str:
    """The network ``--model`` names by default: ``student_kd``, or for an enhancement run
    without that stage the KD student at ``loss.alpha`` (``student_a<alpha>``)."""
    run_dir = Path(run_dir)
    if (run_dir / "student_kd" / "stage.json").is_file() or not (run_dir / "config.yaml").is_file():
        return "student_kd"
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as err:
        raise PredictError(str(err)) from None
    if cfg.recipe != ENHANCEMENT:
        return "student_kd"
    from kdhpc.recipes.enhancement import alpha_name

    return alpha_name(cfg.loss.alpha)


def network_call(model: nn.Module, batch: dict) -> torch.Tensor:
    """DC-CNN ``model(input, kspace, mask)`` when the batch has a mask, else ``model(input)``."""
    if "mask" in batch:
        return model(batch["input"], batch["kspace"], batch["mask"])
    return model(batch["input"])


# ---------------------------------------------------------------------------------------------
# --input target: the run's own views

def slice_source(cfg: Config, data: str | Path):
    """Every slice of the ``.h5`` files at ``data`` (a folder or one file; KD-MRI: also a
    folder holding ``acc_<acc>/``) as the run's dataset reads them (``data.dataset``)."""
    if cfg.data.dataset == "kdmri":
        return KDMRISliceDataset(data, cfg.mask.acceleration)
    challenge = cfg.data.challenge if cfg.data.dataset == "fastmri" else "singlecoil"
    return FastMRISliceDataset(list_files(data, "*.h5"), challenge)


def run_views(cfg: Config, data: str | Path) -> SliceViews:
    """The run's views (view 0) of every slice at ``data``: simulated inputs, as its
    evaluation makes them (module docstring, ``--input target``)."""
    superres = cfg.recipe == "superres"
    return SliceViews(slice_source(cfg, data), cfg.degrade,
                      mask=None if superres else cfg.mask, centered=False, crop=cfg.data.crop,
                      normalize="volume", input_kind="magnitude" if superres else "real",
                      base_seed=cfg.mask.seed)


def predict_views(model: nn.Module, views, batch_size: int,
                  call: Callable[[nn.Module, dict], torch.Tensor] = network_call
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """(file name, prediction ``(S, h, w)`` float32 on the target's scale) per volume of
    ``views`` (view 0 of every slice; ``views.slices`` the slice dataset), the network called
    as ``call(model, batch)``."""
    for volume, (name, _) in enumerate(views.slices.volumes):
        indices = views.slices.volume_indices(volume)
        slices = []
        for start in range(0, len(indices), batch_size):
            part = indices[start:start + batch_size]
            batch = default_collate([views.get_view(i, 0) for i in part])
            with torch.inference_mode():
                pred = call(model, batch).float()  # [B, 1, h, w], normalised scale
            slices.append((pred * batch["scale"].reshape(-1, 1, 1, 1))[:, 0].numpy())
        yield Path(name).name, np.concatenate(slices).astype(np.float32)


def enhancement_views(cfg: Config, data: str | Path, task: str):
    """The enhancement run's test views (whole slices, view 0) of every slice at ``data``."""
    from kdhpc.data.views import TASKS, EnhancementViews

    if task not in TASKS:
        raise PredictError(f"--task: expected one of {TASKS}, found {task!r}")
    return EnhancementViews(FastMRISliceDataset(list_files(data, "*.h5"), cfg.data.challenge),
                            cfg, task, 0)


# ---------------------------------------------------------------------------------------------
# --input kspace: measured data

def measured_inputs(kspace: np.ndarray, mask_centered: np.ndarray, scale: float
                    ) -> dict[str, torch.Tensor]:
    """DC-CNN inputs from measured centred k-space ``[S, H, W]`` and a centred mask ``[W]``:
    ``input`` ``Re(x_zf) / scale``, ``kspace`` the unshifted FFT of ``x_zf / scale`` (so the DC
    step keeps the measured lines), ``mask`` unshifted ``[1, 1, 1, W]``."""
    k = torch.from_numpy(np.ascontiguousarray(kspace)).to(torch.complex64)
    mask_c = torch.from_numpy(np.asarray(mask_centered, dtype=np.float32))
    image = ifft2(k * mask_c, centered=True) / scale  # [S, H, W] complex
    return {"input": image.real[:, None].contiguous(),
            "kspace": fft2(image, centered=False)[:, None].to(torch.complex64).contiguous(),
            "mask": to_layout(mask_c, "centered", "unshifted").reshape(1, 1, 1, -1)}


def predict_measured(model: nn.Module, cfg: Config, path: Path, batch_size: int) -> np.ndarray:
    """The reconstruction ``(S, h, w)`` of one fastMRI file's measured single-coil k-space."""
    with open_h5(path) as f:
        kspace = read_h5(path, f, "kspace")
        file_mask = read_h5(path, f, "mask") if "mask" in f else None
        peak = float(f.attrs["max"]) if "max" in f.attrs else None
    if kspace.ndim != 3 or not np.iscomplexobj(kspace):
        raise PredictError(f"{path}: kspace: expected single-coil complex (S, H, W), found shape "
                           f"{kspace.shape} {kspace.dtype} (multi-coil data consistency is not "
                           f"supported; use --input target)")
    width = kspace.shape[-1]
    if file_mask is not None:
        mask = np.asarray(file_mask, dtype=np.float32).reshape(-1)
        if mask.shape != (width,):
            raise PredictError(f"{path}: mask: expected [{width}] (the k-space width), found "
                               f"{tuple(np.shape(file_mask))}")
    else:
        if cfg.mask.kind not in ("kdmri", "file", "equispaced", "random"):
            raise PredictError(f"mask.kind {cfg.mask.kind!r}: cannot build a mask")
        mask = to_layout(make_mask(cfg.mask, width), cfg.mask.layout, "centered")
        if mask.ndim != 1:
            raise PredictError(f"{path}: the run's mask is 2-D {mask.shape}; --input kspace "
                               f"needs a 1-D line mask over W")
    if peak is None:
        peak = float(np.abs(ifft2(torch.from_numpy(kspace * mask).to(torch.complex64),
                                  centered=True)).max())
    if not peak > 0:
        raise PredictError(f"{path}: expected a positive image maximum to normalise by, found "
                           f"{peak}")
    inputs = measured_inputs(kspace, mask, peak)
    out = []
    for start in range(0, kspace.shape[0], batch_size):
        part = slice(start, start + batch_size)
        with torch.inference_mode():
            pred = model(inputs["input"][part], inputs["kspace"][part], inputs["mask"]).float()
        out.append(center_crop(pred[:, 0] * peak, cfg.data.crop).numpy())
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# output

def write_reconstruction(path: Path, reconstruction: np.ndarray,
                         attrs: dict | None = None) -> Path:
    """``path`` with dataset ``reconstruction`` (fastMRI submission layout) and file
    attributes ``attrs``, atomically."""
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(OUTPUT_KEY, data=reconstruction.astype(np.float32))
            f.attrs.update(attrs or {})
    return path


def predict(run_dir: str | Path, data: str | Path, out_dir: str | Path,
            which: str | None = None, input_kind: str = "target",
            task: str | None = None) -> list[Path]:
    """Write one prediction file per ``.h5`` file of ``data`` into ``out_dir`` (module
    docstring); returns the written paths. ``which`` defaults to :func:`default_network`."""
    if input_kind not in INPUTS:
        raise PredictError(f"--input: expected one of {INPUTS}, found {input_kind!r}")
    model, cfg = load_run_model(run_dir, which or default_network(run_dir))
    check_predict_run(cfg)
    out_dir = Path(out_dir)
    batch_size = max(1, cfg.eval.batch_size)
    written = []
    if cfg.recipe == ENHANCEMENT:
        if input_kind != "target":
            raise PredictError(f"--input {input_kind}: an enhancement run makes its inputs from "
                               f"the files' targets (--input target)")
        from kdhpc.models.external import enhance

        views = enhancement_views(cfg, data, task or cfg.degrade.task)
        for name, enhanced in predict_views(model, views, batch_size, enhance):
            written.append(write_reconstruction(out_dir / name, enhanced,
                                                {METRICS_ATTRIBUTE: ENHANCEMENT}))
        return written
    if task is not None:
        raise PredictError(f"--task: only enhancement runs take a task, found recipe "
                           f"{cfg.recipe!r}")
    if input_kind == "target":
        try:
            for name, reconstruction in predict_views(model, run_views(cfg, data), batch_size):
                written.append(write_reconstruction(out_dir / name, reconstruction))
        except DataFormatError as err:
            hint = " (for files without a target image use --input kspace)"
            raise PredictError(f"{err}{hint if 'no target' in str(err) else ''}") from None
    else:
        if cfg.recipe != "reconstruction":
            raise PredictError(f"--input kspace: expected a reconstruction run, found recipe "
                               f"{cfg.recipe!r}")
        for path in list_files(data, "*.h5"):
            written.append(write_reconstruction(out_dir / path.name,
                                                predict_measured(model, cfg, path, batch_size)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdhpc.predict",
                                     description="Reconstruct or enhance .h5 volumes with a "
                                                 "trained run; writes fastMRI submission files.")
    parser.add_argument("run_dir", help="finished reconstruction or enhancement run folder "
                                        "(RUN_DIR)")
    parser.add_argument("--data", required=True, help="folder of .h5 volumes, or one file")
    parser.add_argument("--out", required=True, help="output folder (one .h5 per input)")
    parser.add_argument("--model", default=None,
                        help="which trained network (stage folder) of the run: student_kd "
                             "(default; enhancement: the KD student at loss.alpha), student, "
                             "teacher, ...")
    parser.add_argument("--input", default="target", choices=INPUTS,
                        help="target: simulate from the file's target as the run does "
                             "(default); kspace: the file's measured single-coil k-space")
    parser.add_argument("--task", choices=("denoise", "superres"),
                        help="enhancement runs: the degradation of the inputs (default: the "
                             "run's degrade.task)")
    args = parser.parse_args(argv)
    try:
        written = predict(args.run_dir, args.data, args.out, args.model, args.input, args.task)
    except (PredictError, DataFormatError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(written)} prediction file(s) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
