"""KD-MRI (seeds 001/002): DC-CNN reconstruction and VDSR super-resolution distillation.

Run::

    python -m kdhpc.distill configs/recon_default.yaml          # CPU default, prints the table
    python -m kdhpc.distill configs/recon_kdmri_brain.yaml data.root=... mask.acceleration=8
    python -m kdhpc.distill configs/superres_default.yaml       # VDSR super-resolution
    torchrun --nproc-per-node=2 -m kdhpc.distill configs/recon_default.yaml
    python -m kdhpc.teacher.cache configs/recon_default.yaml    # fill the cache by itself

Published settings: ``configs/recon_kdmri_{brain,cardiac,knee}.yaml``, one per dataset at 4x;
the acceleration is an override (``mask.acceleration=5`` or ``8``, with its own ``run_dir``).

Stages (declared in :func:`stages`, run by :func:`kdhpc.recipe.execute`, each resumable and
digest-keyed on the config keys it declares)::

    data -> teacher -> teacher_cache -> student -> student_at -> student_kd -> evaluate -> report
                                                                          (sweeps: evaluate_val)

- ``teacher`` (KD-MRI step 1): ``model.teacher`` trained on L1, or ``model.teacher_checkpoint``
  loaded. ``teacher_cache``: for every view of every training slice, the frozen teacher's output
  image and the raw attention maps ``Q = sum_c |A_c|^p`` (``kdhpc.ops.attention_map`` with
  ``normalize=False``, so both AT modes can use them) of its tapped layers (DC-CNN: ReLU(conv3)
  of each of the 5 cascades; VDSR: ReLU(conv6)), :func:`kdhpc.teacher.fill_cache`; skipped for
  ``teacher.mode: stream``, where the teacher runs on each batch's exact views instead.
- ``student``: the baseline, ``model.student`` on L1 alone (no KD).
- ``student_at`` (step 2): the student on the attention-transfer loss alone
  (:func:`kdhpc.losses.attention_transfer_loss`, ``loss.at_mode`` "paper" or "kdmri_code",
  exponent ``loss.at_p``); its final weights are kept (its output is not trained, so a
  validation image metric cannot select among its checkpoints). ``loss.attention_transfer:
  false`` drops it (``student_kd`` then starts from fresh weights): needed for a teacher that
  is only run, a TorchScript / torch.export file in ``model.teacher_checkpoint``, whose layers
  forward hooks cannot reach (docs/own-models.md).
- ``student_kd`` (step 3): from ``student_at``'s weights, ``alpha * L1(S, T) + (1 - alpha) *
  L1(S, Y)`` (:func:`kdhpc.losses.imitation_loss`; ``alpha = loss.alpha`` weighs the
  distillation term, docs/methods.md; KD-MRI's paper writes alpha on the data term: its alpha = 0.5
  maps onto ours unchanged). As in KD-MRI every stage runs ``train.epochs`` epochs, so the KD
  student sees twice the baseline's optimiser steps (AT pre-training, then fine-tuning): the
  report says so beside the gap it closes.
- ``evaluate``: the TEST split, view 0, every volume on one rank: zero-filled input (ZF),
  teacher, student and KD student; per-volume PSNR, SSIM, NMSE and HFEN
  (:class:`kdhpc.metrics.VolumeMetricAccumulator`, all-reduced).
- ``report``: ``<run_dir>/report.md``, ``metrics.json``, ``panel.png``: KD-MRI's table (rows
  ZF / Teacher / Student / KD-Student, mean +- std over volumes), parameter counts, the fraction
  of the teacher-student PSNR gap that KD closes, ``(KD - S) / (T - S)``, with a paired t-test
  of KD student vs student on per-volume PSNR (and SSIM), CPU latency per slice at 1 thread and
  all threads (and the GPU when present), and the qualitative panel (input, target, teacher,
  student, KD, residuals x5). The run prints the table at the end, also when every stage was
  up to date.

Model selection on the validation split only (``train.best_metric``: ``val_mse`` as KD-MRI,
or ``val_loss`` = validation L1); the test split is read by ``evaluate`` alone.

Data and conventions (views: :mod:`kdhpc.data.views`):

- ``data.dataset``: ``default_brain`` (the embedded fastMRI-layout brain set), ``fastmri``
  (``data.root`` holding ``<challenge>_<split>/`` or ``<split>/``; single-coil knee:
  ``data.challenge: singlecoil``) or ``kdmri`` (``data.root`` holding ``<split>/acc_<acc>/``;
  KD-MRI calls its validation split ``validation``). Targets are the files' real images
  (``reconstruction_esc`` / ``_rss``, or ``volfs``), centre cropped to ``data.crop``.
- Inputs are simulated from the target in the DC-CNN's *unshifted* FFT layout (KD-MRI's;
  fastMRI files store centred k-space, which is never just shifted):
  ``k0 = M * fft2(x, centered=False)``, ``mask.layout`` moved to unshifted. ``mask.kind: kdmri``
  is KD-MRI's fixed 1-D variable-density line mask over W (``mask.file`` loads KD-MRI's own
  ``us_masks`` arrays, 1-D or 2-D). DC-CNN input: the real part of the zero-filled image
  ``Re(ifft2(k0))`` [B, 1, H, W] (each later cascade also receives a real part, the output of
  its DC step); the ZF row of the table is the magnitude ``|ifft2(k0)|`` (KD-MRI's
  ``img_volus``). Super-resolution (``recipe: superres``): ``degrade.task: superres``, the
  magnitude of the IFFT of the central ``1/sr_scale`` k-space block on the same grid (KD-MRI's
  64 of 256 at scale 4); the ZF row is that low-resolution input.
- Normalisation: every slice is divided by its volume's maximum R (the fastMRI ``max``
  attribute; else the volume's maximum), so targets lie in [0, 1] as in KD-MRI. Metrics are
  computed per volume on that scale with data range 1 and, for HFEN, predictions clipped to
  [0, 1] (KD-MRI's HFN): PSNR, SSIM and NMSE equal their values on the original scale with
  data range R (they are invariant to a common scale of image and range), and HFEN equals
  KD-MRI's on [0, 1]-normalised volumes; MSE is in units of R^2.
- ``degrade.dihedral: false`` and ``views_per_sample: 1`` for reconstruction (KD-MRI trains
  without augmentation and with one fixed mask, so each slice has one view and the teacher cache
  one record per slice).

Config fields this recipe would like (hard-wired meanwhile): none are required; the stage
epochs all come from ``train.epochs`` (a ``train.teacher_epochs`` would let the teacher train
longer than the students within a CPU budget).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from kdhpc.config import Config, ConfigError, digest, write_atomic
from kdhpc.data.default import dataset_root
from kdhpc.data.fastmri import FastMRISliceDataset
from kdhpc.data.kdmri import KDMRISliceDataset
from kdhpc.data.views import SliceViews, TargetFreeViews, WithUnlabelledViews, describe_views
from kdhpc.losses import (attention_transfer_loss, imitation_loss,
                          imitation_loss_with_unlabelled)
from kdhpc.metrics import (VolumeMetricAccumulator, paired_test, reconstruction_slice_sums,
                           summarize, volume_metrics_from_sums)
from kdhpc.models import DCCNN, VDSR, count_parameters, feature_layers
from kdhpc.models.external import (build_run_network, check_distinct_roles, expect_output,
                                   is_factory_spec, load_run_network, probe, role_of,
                                   teacher_program)
from kdhpc.models.taps import LayerPathError, LayerTaps
from kdhpc.ops import attention_map
from kdhpc.recipe import (TRAIN_KEYS, Recipe, Run, Stage, cache_stage, data_root,
                          evaluate_volumes, expect_dataset, key_value, load_teacher,
                          longer_training_config, network_latency, split_folder, teacher_stage,
                          teacher_training_config, teacher_weights, train_network)
from kdhpc.report import (comparison_row, latency_table, mean_std_rows, save_panel, table,
                          write_report)
from kdhpc.runtime import gather, rank
from kdhpc.teacher import default_cache_dir, teacher_source

TABLE_METRICS = ("psnr", "ssim", "nmse", "hfen")
METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "nmse": "NMSE", "hfen": "HFEN"}
METRIC_FORMATS = {"psnr": ".2f", "ssim": ".4f", "nmse": ".4f", "hfen": ".4f"}
RESIDUAL_GAIN = 5.0  # residual panels |pred - target| x5, as in KD-MRI's figure
CACHE_STAGE = "teacher_cache"  # its folder is the default teacher.cache_dir (run_dir/teacher_cache)


# ---------------------------------------------------------------------------------------------
# config checks and data

def is_superres(cfg: Config) -> bool:
    return cfg.recipe == "superres"


def check_config(cfg: Config) -> None:
    """Refuse a config this recipe cannot run, naming the key, what it expects and found."""
    if cfg.recipe not in ("reconstruction", "superres"):
        raise ConfigError(f"recipe: expected 'reconstruction' or 'superres' for "
                          f"kdhpc.recipes.reconstruction, found {cfg.recipe!r}")
    task = "superres" if is_superres(cfg) else "undersample"
    if cfg.degrade.task != task:
        raise ConfigError(f"degrade.task: expected {task!r} for recipe {cfg.recipe!r}, found "
                          f"{cfg.degrade.task!r}")
    expect_dataset(cfg, ("default_brain", "fastmri", "kdmri"))
    if cfg.data.patch_size:
        raise ConfigError(f"data.patch_size: expected 0 (whole slices: a DC step needs the "
                          f"whole k-space; use data.crop), found {cfg.data.patch_size}")
    unlabelled = cfg.data.unlabelled_split
    if unlabelled:
        if is_superres(cfg):
            raise ConfigError(f"data.unlabelled_split: expected '' for recipe 'superres' "
                              f"(target-free volumes are undersampled k-space), found "
                              f"{unlabelled!r}")
        labelled = {cfg.data.train_split, cfg.data.val_split, cfg.data.test_split}
        if unlabelled in labelled:
            raise ConfigError(f"data.unlabelled_split: expected a split other than the train, "
                              f"val and test splits {sorted(labelled)}, found {unlabelled!r}")
    check_models(cfg)


def slice_dataset(cfg: Config, split: str):
    """The (volume, slice) dataset of ``split`` (a split name from ``cfg.data``)."""
    folder = split_folder(cfg, dataset_root(cfg), split)
    if cfg.data.dataset == "kdmri":
        return KDMRISliceDataset(folder, cfg.mask.acceleration,
                                 slice_fraction=cfg.data.slice_fraction,
                                 max_volumes=cfg.data.max_volumes)
    challenge = cfg.data.challenge if cfg.data.dataset == "fastmri" else "singlecoil"
    return FastMRISliceDataset(folder, challenge, slice_fraction=cfg.data.slice_fraction,
                               max_volumes=cfg.data.max_volumes)


def view_dataset(cfg: Config, split: str) -> SliceViews:
    """Views of ``split`` as every stage reads them (module docstring: conventions)."""
    return SliceViews(slice_dataset(cfg, split), cfg.degrade,
                      mask=None if is_superres(cfg) else cfg.mask, centered=False,
                      crop=cfg.data.crop, normalize="volume",
                      input_kind="magnitude" if is_superres(cfg) else "real",
                      base_seed=cfg.mask.seed)


# ---------------------------------------------------------------------------------------------
# networks, losses, evaluation values

ROLES = ("teacher", "student")
PROBE_SIZE = 64  # largest side of the synthetic batch check_config runs the networks on
TAPS_ATTRIBUTE = "_kdhpc_taps"  # where build_network keeps a network's LayerTaps


def call_signature(cfg: Config) -> str:
    """How this recipe calls every network, registry or user-defined."""
    if is_superres(cfg):
        return "model(input) with input [B, 1, H, W] real, returning [B, 1, H, W]"
    return ("model(input, kspace, mask) with input [B, 1, H, W] real (zero-filled image), kspace "
            "[B, 1, H, W] complex (unshifted layout) and mask [B, 1, 1, W] or [B, 1, H, W] (1 = "
            "sampled), returning "
            "[B, 1, H, W]")


def tap_paths(cfg: Config, role: str, model: nn.Module) -> list[str]:
    """The module paths whose outputs feed attention transfer: ``model.<role>_layers``, else
    the registry network's ``feature_layers``."""
    return list(getattr(cfg.model, f"{role}_layers")) or list(feature_layers(model))


