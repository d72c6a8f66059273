"""Multi-coil E2E-VarNet: a VarNet teacher distilled into a VarNet with fewer cascades and channels.

Run::

    python -m kdhpc.distill configs/varnet_default.yaml          # CPU default, prints the table
    python -m kdhpc.distill configs/varnet_fastmri_brain.yaml data.root=... mask.acceleration=8
    python -m kdhpc.teacher.ship configs/teachers/varnet_default.yaml   # the shipped teacher

Stages (run by :func:`kdhpc.recipe.execute`, each resumable and digest-keyed)::

    data -> teacher -> teacher_cache -> student -> student_kd -> evaluate -> report
                                                               (sweeps: evaluate_val)

- data: multi-coil fastMRI files read as measured (:mod:`kdhpc.data.multicoil`: the file's
  k-space and ``reconstruction_rss``, its own mask or fastMRI's random / equispaced mask seeded
  per file), scaled by each volume's target maximum.
- ``teacher``: ``model.teacher`` trained on the data term, or ``model.teacher_checkpoint``
  loaded (``pretrained:varnet_default``). ``teacher_cache``: per training view the teacher's RSS
  output, the RSS image of each teacher cascade paired with a student cascade (student cascade
  i <-> teacher cascade ``round((i + 1) T / S) - 1``) and the raw attention map
  ``sum_c |A_c|^p`` of that cascade's U-Net bottleneck (:func:`kdhpc.teacher.fill_cache`,
  ``teacher.cache_dtype``); ``teacher.mode: stream`` runs the teacher on each batch instead.
- ``student``: ``model.student`` on the data term ``l1_weight L1 + ssim_weight (1 - SSIM)``
  (fastMRI trains VarNet on SSIM); ``student_kd``: the same steps and seed on
  ``(1 - alpha) data + alpha L1(S, T) + cascade_weight mean_i L1(S_i, T_j(i)) + at_weight AT``
  (:func:`kdhpc.losses.enhancement_loss` for the first two terms, ``kdhpc.ops.attention_map_loss``
  in ``loss.at_mode`` for the last).
- ``evaluate`` (test split, view 0) and ``report``: per-volume NMSE / PSNR / SSIM (and HFEN) of
  the RSS image against ``reconstruction_rss`` over the centre crop with data range = the volume's
  target maximum (fastMRI's evaluation), for the zero-filled RSS, teacher, student and KD student;
  paired t-tests, the share of the teacher-student gap KD closes, parameters, latency, a panel.

Model selection on the validation split only (``train.best_metric``); the test split is read by
``evaluate`` alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdhpc.config import Config, ConfigError
from kdhpc.data.default import dataset_root
from kdhpc.data.fastmri import FastMRISliceDataset
from kdhpc.data.multicoil import MASK_KINDS, MultiCoilViews, describe
from kdhpc.data.views import center_crop
from kdhpc.losses import enhancement_loss
from kdhpc.metrics import reconstruction_slice_sums, volume_metrics_from_sums
from kdhpc.models import VarNet, build_model
from kdhpc.models.external import ModelSpecError, load_state_dict_file, role_of
from kdhpc.models.varnet import coil_images, root_sum_of_squares
from kdhpc.ops import attention_map, attention_map_loss
from kdhpc.recipe import (TRAIN_KEYS, Recipe, Run, Stage, cache_stage, data_root,
                          expect_dataset, load_teacher, split_folder,
                          teacher_stage, teacher_training_config, teacher_weights,
                          train_network)
# The report's table, tests, panel, printed summary and sweep-trial result are the
# reconstruction recipe's: the same four rows (ZF, Teacher, Student, KD-Student) and metrics.
from kdhpc.recipes.reconstruction import evaluate_stage, report_stage, summary, trial_result
from kdhpc.teacher import teacher_source
from kdhpc.train import load_weights

DATA_TERMS = ("loss.l1_weight", "loss.ssim_weight")
TRAINED = {"Teacher": "teacher", "Student": "student", "KD-Student": "student_kd"}


# ---------------------------------------------------------------------------------------------
# config, data, networks

def build_network(cfg: Config, role: str) -> VarNet:
    """``model.<role>`` (a registry VarNet) with ``model.<role>_kwargs``."""
    name = getattr(cfg.model, role)
    try:
        model = build_model(name, **getattr(cfg.model, f"{role}_kwargs"))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.{role}: {err}") from None
    if not isinstance(model, VarNet):
        raise ConfigError(f"model.{role}: expected a VarNet (varnet_teacher, varnet_student, "
                          f"varnet_e2e, ...) for recipe 'varnet', found {name!r}")
    return model


def paired_cascades(teacher: VarNet, student: VarNet) -> list[int]:
    """The teacher cascade each student cascade is matched to: ``round((i + 1) T / S) - 1``."""
    t, s = teacher.num_cascades, student.num_cascades
    return [round((i + 1) * t / s) - 1 for i in range(s)]


def check_config(cfg: Config) -> None:
    """Refuse a config this recipe cannot run, naming the key, what it expects and found."""
    expect_dataset(cfg, ("default_brain", "fastmri"))
    checks = (("data.challenge", cfg.data.challenge, ("multicoil",)),
              ("mask.kind", cfg.mask.kind, MASK_KINDS), ("mask.layout", cfg.mask.layout,
                                                         ("centered",)),
              ("data.patch_size", cfg.data.patch_size, (0,)))
    for key, value, allowed in checks:
        if value not in allowed:
            raise ConfigError(f"{key}: expected {' or '.join(map(repr, allowed))} for recipe "
                              f"'varnet', found {value!r}")
    teacher, student = build_network(cfg, "teacher"), build_network(cfg, "student")
    if student.num_cascades > teacher.num_cascades:
        raise ConfigError(f"model.student: expected at most the teacher's {teacher.num_cascades} "
                          f"cascades, found {student.num_cascades}")
    if cfg.loss.at_weight and student.pools != teacher.pools:
        raise ConfigError(f"model.student_kwargs.pools: expected the teacher's {teacher.pools} "
                          f"(attention maps of the bottlenecks are compared pixel by pixel), "
                          f"found {student.pools}")


def view_dataset(cfg: Config, split: str) -> MultiCoilViews:
    folder = split_folder(cfg, dataset_root(cfg), split)
    slices = FastMRISliceDataset(folder, "multicoil", slice_fraction=cfg.data.slice_fraction,
                                 max_volumes=cfg.data.max_volumes)
    return MultiCoilViews(slices, cfg.mask, num_views=cfg.degrade.views_per_sample,
                          crop=cfg.data.crop)


def crop_to(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``image`` centre-cropped to the target's size (fastMRI crops the RSS output)."""
    return center_crop(image, target.shape[-2:])