def build_network(cfg: Config, arch: str) -> nn.Module:
    """The network ``arch`` for this recipe, with forward hooks on its attention-transfer taps.

    ``arch`` is a registry name (a DC-CNN in the unshifted layout, or a VDSR for superres) or
    a factory ``package.module:callable``, called with ``model.<role>_kwargs``; a user network
    must take this recipe's call (:func:`call_signature`).
    """
    # check_config refuses a teacher and student of one spec configured differently.
    role = role_of(cfg.model, arch)
    model = build_run_network(cfg.model, arch)
    if not is_factory_spec(arch):
        expected = VDSR if is_superres(cfg) else DCCNN
        if not isinstance(model, expected):
            raise ConfigError(f"model: expected a {expected.__name__} (e.g. "
                              f"{'vdsr' if is_superres(cfg) else 'dccnn'}_teacher) for recipe "
                              f"{cfg.recipe!r}, found {arch!r} ({type(model).__name__})")
        if isinstance(model, DCCNN) and model.centered:
            raise ConfigError(f"model {arch!r}: expected the unshifted k-space layout of the "
                              f"views")
    paths = tap_paths(cfg, role, model)
    if paths:
        try:
            # Not detached: what the returned features were before (a frozen teacher runs
            # without gradients), and a student needs their graph.
            taps = LayerTaps(model, paths).attach()
        except LayerPathError as err:
            raise ConfigError(f"model.{role}_layers: {err}") from None
        # On the network itself (not in a registry keyed by it): both are freed together.
        setattr(model, TAPS_ATTRIBUTE, taps)
    return model