def zero_filled(batch: dict) -> torch.Tensor:
    """The ZF row: RSS of the zero-filled coil images, cropped."""
    return crop_to(root_sum_of_squares(coil_images(batch["kspace"])), batch["target"])


# ---------------------------------------------------------------------------------------------
# teacher targets, losses, validation values

def make_extract(cfg: Config, pairs: list[int]) -> Callable[[nn.Module, dict], dict]:
    """Teacher targets: ``output`` (cropped RSS), ``cascade_<i>`` (cropped RSS of teacher cascade
    ``pairs[i]``) and ``attention_<i>`` (raw bottleneck attention map of that cascade)."""
    def extract(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        output, features = model(batch["kspace"], batch["mask"], return_features=True)
        depth = len(features) // 2
        targets = {"output": crop_to(output, batch["target"])}
        for i, t in enumerate(pairs):
            targets[f"cascade_{i}"] = crop_to(root_sum_of_squares(features[depth + t]),
                                              batch["target"])
            targets[f"attention_{i}"] = attention_map(features[t], cfg.loss.at_p,
                                                      normalize=False)
        return targets
    return extract


def make_loss(cfg: Config, kd: bool) -> Callable:
    """The data term alone (``kd=False`` and in evaluation), or the whole KD loss (docstring)."""
    loss = cfg.loss

    def loss_fn(model: nn.Module, batch: dict, targets: dict | None) -> dict:
        output, features = model(batch["kspace"], batch["mask"], return_features=True)
        target = batch["target"]
        teacher = targets["output"] if kd and targets is not None else None
        terms = enhancement_loss(crop_to(output, target), target, teacher, loss.alpha,
                                 loss.l1_weight, loss.ssim_weight, data_range=1.0)
        if teacher is None:
            return terms
        depth = len(features) // 2
        if loss.cascade_weight:
            terms["cascade"] = torch.stack([
                F.l1_loss(crop_to(root_sum_of_squares(features[depth + i]), target),
                          targets[f"cascade_{i}"]) for i in range(depth)]).mean()
            terms["loss"] = terms["loss"] + loss.cascade_weight * terms["cascade"]
        if loss.at_weight:
            terms["at"] = attention_map_loss(features[:depth], [
                targets[f"attention_{i}"] for i in range(depth)], p=loss.at_p, mode=loss.at_mode)
            terms["loss"] = terms["loss"] + loss.at_weight * terms["at"]
        return terms
    return loss_fn


def eval_values(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Per-slice sums of the fastMRI metrics (data range 1) and the slice's L1."""
    pred = crop_to(model(batch["kspace"], batch["mask"]), batch["target"]).float()
    sums = reconstruction_slice_sums(batch["target"], pred, 1.0)
    sums["l1"] = (pred - batch["target"]).abs().flatten(1).mean(1).double().cpu()
    return sums


def volume_values(sums: dict[str, float]) -> dict[str, float]:
    return {**volume_metrics_from_sums(sums), "loss": sums["l1"] / sums["count"]}


# ---------------------------------------------------------------------------------------------
# stages

def _views(run: Run, split: str) -> MultiCoilViews:
    return run.memo(("views", split), lambda: view_dataset(
        run.cfg, getattr(run.cfg.data, f"{split}_split")))


def _data(run: Run, stage_dir: Path) -> dict:
    root = data_root(run.cfg)
    identity = root.name if not run.cfg.data.root else str(root.resolve())
    return {"dataset": identity,
            **{split: describe(_views(run, split)) for split in ("train", "val", "test")}}


def load_network(cfg: Config, arch: str, path: str | Path) -> VarNet:
    """``arch`` with the weights at ``path``: the teacher checkpoint in any layout
    ``kdhpc.models.external`` reads (Lightning / DDP too), a stage's plain state dict else."""
    role = role_of(cfg.model, arch)
    model = build_network(cfg, role)
    if role == "teacher" and cfg.model.teacher_checkpoint:
        try:
            load_state_dict_file(model, path, strict=cfg.model.checkpoint_strict,
                                 prefix=cfg.model.checkpoint_prefix)
        except ModelSpecError as err:
            raise ConfigError(f"model.teacher_checkpoint: {err}") from None
    else:
        model.load_state_dict(load_weights(path))
    return model.eval()


def _network(run: Run, stage: str) -> VarNet:
    result = run.results[stage]
    return load_network(run.cfg, result["arch"], run.path(result["weights"]))


def _pairs(cfg: Config) -> list[int]:
    return paired_cascades(build_network(cfg, "teacher"), build_network(cfg, "student"))


def _fit(role: str, kd: bool) -> Callable[[Run, Path], dict]:
    def run_stage(run: Run, stage_dir: Path) -> dict:
        cfg = teacher_training_config(run.cfg) if role == "teacher" else run.cfg
        teacher = ((lambda: teacher_source(cfg, _network(run, "teacher"),
                                           make_extract(cfg, _pairs(cfg)))) if kd else None)
        return train_network(cfg, stage_dir, getattr(cfg.model, role), make_loss(cfg, kd),
                             _views(run, "train"), _views(run, "val"),
                             build=lambda _: build_network(cfg, role), teacher=teacher,
                             eval_fn=eval_values, volume_metrics=volume_values)
    return run_stage


def _fill_cache(run: Run, stage_dir: Path) -> dict:
    return cache_stage(run.cfg, _network(run, "teacher"), make_extract(run.cfg, _pairs(run.cfg)),
                       _views(run, "train"))


def metric_images(batch: dict, model: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, prediction) of one batch: the cropped RSS output (``model`` None: zero-filled)."""
    pred = zero_filled(batch) if model is None else crop_to(
        model(batch["kspace"], batch["mask"]), batch["target"])
    return batch["target"], pred


def _networks(run: Run) -> dict[str, nn.Module]:
    return {row: _network(run, stage) for row, stage in TRAINED.items()}


def describe_varnet(cfg: Config, steps: dict[str, int], volumes: int) -> dict[str, str]:
    """The report's title, setup and protocol (no published reference at these sizes)."""
    return {
        "title": "E2E-VarNet distillation report", "published": "",
        "setup": f"E2E-VarNet, {cfg.mask.acceleration:g}x {cfg.mask.kind} mask (centre "
                 f"fraction {cfg.mask.center_fraction:g}), data {cfg.data.dataset} multi-coil "
                 f"({volumes} test volumes); teacher {cfg.model.teacher}, student "
                 f"{cfg.model.student}. Per-volume metrics of the RSS image against "
                 f"reconstruction_rss over the centre crop, data range = the volume's target "
                 f"maximum (fastMRI), mean +- std over volumes.",
        "protocol": f"Optimiser steps {steps}; KD loss alpha {cfg.loss.alpha:g}, cascade weight "
                    f"{cfg.loss.cascade_weight:g}, attention weight {cfg.loss.at_weight:g}."}


def _steps(run: Run) -> dict[str, int]:
    return {stage: run.results[stage]["steps"] for stage in TRAINED.values()}


def stages(cfg: Config) -> list[Stage]:
    cache = ("teacher_cache",) if cfg.teacher.mode == "precompute" else ()
    # Every key declared whatever its value (a new recipe has no earlier digests to keep), so
    # a sweep over any of them never mistakes a stage that reads it for a shared one.
    teacher_keys = ("model.teacher", "model.teacher_kwargs")
    student_keys = ("model.student", "model.student_kwargs")
    teacher = teacher_stage(_fit("teacher", False), (*teacher_keys, *DATA_TERMS), cfg,
                            load_teacher(load_network))
    if cfg.model.teacher_checkpoint:
        teacher = dataclasses.replace(teacher, keys=(*teacher_keys, "model.checkpoint_strict",
                                                     "model.checkpoint_prefix"))
    target_keys = ("loss.at_p", "teacher", *student_keys)  # the pairing depends on the student
    trained = ("data", *TRAINED.values())
    return [
        Stage("data", _data, keys=("recipe", "data", "mask", "degrade.views_per_sample",
                                   "default_data")),
        teacher,
        *([Stage("teacher_cache", _fill_cache, keys=target_keys, consumes=("data", "teacher"))]
          if cache else []),
        Stage("student", _fit("student", False), keys=(*student_keys, *TRAIN_KEYS, *DATA_TERMS),
              consumes=("data",)),
        Stage("student_kd", _fit("student", True),
              keys=(*student_keys, *TRAIN_KEYS, *DATA_TERMS, *target_keys, "loss.alpha",
                    "loss.at_mode", "loss.cascade_weight", "loss.at_weight"),
              consumes=("data", "teacher", *cache)),
        Stage("evaluate", evaluate_stage("test", _views, _networks, metric_images),
              keys=("eval.batch_size",), consumes=trained,
              use="test"),
        Stage("report", report_stage(_views, _networks, _steps,
                                     lambda net, batch: net(batch["kspace"], batch["mask"]),
                                     metric_images, describe_varnet),
              keys=("eval", "loss"), consumes=("evaluate", *trained),
              use="test"),
        Stage("evaluate_val", evaluate_stage("val", _views, _networks, metric_images),
              keys=("eval.batch_size",), consumes=trained,
              use="validation"),
    ]


def cache_parts(cfg: Config):
    """(teacher, extract, training views) for ``python -m kdhpc.teacher.cache``."""
    check_config(cfg)
    teacher = load_network(cfg, cfg.model.teacher, teacher_weights(cfg))
    return teacher, make_extract(cfg, _pairs(cfg)), view_dataset(cfg, cfg.data.train_split)


RECIPE = Recipe("varnet", stages, check_config, summary, trial_result, cache_parts)