def _taps_of(model: nn.Module) -> LayerTaps | None:
    """The taps :func:`build_network` attached to ``model`` (or to the module a training
    engine wraps)."""
    for candidate in (model, getattr(model, "module", None)):
        taps = getattr(candidate, TAPS_ATTRIBUTE, None)
        if isinstance(taps, LayerTaps):
            return taps
    return None


def forward(model: nn.Module, batch: dict, features: bool = False):
    """``model`` on a batch of views: ``model(input, kspace, mask)`` (reconstruction) or
    ``model(input)`` (superres); with ``features`` also the outputs of its tapped layers."""
    args = ((batch["input"], batch["kspace"], batch["mask"]) if "mask" in batch
            else (batch["input"],))
    taps = _taps_of(model)
    if features and taps is None:  # a registry network built without build_network
        return model(*args, return_features=True)
    output = model(*args)
    return (output, taps.outputs()) if features else output


def make_extract(p: float, attention: bool = True) -> Callable[[nn.Module, dict], dict]:
    """The teacher-target function (cache and stream): output image and the raw attention map
    of every tapped layer, ``attention_<i>`` [B, H*W]; the output alone without ``attention``
    (``loss.attention_transfer: false``)."""
    def extract(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if not attention:
            return {"output": forward(model, batch)}
        output, taps = forward(model, batch, features=True)
        targets = {"output": output}
        for i, tap in enumerate(taps):
            targets[f"attention_{i}"] = attention_map(tap, p, normalize=False)
        return targets
    return extract


def probe_batch(cfg: Config, whole: bool = False) -> dict:
    """A small synthetic batch shaped like this recipe's views (check_config's trial call);
    ``whole``: of the full ``data.crop`` (a torch.export program fixes its input size)."""
    generator = torch.Generator().manual_seed(0)
    height, width = (n if whole else min(n, PROBE_SIZE) for n in cfg.data.crop)
    image = torch.rand(1, 1, height, width, generator=generator)
    if is_superres(cfg):
        return {"input": image}
    mask = (torch.arange(width) % 2 == 0).float().reshape(1, 1, 1, width)
    kspace = torch.fft.fft2(image.to(torch.complex64), norm="ortho") * mask
    return {"input": torch.fft.ifft2(kspace, norm="ortho").real, "kspace": kspace, "mask": mask}


def check_models(cfg: Config) -> None:
    """Teacher and student build, their layer paths exist, they take this recipe's call on a
    probe batch, and their taps pair up (same count; same spatial size per pair, as attention
    maps are compared pixel by pixel over channel sums, so channel counts may differ)."""
    model = cfg.model
    check_distinct_roles(model)
    program = teacher_program(model)
    attention = cfg.loss.attention_transfer
    if program is not None and attention:
        raise ConfigError(f"model.teacher_checkpoint: {program} is a TorchScript / torch.export "
                          f"program, which can be run but not tapped: attention transfer (the "
                          f"student_at stage) catches the teacher's layers with forward hooks, "
                          f"which need the eager module; set loss.attention_transfer: false "
                          f"(output imitation only), or give model.teacher and a state dict")
    nets = {role: build_network(cfg, getattr(model, role)) for role in ROLES
            if not (role == "teacher" and program is not None)}
    if program is not None:
        nets["teacher"] = load_network(cfg, model.teacher, program)
    taps = {role: tap_paths(cfg, role, net) for role, net in nets.items()}
    if attention and (not all(taps.values()) or len(taps["teacher"]) != len(taps["student"])):
        raise ConfigError(f"model: expected a teacher and a student with the same number of "
                          f"feature taps (attention-transfer pairs; set model.teacher_layers "
                          f"and model.student_layers for a network without feature_layers), "
                          f"found {taps}")
    custom = program is not None or any(is_factory_spec(getattr(model, r))
                                        or getattr(model, f"{r}_layers") for r in ROLES)
    if not custom:  # the registry networks' calls and taps are tested with the package
        return
    batch = probe_batch(cfg, whole=program is not None)
    shapes = {}
    names = {role: str(program) if role == "teacher" and program is not None
             else getattr(model, role) for role in ROLES}
    for role, net in nets.items():
        output, outputs = probe(f"model.{role}", names[role], lambda: (
            forward(net.eval(), batch, features=True) if attention
            else (forward(net.eval(), batch), [])), call_signature(cfg))
        expect_output(f"model.{role}", names[role], output, batch["input"].shape,
                      call_signature(cfg))
        shapes[role] = [tuple(t.shape[-2:]) if t.dim() == 4 else tuple(t.shape) for t in outputs]
    for i, (t, s) in enumerate(zip(shapes["teacher"], shapes["student"])):
        if t != s or len(t) != 2:
            raise ConfigError(f"model.student_layers: expected tap pair {i} ({taps['teacher'][i]}"
                              f" / {taps['student'][i]}) to be [B, C, H, W] maps of one spatial "
                              f"size, found {shapes['teacher'][i]} and {shapes['student'][i]}")


def l1_loss_fn(model: nn.Module, batch: dict, targets: dict | None) -> dict:
    """Steps 1 and the baseline: L1 to the target."""
    return imitation_loss(forward(model, batch), batch["target"], None, 0.0)


def make_at_loss(cfg: Config) -> Callable:
    """Step 2: the attention-transfer loss alone; L1 to the target is logged, not trained."""
    def loss_fn(model: nn.Module, batch: dict, targets: dict | None) -> dict:
        output, taps = forward(model, batch, features=True)
        if targets is None:  # evaluation without teacher targets: the data term only
            return imitation_loss(output, batch["target"], None, 0.0)
        maps = [targets[f"attention_{i}"] for i in range(len(taps))]
        terms = attention_transfer_loss(taps, maps, p=cfg.loss.at_p, mode=cfg.loss.at_mode)
        if "labelled" not in batch:  # target-free samples have no data term to log
            terms["l1"] = F.l1_loss(output.detach(), batch["target"])
        return terms
    return loss_fn


def make_kd_loss(cfg: Config) -> Callable:
    """Step 3: ``alpha * L1(S, T) + (1 - alpha) * L1(S, Y)``; a target-free sample (``labelled``
    0, data.unlabelled_split) learns ``L1(S, T)`` alone."""
    def loss_fn(model: nn.Module, batch: dict, targets: dict | None) -> dict:
        output = forward(model, batch)
        if targets is not None and "labelled" in batch:
            return imitation_loss_with_unlabelled(output, batch["target"], targets["output"],
                                                  cfg.loss.alpha, batch["labelled"])
        teacher = None if targets is None else targets["output"]
        return imitation_loss(output, batch["target"], teacher, cfg.loss.alpha)
    return loss_fn


def metric_scale(batch: dict) -> torch.Tensor:
    """[B, 1, 1, 1] factor from a view's scale to the volume-max-normalised scale (1 when the
    views are normalised per volume)."""
    return (batch["scale"] / batch["volume_max"]).reshape(-1, 1, 1, 1).to(batch["target"].dtype)


def eval_values(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Per-slice sums for the engine's validation (:func:`kdhpc.metrics.reconstruction_slice_sums`
    on the volume-max scale, data range 1) plus ``l1`` (the training data term)."""
    pred = forward(model, batch).float()
    target = batch["target"].float()
    scale = metric_scale(batch)
    sums = reconstruction_slice_sums(target * scale, pred * scale, 1.0)
    sums["l1"] = (pred - target).abs().flatten(1).mean(1).double().cpu()
    return sums


def volume_values(sums: dict[str, float]) -> dict[str, float]:
    """One volume's metrics from :func:`eval_values` sums; ``loss`` = mean slice L1."""
    metrics = volume_metrics_from_sums(sums)
    metrics["loss"] = sums["l1"] / sums["count"]
    return metrics


def zero_filled(batch: dict) -> torch.Tensor:
    """The ZF row's image: ``|ifft2(k0)|`` (unshifted) for reconstruction, the LR input for SR."""
    if "mask" in batch:
        return torch.fft.ifft2(batch["kspace"], norm="ortho").abs()
    return batch["input"]


# ---------------------------------------------------------------------------------------------
# stage helpers

def load_network(cfg: Config, arch: str, weights: str | os.PathLike) -> nn.Module:
    """``arch`` with the weights file ``weights`` (``weights_only`` load,
    :func:`kdhpc.models.external.load_run_network`). The teacher's ``model.teacher_checkpoint``
    may be a Lightning / DDP checkpoint (read with ``model.checkpoint_strict`` and
    ``model.checkpoint_prefix``) or a TorchScript / ``torch.export`` program (run as it is);
    weights a stage trained are plain state dicts."""
    return load_run_network(cfg.model, arch, weights, build=lambda a: build_network(cfg, a))


def teacher_cache_parts(cfg: Config):
    """(teacher, extract, training views) for ``python -m kdhpc.teacher.cache``."""
    check_config(cfg)
    teacher = load_network(cfg, cfg.model.teacher, teacher_weights(cfg))
    return (teacher, make_extract(cfg.loss.at_p, cfg.loss.attention_transfer),
            view_dataset(cfg, cfg.data.train_split))


# ---------------------------------------------------------------------------------------------
# evaluation

def metric_images(batch: dict, model: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, prediction) of one batch on the volume-max scale; ``model`` None is the ZF row."""
    scale = metric_scale(batch)
    pred = zero_filled(batch) if model is None else forward(model, batch)
    return batch["target"] * scale, pred * scale


def evaluate_models(cfg: Config, views, models: dict[str, nn.Module],
                    images: Callable[[dict, nn.Module | None], tuple] = metric_images
                    ) -> dict[str, dict[str, dict[str, float]]]:
    """Per-volume metrics ``{row: {volume name: {metric: value}}}`` of ZF and ``models`` on
    ``views`` (:func:`kdhpc.recipe.evaluate_volumes`; every rank gets them all).
    ``images(batch, model)`` gives the (target, prediction) pair a row is scored on (``model``
    None: the ZF row), with data range 1."""
    names = [Path(name).name for name, _ in views.slices.volumes]

    def score(volume: str, items: list, batch: dict, outputs: dict) -> list[dict]:
        target = images(batch, None)[0]
        rows = []
        for row, pred in outputs.items():
            accumulator = VolumeMetricAccumulator()
            accumulator.update(volume, target, pred, 1.0)
            rows.append({"row": row, "volume": volume, **accumulator.compute()[volume]})
        return rows

    for model in models.values():
        model.eval()
    rows = gather(evaluate_volumes(views, {"ZF": None, **models}, cfg.eval.batch_size,
                                   lambda model, batch: images(batch, model)[1], score,
                                   volume_name=lambda i: names[views.volume_of(i)]))
    per_volume: dict[str, dict[str, dict[str, float]]] = {row: {} for row in ("ZF", *models)}
    for row in rows:
        per_volume[row.pop("row")][row.pop("volume")] = row
    return per_volume


def panel_images(batch: dict, models: dict[str, nn.Module],
                 images: Callable[[dict, nn.Module | None], tuple] = metric_images
                 ) -> dict[str, np.ndarray]:
    """One slice's images as scored (``images``): input (ZF), target and each model's."""
    with torch.inference_mode():
        target, zero = images(batch, None)
        out = {"input": zero[0, 0].float().numpy(), "target": target[0, 0].float().numpy()}
        for row, model in models.items():
            out[row] = images(batch, model.eval())[1][0, 0].float().numpy()
    return out


def panel_index(views: SliceViews) -> int:
    """The central indexed slice of the first test volume."""
    first = views.slices.volume_indices(views.volume_of(0))
    return first[len(first) // 2]


# ---------------------------------------------------------------------------------------------
# report

def per_metric(per_volume: dict[str, dict[str, dict[str, float]]]
               ) -> dict[str, dict[str, list[float]]]:
    """``{row: {metric: [value per volume, in one volume order]}}``."""
    order = sorted(next(iter(per_volume.values())))
    return {row: {m: [volumes[v][m] for v in order] for m in (*TABLE_METRICS, "mse")}
            for row, volumes in per_volume.items()}


def results_table(values: dict[str, dict[str, list[float]]]) -> list[dict]:
    """KD-MRI's table: one row per model, ``mean +- std`` over volumes per metric."""
    return mean_std_rows(values, TABLE_METRICS, METRIC_FORMATS, METRIC_LABELS)


def gap_summary(values: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Fraction of the teacher-student PSNR gap that KD closes and the paired tests."""
    mean = {row: float(np.mean(values[row]["psnr"])) for row in values}
    gap = mean["Teacher"] - mean["Student"]
    # A fraction of a gap that is not there (teacher no better than student) means nothing.
    out: dict[str, Any] = {"psnr_mean": mean, "teacher_student_gap_db": gap,
                           "kd_gain_db": mean["KD-Student"] - mean["Student"],
                           "gap_fraction_closed": (mean["KD-Student"] - mean["Student"]) / gap
                           if gap > 0 else None, "tests": {}}
    n = len(values["Student"]["psnr"])
    pairs = [("KD-Student", "Student"), ("Teacher", "Student")]
    if UNLABELLED_ROW in values:  # does learning from target-free volumes beat KD without?
        pairs += [(UNLABELLED_ROW, "KD-Student"), (UNLABELLED_ROW, "Student")]
        out["unlabelled_gain_db"] = mean[UNLABELLED_ROW] - mean["KD-Student"]
    for a, b in pairs:
        for metric in ("psnr", "ssim"):
            key = f"{a} vs {b} {metric}"
            out["tests"][key] = (paired_test(values[a][metric], values[b][metric])
                                 if n >= 2 else {"p_value": None, "n": n})
    return out


def describe_kdmri(cfg: Config, steps: dict[str, int], volumes: int) -> dict[str, str]:
    """The report's title, setup, training protocol and published reference (KD-MRI)."""
    what = "super-resolution (VDSR)" if is_superres(cfg) else (
        f"reconstruction (DC-CNN), {cfg.mask.acceleration:g}x {cfg.mask.kind} mask")
    return {
        "title": f"KD-MRI {cfg.recipe} report", "published": " (KD-MRI: 25-66%)",
        "setup": f"{what}; data {cfg.data.dataset} ({volumes} test volumes), recipe "
                 f"{cfg.recipe}, {cfg.train.epochs} epochs per stage, batch "
                 f"{cfg.train.batch_size}, AT mode {cfg.loss.at_mode}, teacher targets "
                 f"{cfg.teacher.mode}. Metrics per volume on the volume-max scale (data range "
                 f"1), mean +- std over volumes.",
        "protocol": f"Optimiser steps: teacher {steps['teacher']}, student {steps['student']}, "
                    f"KD student {steps['student_at']} (attention transfer) + "
                    f"{steps['student_kd']} (alpha = {cfg.loss.alpha:g} imitation); "
                    + ("the no-KD student trained as many steps as the KD student "
                       "(train.equal_budget)." if cfg.train.equal_budget else
                       "KD-MRI's protocol gives the KD student both stages, i.e. more steps "
                       "than the baseline (train.equal_budget evens them).")}


def write_recon_report(cfg: Config, run_dir: Path, evaluation: dict, latency: list[dict],
                       params: dict[str, int], steps: dict[str, int], panel: Path,
                       describe: Callable[[Config, dict, int], dict] = describe_kdmri) -> dict:
    """report.md and metrics.json (rank 0) of the four-row image recipes (ZF, Teacher, Student,
    KD-Student); ``describe(cfg, steps, test volumes)`` gives the recipe's title, setup,
    protocol and published reference. Returns the printed text and key numbers."""
    values = per_metric(evaluation)
    rows = results_table(values)
    gaps = gap_summary(values)
    test = gaps["tests"]["KD-Student vs Student psnr"]
    p_value = test.get("p_value")
    fraction = gaps["gap_fraction_closed"]
    text = describe(cfg, steps, len(values["Student"]["psnr"]))
    closed = "n/a (the teacher is not better)" if fraction is None else f"{100 * fraction:.1f}%"
    ci = test.get("ci95")
    gap = gaps["teacher_student_gap_db"]
    ci_text = "" if ci is None else (
        f" (95% CI of the paired difference [{ci[0]:+.3f}, {ci[1]:+.3f}] dB"
        + (f", i.e. {100 * ci[0] / gap:.0f}% to {100 * ci[1] / gap:.0f}% of the gap" if gap > 0
           else "") + ")")
    gap_text = (f"Teacher - Student PSNR gap {gap:+.3f} dB; KD gains {gaps['kd_gain_db']:+.3f} dB"
                f"{ci_text}, closing {closed} of the gap{text['published']}; paired t-test "
                f"KD-Student vs Student on per-volume PSNR: "
                f"p = {'n/a' if p_value is None else f'{p_value:.3g}'} (n = {test['n']} "
                f"volumes).")
    if UNLABELLED_ROW in values:
        extra = gaps["tests"][f"{UNLABELLED_ROW} vs KD-Student psnr"]
        extra_ci = extra.get("ci95")
        gap_text += (
            f"\n\nTarget-free volumes (data.unlabelled_split {cfg.data.unlabelled_split!r}): the "
            f"{UNLABELLED_ROW} student, trained the same steps with a share of them on the "
            f"teacher's output alone, gains {gaps['unlabelled_gain_db']:+.3f} dB over KD on the "
            f"labelled set alone"
            + ("" if extra_ci is None else
               f" (95% CI [{extra_ci[0]:+.3f}, {extra_ci[1]:+.3f}] dB")
            + f", p = {'n/a' if extra.get('p_value') is None else format(extra['p_value'], '.3g')}"
            + ("" if extra_ci is None else ")") + ".")
    test_rows = [comparison_row(*k.rsplit(" ", 1), t) for k, t in gaps["tests"].items()]
    param_rows = [{"model": "Teacher", "arch": cfg.model.teacher, "parameters": params["Teacher"]},
                  {"model": "Student", "arch": cfg.model.student, "parameters": params["Student"],
                   }]
    reduction = 1 - params["Student"] / params["Teacher"]
    main_table = table(rows)
    sections = [
        ("Setup", text["setup"]),
        ("Results (test split)", main_table),
        ("Distillation gain", gap_text + "\n\n" + text["protocol"] + "\n\n" + table(test_rows)),
        ("Parameters", table(param_rows) + f"\n\nThe student has {100 * reduction:.1f}% fewer "
                       f"parameters."),
        ("Latency per slice", latency_table(latency) + "\nBatch of one slice; teacher and "
                              "student called in "
                              "turn, round by round, minimum and median per call; the speed-up "
                              "is from the minima, and a row whose speed-up disagrees with the "
                              "1-thread row by more than 2x is marked unreliable (a loaded "
                              "machine)."),
        ("Qualitative", f"![panel]({panel.name})\n\nInput, target, teacher, student and KD "
                        f"student; second row: residuals |prediction - target| x"
                        f"{RESIDUAL_GAIN:g}."),
    ]
    metrics = {"recipe": cfg.recipe, "table": rows, "per_volume": evaluation,
               "summary": {row: {m: summarize(values[row][m]) for m in (*TABLE_METRICS, "mse")}
                           for row in values},
               "gap": gaps, "parameters": params, "steps": steps, "latency": latency,
               "config_digest": digest(dataclasses.asdict(cfg))}
    write_report(run_dir, text["title"], sections, metrics)
    return {"text": f"{main_table}\n\n{gap_text}", "gap_fraction_closed": fraction,
            "p_value": p_value}


def save_recon_panel(images: dict[str, np.ndarray], path: Path) -> Path:
    """Row 1: input, target, teacher, student, KD; row 2: their residuals x5 (target: blank)."""
    order = list(images)  # input, target, then the models
    titles = ["ZF input" if name == "input" else name for name in order]
    target = images["target"]
    residuals = [np.abs(images[name] - target) * RESIDUAL_GAIN if name != "target"
                 else np.zeros_like(target) for name in order]
    top = float(target.max())
    return save_panel([images[n] for n in order] + residuals,
                      titles + [f"|{t} - target| x{RESIDUAL_GAIN:g}" if n != "target" else ""
                                for n, t in zip(order, titles)],
                      path, rows=2, vmax=[top] * (2 * len(order)))


# ---------------------------------------------------------------------------------------------
# the recipe as data

def _views(run: Run, split: str) -> SliceViews:
    return run.memo(("views", split), lambda: view_dataset(run.cfg, getattr(
        run.cfg.data, f"{split}_split")))


def _training_views(run: Run, unlabelled: bool):
    """The training split, or (data.unlabelled_split) it with target-free extra views."""
    if not unlabelled:
        return _views(run, "train")
    return run.memo(("views", "with_unlabelled"), lambda: WithUnlabelledViews(
        _views(run, "train"), TargetFreeViews(_views(run, "unlabelled"))))


def _data(run: Run, stage_dir: Path) -> dict:
    cfg = run.cfg
    root = data_root(cfg)
    identity = root.name if not cfg.data.root else str(root.resolve())
    splits = ("train", "val", "test", *(("unlabelled",) if cfg.data.unlabelled_split else ()))
    return {"dataset": identity, **{split: describe_views(_views(run, split)) for split in splits}}


def _frozen_teacher(run: Run) -> nn.Module:
    result = run.results["teacher"]
    return load_network(run.cfg, result["arch"], run.path(result["weights"]))


def train_stage(cfg: Config, stage_dir: Path, arch: str, loss_fn: Callable, train_set,
                val_set, **kwargs) -> dict:
    """:func:`kdhpc.recipe.train_network` with this recipe's networks and validation values."""
    return train_network(cfg, stage_dir, arch, loss_fn, train_set, val_set,
                         build=lambda a: build_network(cfg, a),
                         eval_fn=eval_values if val_set is not None else None,
                         volume_metrics=volume_values, **kwargs)


def _train_teacher(run: Run, stage_dir: Path) -> dict:
    return train_stage(teacher_training_config(run.cfg), stage_dir, run.cfg.model.teacher,
                       l1_loss_fn, _views(run, "train"), _views(run, "val"))


_load_teacher = load_teacher(load_network)


UNLABELLED = "_unlabelled"  # suffix of the stages and cache that add data.unlabelled_split


def cache_config_for(cfg: Config, unlabelled: bool) -> Config:
    """``cfg`` whose teacher cache is the one of the labelled training views, or that of the
    views with target-free extras (``<cache dir>_unlabelled``: the stage's own folder)."""
    if not unlabelled:
        return cfg
    folder = default_cache_dir(cfg)
    return dataclasses.replace(cfg, teacher=dataclasses.replace(
        cfg.teacher, cache_dir=str(folder.with_name(folder.name + UNLABELLED))))


def _fill_cache(unlabelled: bool) -> Callable[[Run, Path], dict]:
    def run_stage(run: Run, stage_dir: Path) -> dict:
        cfg = cache_config_for(run.cfg, unlabelled)
        train_set = _training_views(run, unlabelled)
        # The stage folder is the default cache: a rerun with new inputs starts from an empty
        # folder. A teacher.cache_dir elsewhere is reused when it matches and verifies.
        return cache_stage(cfg, _frozen_teacher(run), make_extract(
            cfg.loss.at_p, cfg.loss.attention_transfer), train_set)
    return run_stage


def _student_stage(loss: Callable[[Config], Callable], with_teacher: bool, validate: bool,
                   init: str | None = None, factor: int = 1,
                   unlabelled: bool = False) -> Callable[[Run, Path], dict]:
    def run_stage(run: Run, stage_dir: Path) -> dict:
        cfg = cache_config_for(longer_training_config(run.cfg, factor), unlabelled)
        extract = make_extract(cfg.loss.at_p, cfg.loss.attention_transfer)
        factory = ((lambda: teacher_source(cfg, _frozen_teacher(run), extract))
                   if with_teacher else None)
        return train_stage(cfg, stage_dir, cfg.model.student, loss(cfg),
                           _training_views(run, unlabelled),
                           _views(run, "val") if validate else None, teacher=factory,
                           init=run.results[init]["weights"] if init else None)
    return run_stage


TRAINED = {"Teacher": "teacher", "Student": "student", "KD-Student": "student_kd"}
UNLABELLED_ROW = "KD-Student+U"  # the KD student that also learnt from target-free volumes


def trained_rows(cfg: Config) -> dict[str, str]:
    """Report row -> the stage whose network it evaluates."""
    if not cfg.data.unlabelled_split:
        return TRAINED
    return {**TRAINED, UNLABELLED_ROW: "student_kd" + UNLABELLED}


def _networks(run: Run) -> dict[str, nn.Module]:
    return {row: load_network(run.cfg, run.results[stage]["arch"],
                              run.path(run.results[stage]["weights"]))
            for row, stage in trained_rows(run.cfg).items()}


def evaluate_stage(split: str, views: Callable[[Run, str], Any],
                   networks: Callable[[Run], dict[str, nn.Module]],
                   images: Callable[[dict, nn.Module | None], tuple] = metric_images
                   ) -> Callable[[Run, Path], dict]:
    """The stage that scores ZF and ``networks(run)`` on ``split`` per volume
    (:func:`evaluate_models`) and keeps the values in ``per_volume.json``."""
    def run_stage(run: Run, stage_dir: Path) -> dict:
        per_volume = evaluate_models(run.cfg, views(run, split), networks(run), images)
        if rank() == 0:
            write_atomic(stage_dir / "per_volume.json", json.dumps(per_volume, indent=1))
        return {"per_volume": per_volume}
    return run_stage


def report_stage(views: Callable[[Run, str], Any], networks: Callable[[Run], dict],
                 steps: Callable[[Run], dict], call: Callable[[nn.Module, dict], Any],
                 images: Callable[[dict, nn.Module | None], tuple] = metric_images,
                 describe: Callable[[Config, dict, int], dict] = describe_kdmri
                 ) -> Callable[[Run, Path], dict]:
    """The report stage of the four-row image recipes: the panel of the central slice of the
    first test volume (``images``), teacher and student latency on it (``call(network,
    batch)``), parameter counts and the evaluation, written by :func:`write_recon_report`."""
    def run_stage(run: Run, stage_dir: Path) -> dict:
        if rank() != 0:
            return {}
        test, nets = views(run, "test"), networks(run)
        one = default_collate([test.get_view(panel_index(test), 0)])
        panel = save_recon_panel(panel_images(one, nets, images), run.run_dir / "panel.png")
        latency = network_latency({"Teacher": nets["Teacher"], "Student": nets["Student"]}, one,
                                  call, run.cfg.eval.latency_repeats)
        params = {row: count_parameters(net) for row, net in nets.items()}
        return write_recon_report(run.cfg, run.run_dir, run.results["evaluate"]["per_volume"],
                                  latency, params, steps(run), panel, describe)
    return run_stage


def _steps(run: Run) -> dict[str, int]:
    return {"student_at": 0,  # none without attention transfer
            **{name: run.results[name]["steps"] for name in training_stages(run.cfg)}}


def configured(cfg: Config, *keys: str) -> tuple[str, ...]:
    """Those of ``keys`` set away from their defaults. A stage digest covers them once set, so
    the digests of runs that leave them alone (every run before they existed) do not change."""
    default = Config()
    return tuple(k for k in keys if key_value(cfg, k) != key_value(default, k))


def training_stages(cfg: Config) -> tuple[str, ...]:
    names = ["teacher", "student"]
    for suffix in ("", *((UNLABELLED,) if cfg.data.unlabelled_split else ())):
        names += [*(("student_at" + suffix,) if cfg.loss.attention_transfer else ()),
                  "student_kd" + suffix]
    return tuple(names)


def kd_stages(cfg: Config, unlabelled: bool, cache_keys: tuple, kd_keys: tuple
              ) -> tuple[list[Stage], list[Stage]]:
    """(the teacher cache stage (precompute), attention transfer and imitation: KD-MRI's steps 2
    and 3), on the labelled training views or on them with target-free extras."""
    suffix = UNLABELLED if unlabelled else ""
    cache = ("teacher_cache" + suffix,) if cfg.teacher.mode == "precompute" else ()
    # loss.attention_transfer: false drops student_at (a teacher that is only run).
    at = ("student_at" + suffix,) if cfg.loss.attention_transfer else ()
    return [Stage(name, _fill_cache(unlabelled), keys=cache_keys, consumes=("data", "teacher"))
            for name in cache], [
        *(Stage(name, _student_stage(make_at_loss, True, False, unlabelled=unlabelled),
                keys=(*kd_keys, "loss.at_mode", *configured(cfg, "model.student_layers")),
                consumes=("data", "teacher", *cache)) for name in at),
        Stage("student_kd" + suffix, _student_stage(make_kd_loss, True, True,
                                                    init=at[0] if at else None,
                                                    unlabelled=unlabelled),
              keys=(*kd_keys, "loss.alpha"), consumes=("data", "teacher", *cache, *at)),
    ]


def stages(cfg: Config) -> list[Stage]:
    teacher_keys = configured(cfg, "model.teacher_kwargs")
    loaded_keys = configured(cfg, "model.checkpoint_strict", "model.checkpoint_prefix")
    teacher_taps = configured(cfg, "model.teacher_kwargs", "model.teacher_layers")
    student_keys = ("model.student", *configured(cfg, "model.student_kwargs"), *TRAIN_KEYS)
    at_keys = configured(cfg, "loss.attention_transfer")
    kd_keys = (*student_keys, "loss.at_p", "teacher", *teacher_taps, *at_keys)
    cache_keys = ("loss.at_p", "teacher", *teacher_taps, *at_keys)
    trained = ("data", *trained_rows(cfg).values())
    cache, kd = kd_stages(cfg, False, cache_keys, kd_keys)
    extra_cache, extra_kd = (kd_stages(cfg, True, cache_keys, kd_keys)
                             if cfg.data.unlabelled_split else ([], []))
    teacher = teacher_stage(_train_teacher, ("model.teacher", *teacher_keys), cfg, _load_teacher)
    if cfg.model.teacher_checkpoint:  # how the file is read and the network it fills
        teacher = dataclasses.replace(teacher, keys=(*teacher.keys, *teacher_keys, *loaded_keys))
    return [
        Stage("data", _data, keys=("recipe", "data", "mask", "degrade", "default_data")),
        teacher,
        *cache,
        # train.equal_budget: the no-KD student gets the steps of attention transfer + imitation.
        Stage("student", _student_stage(lambda c: l1_loss_fn, False, True,
                                        factor=2 if cfg.train.equal_budget
                                        and cfg.loss.attention_transfer else 1),
              keys=(*student_keys, "train.equal_budget", *at_keys), consumes=("data",)),
        *kd,
        *extra_cache,
        *extra_kd,
        Stage("evaluate", evaluate_stage("test", _views, _networks), keys=("eval.batch_size",),
              consumes=trained,
              use="test"),
        Stage("report", report_stage(_views, _networks, _steps, forward), keys=("eval", "loss"),
              consumes=("evaluate", *training_stages(cfg)), use="test"),
        Stage("evaluate_val", evaluate_stage("val", _views, _networks),
              keys=("eval.batch_size",), consumes=trained,
              use="validation"),
    ]


def summary(run: Run) -> str:
    return f"{run.results['report']['text']}\n\nreport: {run.run_dir / 'report.md'}"


def trial_result(run: Run) -> dict:
    """A sweep trial: per-volume validation metrics of the KD student, teacher and student."""
    per_volume = run.results["evaluate_val"]["per_volume"]
    volumes = sorted(per_volume["KD-Student"])
    rows = {"student": "KD-Student", "teacher": "Teacher", "no_kd": "Student"}
    return {"volumes": volumes, "metrics": list(TABLE_METRICS),
            "per_volume": {key: {m: [per_volume[row][v][m] for v in volumes]
                                 for m in TABLE_METRICS} for key, row in rows.items()}}


RECIPE = Recipe("reconstruction", stages, check_config, summary, trial_result,
                teacher_cache_parts)
