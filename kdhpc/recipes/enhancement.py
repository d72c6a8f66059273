"""Shou et al.'s MRI enhancement recipe: model-based and task-based knowledge distillation.

Run::

    python -m kdhpc.distill configs/enh_default.yaml            # CPU default (shipped teachers)
    python -m kdhpc.distill configs/enh_tiny.yaml run_dir=/tmp/enh   # seconds (tests)
    torchrun --nproc-per-node=2 -m kdhpc.distill configs/enh_default.yaml
    python -m kdhpc.teacher.cache configs/enh_default.yaml      # fill the SwinIR cache by itself

Stages (declared in :func:`stages`, run by :func:`kdhpc.recipe.execute`, each resumable)::

    data -> teacher (SwinIR on degrade.task) -> teacher_cache -> student_a<alpha> for each alpha
         -> expert_denoise, expert_superres (EDSR) -> expert_cache
         -> multitask_nokd, multitask_kd (multi-task EDSR) -> evaluate (test split) -> timing
         -> report

Model-based KD: one SwinIR teacher, ``model.teacher_checkpoint`` (the default names the shipped
``pretrained:enh_default``) or trained on ``degrade.task`` (denoise in the paper) for
``train.teacher_epochs_factor`` times the students' epochs, and one cache of its outputs on every
training view, shared by EDSR students at each alpha of ``loss.alpha_grid``; alpha 0 is the no-KD
student (trained on the input/reference pairs only); all students start from the same initial
weights. Task-based KD: an EDSR denoising (DNE) expert and an EDSR super-resolution (SRE) expert
(``model.experts`` may name trained ones, DNE first, as files or ``pretrained:<name>``; without
them the expert of ``degrade.task`` is the no-KD student itself, trained identically), one
cache of the *routed* experts (:class:`kdhpc.models.edsr.TaskExperts`: each view's task picks
its expert) over the mixed training set, and the multi-task sibling of
``model.student`` (``edsr_small`` -> ``edsr_multitask_small``: FiLM conditioning by a learned
per-task embedding, see :mod:`kdhpc.models.edsr`) trained on the mixed pairs without KD and with
KD at ``loss.alpha`` (the paper's multi-task figure uses 0.75).

Loss (:func:`kdhpc.losses.enhancement_loss`):
``alpha * L1(S, T) + (1 - alpha) * (l1_weight L1 + ssim_weight (1 - SSIM) + perceptual_weight P)``.
The perceptual term P compares frozen features of an MRI-trained network, nothing downloaded:
``loss.perceptual_checkpoint`` (a state dict of the ``model.teacher`` architecture) when given,
else the trained SwinIR teacher; its *early layers* (:class:`kdhpc.losses.EarlyLayers`: the
input conv and the first :data:`kdhpc.losses.PERCEPTUAL_DEPTH` Swin layer(s), or residual
block(s) for an EDSR) give the
features. Every EDSR (students, experts, multi-task) uses that same feature network, so their
data terms are identical; the SwinIR teacher itself is trained without P unless a checkpoint
is given (it cannot judge itself before it is trained), and the report says so.

Data (:class:`kdhpc.data.views.EnhancementViews`, a wrapper of
:class:`kdhpc.data.views.SliceViews` and its
conventions): fastMRI-layout volumes (the default brain set, or ``data.dataset: fastmri`` with
``data.root`` holding ``<challenge>_<split>/`` or ``<split>/`` folders); targets are the files'
reconstructions, centre-cropped to ``data.crop`` and divided by the volume maximum; a view
(:func:`kdhpc.data.degrade.make_view`) applies a dihedral transform and the task's degradation
to the k-space of the whole cropped slice (reduced-NSA noise: ``degrade.nsa_factor``,
``noise_sigma``, random levels from ``noise_jitter``; or phase-encode truncation: ``sr_scale``,
``sr_mode``) and the input is the magnitude image. Training cuts ``data.patch_size`` patches
*after* the degradation (k-space operations act on the whole field of view, as in a scanner);
the patch origin is drawn from a seed of (slice, view), so it is part of the view key and a
cached teacher output always matches the student's patch. ``patch_size: 0`` trains on whole
slices (square crops needed with dihedral views). Validation (model selection on ``val_loss``)
uses the same patches at view 0; the test split is evaluated on whole slices at view 0 (its
noise fixed per slice).

Evaluation (:func:`evaluate_models`): per test slice, PSNR and SSIM (fastMRI definitions,
data range = the volume's target maximum) and SNR in ROIs (:func:`kdhpc.metrics.snr_roi`):
mean over a tissue ROI / sample std over the background ROI of the same slice. ROIs come from
the ``tissue`` label map in the files (default data: 0 background, 1 CSF, 2 GM, 3 WM; a user's
fastMRI files may carry the same dataset): tissue ROIs GM and WM, background = label 0 farther
than :data:`kdhpc.metrics.ROI_MARGIN` pixels from the head. Without a label map, ROIs are
automatic (:func:`kdhpc.metrics.roi_labels`). Comparisons are paired over test volumes
(:func:`volume_values`: PSNR
of the whole volume, mean SSIM and mean SNR over its slices and ROIs), with the 95% CI of the
mean difference; "KD >= no-KD" is also tested one-sided; the p-values of the several alphas are
not corrected for multiple comparisons. A linear mixed model (SNR ~ model, random intercept per
(slice, ROI) unit; the paper's random-effects model) is added when statsmodels imports.
Timing: per-slice inference of SwinIR and EDSR on one whole test slice
(:func:`kdhpc.recipe.network_latency`: called in turn for ``eval.latency_repeats`` rounds, the
speed ratio from the minima, at one thread and all threads).

The multi-task student is derived from ``model.student`` (:func:`multitask_arch`), or named by
``model.multitask_student``.

Networks of your own (``model.teacher`` / ``model.student`` a factory ``package.module:callable``
with ``model.<role>_kwargs``; the teacher checkpoint a state dict in any layout
``kdhpc.models.external`` reads, or a TorchScript / torch.export file): this recipe calls every
network as ``model(input)`` with ``input`` the degraded magnitude image ``[B, 1, h, w]``
(normalised to the volume maximum; patches while training, whole slices at evaluation) and
expects ``[B, 1, h, w]``; a network whose ``forward`` has a parameter named ``task`` is called
``model(input, task)`` with each sample's task id (int64 ``[B]``, :data:`TASKS`). A user student
needs ``model.multitask_student`` (a multi-task network for task-based KD). The perceptual term
takes the early layers of a SwinIR or EDSR teacher, so a user teacher needs
``loss.perceptual_weight: 0`` (or ``loss.perceptual_checkpoint``: a state dict of a registry
``model.teacher``). :func:`check_models` runs the networks once on a probe batch before anything
is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from kdhpc.config import Config, ConfigError
from kdhpc.data.fastmri import FastMRISliceDataset
from kdhpc.data.views import TASKS, EnhancementViews, MultiTaskViews
from kdhpc.losses import EarlyLayers, PerceptualLoss, enhancement_loss
from kdhpc.metrics import (enhancement_slice_metrics, mixed_effects_table, paired_units,
                           volume_table)
from kdhpc.models import EDSR, MODEL_NAMES, SwinIR
from kdhpc.models.edsr import TaskExperts
from kdhpc.models.external import (build_run_network, check_distinct_roles, enhance,
                                   expect_output, is_factory_spec, probe,
                                   takes_task, teacher_program)
from kdhpc.recipe import (TRAIN_KEYS, Recipe, Run, Stage, cache_stage, data_root,
                          evaluate_volumes, expect_dataset, load_network, load_teacher,
                          network_latency,
                          read_predictions, save_gathered, split_folder, teacher_stage,
                          teacher_training_config, teacher_weights, train_network)
from kdhpc.report import (latency_table, mean_std, number, save_curves, save_panel, table,
                          with_ci, write_report)
from kdhpc.runtime import from_rank0, rank, world_size
from kdhpc.teacher import cache_config, teacher_source
from kdhpc.teacher.pretrained import resolve_teacher_checkpoint

TASK_LABELS = {"denoise": "DNE", "superres": "SRE"}

OUTPUT_KEY = "output"

ALPHA_COLUMNS = ("model", "alpha", "SNR (ROI)", "PSNR (vol)", "SSIM (vol)", "dSNR vs no-KD",
                 "p (KD > no-KD)", "dPSNR vs no-KD", "p (PSNR, 2-sided)",
                 "p (SNR vs teacher, 2-sided)")


# ---------------------------------------------------------------------------------------------
# configuration helpers

def model_task(cfg: Config) -> str:
    """The model-based KD task (``degrade.task``), checked."""
    if cfg.degrade.task not in TASKS:
        raise ConfigError(f"degrade.task: the enhancement recipe expected one of {TASKS} (the "
                          f"model-based KD task), found {cfg.degrade.task!r}")
    return cfg.degrade.task


def task_config(cfg: Config, task: str) -> Config:
    """``cfg`` with ``degrade.task`` set to ``task`` (every other degradation field kept)."""
    return dataclasses.replace(cfg, degrade=dataclasses.replace(cfg.degrade, task=task))


def multitask_arch(student: str, multitask: str = "") -> str:
    """The multi-task student: ``multitask`` (``model.multitask_student``) when given, else the
    multi-task EDSR matching ``model.student`` (``edsr_small`` -> ``edsr_multitask_small``)."""
    if multitask:
        return multitask
    name = student.replace("edsr_", "edsr_multitask_", 1) if student.startswith("edsr_") else ""
    if name not in MODEL_NAMES or "multitask" in student:
        single = [n for n in MODEL_NAMES if n.startswith("edsr_") and "multitask" not in n]
        raise ConfigError(f"model.student: the enhancement recipe expected a single-task EDSR "
                          f"with a multi-task sibling (one of {', '.join(single)}), found "
                          f"{student!r} (or name a multi-task network in "
                          f"model.multitask_student, called model(input, task))")
    return name


def alpha_grid(cfg: Config) -> tuple[float, ...]:
    """The alphas of the model-based students (``loss.alpha_grid``)."""
    grid = tuple(cfg.loss.alpha_grid)
    if 0.0 not in grid:
        raise ConfigError(f"loss.alpha_grid: expected a grid containing 0 (the no-KD student), "
                          f"found {list(grid)}")
    return grid


def alpha_name(alpha: float) -> str:
    return f"student_a{alpha:.2f}"


# ---------------------------------------------------------------------------------------------
# data

# ---------------------------------------------------------------------------------------------
# models, teachers, losses

def extract_output(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The teacher targets this recipe distils: the enhanced image ``[B, 1, h, w]``."""
    return {OUTPUT_KEY: enhance(model, batch)}


def perceptual_network(cfg: Config, teacher: nn.Module | None) -> PerceptualLoss | None:
    """The frozen feature network of the perceptual term, or None when it has weight 0 or no
    network is available (the SwinIR teacher's own training without a checkpoint)."""
    if not cfg.loss.perceptual_weight:
        return None
    if cfg.loss.perceptual_checkpoint:
        source = load_network(cfg.model.teacher, cfg.loss.perceptual_checkpoint, cfg,
                              foreign=False)
    elif teacher is not None:
        source = teacher
    else:
        return None
    return PerceptualLoss(EarlyLayers(source))


def make_loss(cfg: Config, alpha: float, perceptual: PerceptualLoss | None) -> Callable:
    """The engine's ``loss_fn(model, batch, targets)`` for :func:`enhancement_loss`."""
    loss = cfg.loss

    def loss_fn(model, batch: dict, targets: dict | None) -> dict[str, torch.Tensor]:
        pred = enhance(model, batch).float()  # [B, 1, h, w]
        if perceptual is not None:
            first = next(perceptual.parameters())
            if first.device != pred.device:
                perceptual.to(pred.device)
        teacher = None if targets is None else targets[OUTPUT_KEY].float()
        return enhancement_loss(pred, batch["target"].float(), teacher, alpha,
                                l1_weight=loss.l1_weight, ssim_weight=loss.ssim_weight,
                                perceptual=perceptual,
                                perceptual_weight=loss.perceptual_weight if perceptual else 0.0,
                                data_range=batch["data_range"].float())

    return loss_fn


# ---------------------------------------------------------------------------------------------
# stages

class EnhancementData:
    """The run's datasets: the slices of each split, their views per task, the mixed views."""

    def __init__(self, cfg: Config, root: Path):
        self.cfg, self.root = cfg, root
        self.task = model_task(cfg)
        self._slices: dict[str, FastMRISliceDataset] = {}

    def slices(self, split: str) -> FastMRISliceDataset:
        if split not in self._slices:
            name = getattr(self.cfg.data, f"{split}_split")
            self._slices[split] = FastMRISliceDataset(
                split_folder(self.cfg, self.root, name), challenge=self.cfg.data.challenge,
                slice_fraction=self.cfg.data.slice_fraction, max_volumes=self.cfg.data.max_volumes)
        return self._slices[split]

    def views(self, split: str, task: str, whole: bool = False) -> EnhancementViews:
        """Views of ``split`` for ``task``: training and validation patches unless ``whole``
        (the test split and sweep evaluations use whole slices)."""
        patch = self.cfg.data.patch_size if split in ("train", "val") and not whole else 0
        return EnhancementViews(self.slices(split), self.cfg, task, patch)

    def mixed(self, split: str) -> MultiTaskViews:
        return MultiTaskViews([self.views(split, t) for t in TASKS])


def expert_weights(cfg: Config, task: str) -> str:
    """The weights file of ``task``'s expert in ``model.experts``: a path, or
    ``pretrained:<name>`` for an expert shipped with kdhpc, checked like a shipped teacher (file
    hash, and data trained on: this run's data with ``degrade.task`` = the expert's task)."""
    spec = cfg.model.experts[TASKS.index(task)]
    if not spec.startswith("pretrained:"):
        return spec
    as_teacher = task_config(cfg, task)
    as_teacher = dataclasses.replace(as_teacher, model=dataclasses.replace(
        cfg.model, teacher=cfg.model.student, teacher_checkpoint=spec))
    return str(resolve_teacher_checkpoint(as_teacher)[0])


def teacher_cache_parts(cfg: Config):
    """(SwinIR teacher, extract, training views of ``degrade.task``) for
    ``python -m kdhpc.teacher.cache``."""
    from kdhpc.data.default import dataset_root

    teacher = load_network(cfg.model.teacher, teacher_weights(cfg), cfg)
    return teacher, extract_output, EnhancementData(cfg, dataset_root(cfg)).views(
        "train", model_task(cfg))


# ---------------------------------------------------------------------------------------------
# evaluation

def image_units(batch: dict, images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, h, w]`` normalised images of a batch as ``[B, h, w]`` float64 in image units."""
    return images[:, 0].double() * batch["scale"].double()[:, None, None]


def evaluate_models(views: EnhancementViews, models: dict[str, nn.Module | None],
                    batch_size: int, predictions: Path) -> list[dict]:
    """Per-slice rows of ``models`` (None = the degraded input itself) on ``views`` at view 0
    (:func:`kdhpc.recipe.evaluate_volumes`): PSNR, SSIM and SNR per ROI
    (:func:`kdhpc.metrics.enhancement_slice_metrics`, data range = the volume's maximum) in image
    units; predictions, targets and ROI maps kept in ``predictions``. This rank's rows."""
    for model in models.values():
        if model is not None:
            model.eval()

    def predict(model: nn.Module | None, batch: dict) -> torch.Tensor:
        return image_units(batch, batch["input"] if model is None else enhance(model, batch))

    def score(volume: str, items: list[int], batch: dict, outputs: dict) -> list[dict]:
        target, rois = image_units(batch, batch["target"]).numpy(), batch["roi"].numpy()
        peak = float(batch["volume_max"][0])  # fastMRI's data range: the file's maximum
        return [{"task": views.task, "model": name, "index": index, "volume": volume,
                 "slice": views.sample_name(index), "volume_max": peak,
                 **enhancement_slice_metrics(target[j], pred.numpy()[j], rois[j], peak)}
                for name, pred in outputs.items() for j, index in enumerate(items)]

    return evaluate_volumes(views, models, batch_size, predict, score,
                            volume_name=views.volume_name, predictions=predictions,
                            keep=lambda batch: {"target": image_units(batch, batch["target"]),
                                                "roi": batch["roi"]})


# ---------------------------------------------------------------------------------------------
# statistics for the report

def snr_units(rows: list[dict], task: str, model: str) -> dict[tuple, float]:
    """``{(slice, ROI name): SNR}`` of one model: the units of the paired SNR tests."""
    out = {}
    for row in rows:
        if row["task"] == task and row["model"] == model:
            for key, value in row.items():
                if key.startswith("snr_"):
                    out[(row["slice"], key[4:])] = value
    return out


def volume_values(rows: list[dict], task: str, model: str, metric: str) -> dict[str, float]:
    """``{volume: value}`` of one model, the units of every paired test: PSNR of the whole
    volume and mean SSIM over its slices (:func:`volume_table`), or the mean SNR over the
    volume's (slice, ROI) units (slices of one volume are not independent samples)."""
    mine = [r for r in rows if r["task"] == task and r["model"] == model]
    if metric != "snr":
        return {v["volume"]: v[metric] for v in volume_table(mine)}
    units: dict[str, list[float]] = {}
    for row in mine:
        units.setdefault(row["volume"], []).extend(
            value for key, value in row.items() if key.startswith("snr_"))
    return {volume: float(np.mean(values)) for volume, values in units.items() if values}


# ---------------------------------------------------------------------------------------------
# timing

# ---------------------------------------------------------------------------------------------
# the recipe as data

def _data(run: Run, stage_dir: Path) -> dict:
    root = data_root(run.cfg)
    recipe = EnhancementData(run.cfg, root)
    return {"root": str(root), **{f"{s}_slices": len(recipe.slices(s))
                                  for s in ("train", "val", "test")}}


def _recipe(run: Run) -> "EnhancementData":
    return run.memo("recipe", lambda: EnhancementData(run.cfg, Path(run.results["data"]["root"])))


def _perceptual(run: Run) -> PerceptualLoss | None:
    return run.memo("perceptual", lambda: perceptual_network(run.cfg, run.network("teacher")))


def _train(run: Run, stage_dir: Path, arch: str, train_set, val_set, alpha: float,
           perceptual: PerceptualLoss | None, teacher=None, cfg: Config | None = None) -> dict:
    cfg = cfg or run.cfg
    return train_network(cfg, stage_dir, arch, make_loss(cfg, alpha, perceptual), train_set,
                         val_set, teacher=None if teacher is None else lambda: teacher)


def _train_teacher(run: Run, stage_dir: Path) -> dict:
    """The SwinIR teacher on ``degrade.task``, without the perceptual term unless
    ``loss.perceptual_checkpoint`` gives its feature network (it cannot judge itself before it
    is trained)."""
    recipe, perceptual = _recipe(run), perceptual_network(run.cfg, None)
    result = _train(run, stage_dir, run.cfg.model.teacher, recipe.views("train", recipe.task),
                    recipe.views("val", recipe.task), 0.0, perceptual,
                    cfg=teacher_training_config(run.cfg))
    return {**result, "perceptual": perceptual is not None}


def _fill_cache(run: Run, stage_dir: Path) -> dict:
    recipe = _recipe(run)
    return cache_stage(run.cfg, run.network("teacher"), extract_output,
                       recipe.views("train", recipe.task))


def _model_student(alpha: Callable[[Config], float]) -> Callable[[Run, Path], dict]:
    """A model-based EDSR student at ``alpha(cfg)`` (0: no KD) on ``degrade.task``."""
    def run_stage(run: Run, stage_dir: Path) -> dict:
        recipe, a = _recipe(run), alpha(run.cfg)
        source = None if a == 0 else teacher_source(run.cfg, run.network("teacher"),
                                                    extract_output)
        return _train(run, stage_dir, run.cfg.model.student, recipe.views("train", recipe.task),
                      recipe.views("val", recipe.task), a, _perceptual(run), source)
    return run_stage


def _expert(task: str) -> Callable[[Run, Path], dict]:
    def run_stage(run: Run, stage_dir: Path) -> dict:
        cfg = run.cfg
        if cfg.model.experts:  # given: checked by loading
            weights = expert_weights(cfg, task)
            load_network(cfg.model.student, weights, cfg)
            return {"arch": cfg.model.student, "weights": weights, "trained": False}
        if task == model_task(cfg):
            # The expert of the model-based task is trained exactly like the no-KD student
            # (same arch, data, loss, seed): reuse it rather than train it twice.
            same = run.results[alpha_name(0.0)]
            return {**{k: v for k, v in same.items() if k != "digest"},
                    "same_as": alpha_name(0.0)}
        recipe = _recipe(run)
        return _train(run, stage_dir, cfg.model.student, recipe.views("train", task),
                      recipe.views("val", task), 0.0, _perceptual(run))
    return run_stage


def _experts(run: Run) -> TaskExperts:
    return run.memo("experts", lambda: TaskExperts([run.network(f"expert_{t}") for t in TASKS]))


def _expert_cache(run: Run) -> dict:
    """Where the routed experts' cache lives (the stage folder) and what it was filled for."""
    return {"cache_dir": run.run_dir / "expert_cache", "data_config": {
        **cache_config(run.cfg), "teacher": "task_experts", "tasks": list(TASKS)}}


def _fill_expert_cache(run: Run, stage_dir: Path) -> dict:
    return cache_stage(run.cfg, _experts(run), extract_output, _recipe(run).mixed("train"),
                       **_expert_cache(run))


def _multitask(kd: bool) -> Callable[[Run, Path], dict]:
    def run_stage(run: Run, stage_dir: Path) -> dict:
        cfg, recipe = run.cfg, _recipe(run)
        source = teacher_source(cfg, _experts(run), extract_output,
                                **_expert_cache(run)) if kd else None
        return _train(run, stage_dir, multitask_arch(cfg.model.student,
                                                     cfg.model.multitask_student),
                      recipe.mixed("train"), recipe.mixed("val"),
                      cfg.loss.alpha if kd else 0.0, _perceptual(run), source)
    return run_stage


def _evaluate(run: Run, stage_dir: Path) -> dict:
    recipe = _recipe(run)
    names = model_names(alpha_grid(run.cfg))
    nets = {"input": None, names["teacher"]: run.network("teacher"),
            **{names[a]: run.network(alpha_name(a)) for a in alpha_grid(run.cfg)}}
    rows = evaluate_models(recipe.views("test", recipe.task), nets, run.cfg.eval.batch_size,
                           stage_dir / f"model_based-rank{rank():05d}.h5")
    for t in TASKS:
        nets = {"input": None, f"EDSR {TASK_LABELS[t]} expert": _experts(run).experts[
            TASKS.index(t)], "multi-task EDSR no KD": run.network("multitask_nokd"),
                "multi-task EDSR KD": run.network("multitask_kd")}
        rows += evaluate_models(recipe.views("test", t), nets, run.cfg.eval.batch_size,
                                stage_dir / f"task_based_{t}-rank{rank():05d}.h5")
    return _save_rows(rows, stage_dir)


def _save_rows(rows: list[dict], stage_dir: Path) -> dict:
    count = save_gathered(rows, stage_dir / "slices.json")
    return {"slices": str(stage_dir / "slices.json"), "rows": count, "world_size": world_size()}


SWEEP_MODELS = {"teacher": "teacher", "no_kd": alpha_name(0.0), "student": "student_kd"}


def _evaluate_val(run: Run, stage_dir: Path) -> dict:
    recipe = _recipe(run)
    nets = {key: run.network(stage) for key, stage in SWEEP_MODELS.items()}
    rows = evaluate_models(recipe.views("val", recipe.task, whole=True), nets,
                           run.cfg.eval.batch_size, stage_dir / f"val-rank{rank():05d}.h5")
    return _save_rows(rows, stage_dir)


def _timing(run: Run, stage_dir: Path) -> dict:
    def measure() -> dict:
        recipe = _recipe(run)
        one = default_collate([recipe.views("test", recipe.task).get_view(0, 0)])
        return {"rows": network_latency({"SwinIR": run.network("teacher"),
                                         "EDSR": run.network(alpha_name(0.0))}, one, enhance,
                                        run.cfg.eval.latency_repeats)}
    return from_rank0(measure)


def _report(run: Run, stage_dir: Path) -> dict:
    grid = alpha_grid(run.cfg)
    results = {"teacher": run.results["teacher"],
               "students": {a: run.results[alpha_name(a)] for a in grid},
               "experts": {t: run.results[f"expert_{t}"] for t in TASKS},
               "multitask": {k: run.results[f"multitask_{k}"] for k in ("nokd", "kd")},
               "cache": run.results["teacher_cache"], "data": run.results["data"]}
    return from_rank0(lambda: write_enhancement_report(
        run.cfg, run.run_dir, json.loads(Path(run.results["evaluate"]["slices"]).read_text()),
        run.results["timing"], grid, results, run.run_dir / "evaluate"))


def check_config(cfg: Config) -> None:
    """Refuse what this recipe cannot run, before anything is written."""
    expect_dataset(cfg, ("default_brain", "fastmri"))
    model_task(cfg)
    alpha_grid(cfg)
    if cfg.model.experts and len(cfg.model.experts) != len(TASKS):
        raise ConfigError(f"model.experts: expected {len(TASKS)} checkpoints "
                          f"({', '.join(TASKS)}), found {cfg.model.experts}")
    check_models(cfg)


PROBE_SIZE = 16  # side of the synthetic batch check_models runs user networks on


def check_models(cfg: Config) -> None:
    """Teacher, student and multi-task student build; a user-defined network (or a program
    teacher) takes this recipe's call on a probe batch and returns the input's shape; the
    perceptual term has a feature network (module docstring)."""
    model = cfg.model
    check_distinct_roles(model)
    program = teacher_program(model)
    multitask = multitask_arch(model.student, model.multitask_student)
    nets = {"model.teacher": (load_network(model.teacher, program, cfg) if program is not None
                              else build_run_network(model, model.teacher)),
            "model.student": build_run_network(model, model.student),
            "model.multitask_student": build_run_network(model, multitask)}
    teacher = nets["model.teacher"]
    if (cfg.loss.perceptual_weight and not cfg.loss.perceptual_checkpoint
            and not isinstance(teacher, (SwinIR, EDSR))):
        raise ConfigError(f"loss.perceptual_weight: the perceptual term's features are the early "
                          f"layers of a SwinIR or EDSR teacher, found "
                          f"{str(program or model.teacher)!r} ({type(teacher).__name__}); set "
                          f"loss.perceptual_weight: 0")
    if program is None and not any(is_factory_spec(s) for s in (model.teacher, model.student,
                                                                 multitask)):
        return  # the registry networks' calls are tested with the package
    # Patches while training, whole slices at evaluation: a network must take any size (a
    # torch.export program needs dynamic height and width).
    size = min(PROBE_SIZE, *cfg.data.crop)
    batch = {"input": torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0)),
             "task": torch.tensor([0, len(TASKS) - 1])}
    for key, net in nets.items():
        name = str(program) if key == "model.teacher" and program is not None else (
            multitask if key == "model.multitask_student" else getattr(model, key[6:]))
        call = ("model(input, task)" if takes_task(net) else "model(input)") + \
            " with input [B, 1, h, w]"
        out = probe(key, name, lambda: enhance(net.eval(), batch), call)
        expect_output(key, name, out, batch["input"].shape, call, "the input's shape")
    if not takes_task(nets["model.multitask_student"]):
        raise ConfigError(f"model.multitask_student: expected a multi-task network whose forward "
                          f"takes a 'task' argument, found {multitask!r}")


def stages(cfg: Config) -> list[Stage]:
    # mask.seed is the base of every view's seeds (noise, patch position).
    views = ("degrade", "mask.seed")
    data_loss = ("loss.l1_weight", "loss.ssim_weight", "loss.perceptual_weight",
                 "loss.perceptual_checkpoint")
    student = ("model.student", *TRAIN_KEYS, *views, *data_loss)
    # Every EDSR's perceptual term reads the teacher's early layers: they consume the teacher.
    kd_inputs = ("data", "teacher", "teacher_cache")
    grid = [Stage(alpha_name(a), _model_student(lambda c, a=a: a), keys=student,
                  consumes=kd_inputs if a else ("data", "teacher"),
                  extra=lambda c, a=a: {"alpha": a}, use="all" if a == 0 else "test")
            for a in alpha_grid(cfg)]
    experts = [Stage(f"expert_{t}", _expert(t), keys=(*student, "model.experts"),
                     consumes=("data", "teacher", alpha_name(0.0)), use="test") for t in TASKS]
    multitask = ("data", "teacher", *(f"expert_{t}" for t in TASKS))
    tested = ("data", "teacher", *(s.name for s in grid), *(s.name for s in experts),
              "multitask_nokd", "multitask_kd")
    return [
        Stage("data", _data, keys=("recipe", "data", "default_data")),
        teacher_stage(_train_teacher, ("model.teacher", *views, *data_loss), cfg,
                      load_teacher(lambda c, arch, path: load_network(arch, path, c))),
        Stage("teacher_cache", _fill_cache, keys=("teacher", *views),
              consumes=("data", "teacher")),
        *grid,
        Stage("student_kd", _model_student(lambda c: c.loss.alpha), keys=(*student, "loss.alpha"),
              consumes=kd_inputs, use="validation"),
        Stage("evaluate_val", _evaluate_val, keys=("eval.batch_size", *views),
              consumes=("data", "teacher", alpha_name(0.0), "student_kd"), use="validation"),
        *experts,
        Stage("expert_cache", _fill_expert_cache, keys=("teacher", *views), consumes=multitask,
              use="test"),
        Stage("multitask_nokd", _multitask(False), keys=student, consumes=multitask, use="test"),
        Stage("multitask_kd", _multitask(True), keys=(*student, "loss.alpha"),
              consumes=(*multitask, "expert_cache"), use="test"),
        Stage("evaluate", _evaluate, keys=("eval.batch_size", *views), consumes=tested,
              use="test"),
        Stage("timing", _timing, keys=("eval.latency_repeats",),
              consumes=("data", "teacher", alpha_name(0.0)), use="test"),
        Stage("report", _report, keys=("loss.alpha",), consumes=(*tested, "evaluate", "timing"),
              use="test"),
    ]


def summary(run: Run) -> str:
    return run.results["report"]["text"]


def trial_result(run: Run) -> dict:
    """A sweep trial: per-volume validation PSNR (whole-volume MSE), SSIM and SNR (mean over
    the volume's slice-ROI units) of the KD student, the teacher and the no-KD student."""
    rows = json.loads(Path(run.results["evaluate_val"]["slices"]).read_text())
    volumes = sorted({r["volume"] for r in rows})
    task = model_task(run.cfg)  # evaluate_val scores the model-based task's views
    per_volume = {key: {m: [volume_values(rows, task, key, m).get(v, math.nan) for v in volumes]
                        for m in ("psnr", "ssim", "snr")} for key in SWEEP_MODELS}
    return {"volumes": volumes, "metrics": ["psnr", "ssim", "snr"], "per_volume": per_volume}


def model_names(grid: Sequence[float]) -> dict:
    """Display names: ``"teacher"`` and each alpha -> the row name in the tables."""
    out: dict = {"teacher": "SwinIR teacher"}
    for alpha in grid:
        out[alpha] = "EDSR no KD (a=0)" if alpha == 0 else f"EDSR KD a={alpha:g}"
    return out


# ---------------------------------------------------------------------------------------------
# report

def write_enhancement_report(cfg: Config, run_dir: Path, rows: list[dict], timing: dict,
                             grid: Sequence[float], results: dict,
                             evaluate_dir: Path) -> dict:
    """report.md, metrics.json, alpha_curve.png and example panels in ``run_dir``; returns the
    summary (alpha table, task table, timing)."""
    task = model_task(cfg)
    names = model_names(grid)
    volumes = volume_table(rows)
    nokd = names[0.0]
    nokd_snr = volume_values(rows, task, nokd, "snr")
    teacher_snr = volume_values(rows, task, names["teacher"], "snr")

    def summary_row(t: str, model: str) -> dict:
        snr = list(volume_values(rows, t, model, "snr").values())
        vol = [v for v in volumes if v["task"] == t and v["model"] == model]
        return {"snr": float(np.mean(snr)) if snr else math.nan, "snr_n": len(snr),
                "snr_std": float(np.std(snr, ddof=1)) if len(snr) > 1 else math.nan,
                "snr_text": mean_std(snr, ".2f"),
                "psnr_text": mean_std([v["psnr"] for v in vol], ".2f"),
                "ssim_text": mean_std([v["ssim"] for v in vol], ".4f"),
                "psnr": float(np.mean([v["psnr"] for v in vol])),
                "ssim": float(np.mean([v["ssim"] for v in vol]))}

    alpha_rows, alpha_summary = [], []
    for key in ["input", "teacher", *grid]:
        model = "input" if key == "input" else names[key]
        s = summary_row(task, model)
        row = {"model": model, "alpha": "" if key in ("input", "teacher") else f"{key:g}",
               "SNR (ROI)": s["snr_text"], "PSNR (vol)": s["psnr_text"],
               "SSIM (vol)": s["ssim_text"]}
        entry = {"model": model, "alpha": key if isinstance(key, float) else None, **s}
        if isinstance(key, float) and key > 0:
            vs = paired_units(volume_values(rows, task, model, "snr"), nokd_snr)
            vs_psnr = paired_units(volume_values(rows, task, model, "psnr"),
                             volume_values(rows, task, nokd, "psnr"))
            vs_teacher = paired_units(volume_values(rows, task, model, "snr"), teacher_snr)
            row.update({"dSNR vs no-KD": with_ci(vs, "+.3f"),
                        "p (KD > no-KD)": number(vs["p_greater"]),
                        "dPSNR vs no-KD": with_ci(vs_psnr, "+.3f"),
                        "p (PSNR, 2-sided)": number(vs_psnr["p_value"]),
                        "p (SNR vs teacher, 2-sided)": number(vs_teacher["p_value"])})
            entry.update({"vs_nokd_snr": vs, "vs_nokd_psnr": vs_psnr, "vs_teacher_snr": vs_teacher})
        elif key == 0.0:
            vs_teacher = paired_units(nokd_snr, teacher_snr)
            row["p (SNR vs teacher, 2-sided)"] = number(vs_teacher["p_value"])
            entry["vs_teacher_snr"] = vs_teacher
        alpha_rows.append(row)
        alpha_summary.append(entry)

    task_rows, task_summary, task_tests = [], [], []
    for t in TASKS:
        expert = f"EDSR {TASK_LABELS[t]} expert"
        for model in ("input", expert, "multi-task EDSR no KD", "multi-task EDSR KD"):
            s = summary_row(t, model)
            task_rows.append({"task": TASK_LABELS[t], "model": model, "SNR (ROI)": s["snr_text"],
                              "PSNR (vol)": s["psnr_text"], "SSIM (vol)": s["ssim_text"]})
            task_summary.append({"task": t, "model": model, **s})
        for other in ("multi-task EDSR no KD", expert):
            test = {m: paired_units(volume_values(rows, t, "multi-task EDSR KD", m),
                              volume_values(rows, t, other, m)) for m in ("psnr", "ssim", "snr")}
            task_tests.append({"task": t, "against": other, **test})
    test_rows = [{"task": TASK_LABELS[x["task"]], "comparison": f"multi-task KD vs {x['against']}",
                  **{f"d{m.upper()} (95% CI)": with_ci(x[m], "+.4f") for m in
                     ("psnr", "ssim", "snr")},
                  **{f"p {m.upper()} (2-sided)": number(x[m]["p_value"]) for m in
                     ("psnr", "ssim", "snr")}} for x in task_tests]

    curve = run_dir / "alpha_curve.png"
    plot_alpha_curve(alpha_summary, curve, task)
    panels = save_example_panels(evaluate_dir, run_dir, rows, task, names, grid)

    ratio = timing["rows"][0]["speed-up"]
    timing_text = (
        f"Per-slice inference (one whole test slice) of SwinIR ({cfg.model.teacher}) and EDSR "
        f"({cfg.model.student}), called in turn, round by round; the speed-up is from the "
        f"minima, and a row whose speed-up disagrees with the 1-thread row by more than 2x is "
        f"marked unreliable. The paper: 5.162 vs 0.145 s/slice (35x) for its full-size models "
        f"on its hardware.\n\n" + latency_table(timing["rows"]))

    findings = []
    for entry in alpha_summary:
        if entry.get("vs_nokd_snr"):
            vs = entry["vs_nokd_snr"]
            verdict = ">=" if vs["mean_difference"] >= 0 else "<"
            findings.append(f"- alpha {entry['alpha']:g}: KD SNR {verdict} no-KD (mean difference "
                            f"{with_ci(vs, '+.3f')} over {vs['n']} test volumes, one-sided "
                            f"p(KD > no-KD) = {number(vs['p_greater'])}; PSNR "
                            f"{with_ci(entry['vs_nokd_psnr'], '+.3f')} dB, two-sided p = "
                            f"{number(entry['vs_nokd_psnr']['p_value'])}).")
    for x in task_tests:
        if x["against"] == "multi-task EDSR no KD":
            findings.append(f"- {TASK_LABELS[x['task']]}: multi-task KD vs mixed-data no-KD: "
                            f"dPSNR {number(x['psnr']['mean_difference'], '+.3f')} dB "
                            f"(p = {number(x['psnr']['p_value'])}), dSSIM "
                            f"{number(x['ssim']['mean_difference'], '+.4f')} "
                            f"(p = {number(x['ssim']['p_value'])}).")
    teacher_res, students = results["teacher"], results["students"]
    shipped_experts = all(e.get("trained") is False for e in results["experts"].values())
    n_test = len({r["volume"] for r in rows if r["task"] == task})
    n_slices = len({r["slice"] for r in rows if r["task"] == task})
    teacher_steps = (teacher_res.get("steps", "?") if teacher_res.get("trained", True)
                     else "its shipped steps")
    features = ("user checkpoint" if cfg.loss.perceptual_checkpoint
                else "SwinIR teacher early layers")
    limits = (
        f"This schedule trains each EDSR student"
        f"{'' if shipped_experts else ' and expert'} for {students[0.0].get('steps', '?')} "
        f"optimiser steps (the multi-task EDSRs for "
        f"{results['multitask']['nokd'].get('steps', '?')} on both tasks' pairs, the SwinIR "
        f"teacher for {teacher_steps}"
        f"{'; the experts are the given model.experts' if shipped_experts else ''}) of batch "
        f"{cfg.train.batch_size} "
        f"({cfg.data.patch_size}-pixel patches) on "
        f"{results['data']['train_slices']} training slices and tests on {n_slices} slices of "
        f"{n_test} volume(s): far from convergence and from the paper's data, so it shows the "
        f"machinery and the direction of effects at this budget, not the published sizes of "
        f"effects. The SwinIR teacher at this budget need not be better than the EDSR student "
        f"(see the table), in which case distilling it cannot be expected to help. Paired tests "
        f"are over the {n_test} test volumes; the p-values of the several alphas and tests are "
        f"not corrected for multiple comparisons; one training seed per model means "
        f"seed-to-seed variation is not measured within a run. Timing is for the CPU sizes "
        f"here, on a shared machine.")
    if not teacher_res.get("perceptual") and teacher_res.get("trained"):
        limits += (" The SwinIR teacher was trained without the perceptual term (no feature "
                   "network exists before it is trained; set loss.perceptual_checkpoint).")
    for t in TASKS:
        scores = {e["model"]: e["psnr"] for e in task_summary if e["task"] == t}
        if max(v for m, v in scores.items() if m != "input") <= scores["input"]:
            limits += (f" On {TASK_LABELS[t]} no network beats its own input's PSNR "
                       f"({scores['input']:.2f} dB) at this budget, so that task's comparisons "
                       f"rank degraded outputs, not restorations.")
    limits += (" SNR on SRE is reported for completeness only: truncating k-space low-passes the "
               "noise, so the SRE input's background is quiet and its SNR high; PSNR and SSIM "
               "are the SRE measures.")

    sections = [
        ("Setup", f"Model-based task: {TASK_LABELS[task]}; teacher {cfg.model.teacher}, "
                  f"students {cfg.model.student}, multi-task "
                  f"{multitask_arch(cfg.model.student, cfg.model.multitask_student)}; "
                  f"alpha grid {list(grid)}; multi-task KD alpha {cfg.loss.alpha:g}; loss "
                  f"weights L1 {cfg.loss.l1_weight:g}, SSIM {cfg.loss.ssim_weight:g}, perceptual "
                  f"{cfg.loss.perceptual_weight:g} (features: "
                  f"{features}); "
                  f"teacher targets: {results['cache'].get('mode')}. SNR = mean(tissue ROI) / "
                  f"std(background ROI) per slice; PSNR/SSIM per volume (mean +- std over "
                  f"volumes); SNR mean +- std over volumes (each the mean of its slices' "
                  f"ROIs); differences with the 95% CI of the paired mean difference."),
        ("Model-based KD (alpha table)", table(alpha_rows, ALPHA_COLUMNS)),
        ("Alpha curve", f"![SNR vs alpha]({curve.name})"),
        ("Mixed-effects model (SNR)", mixed_effects_table(
            {m: snr_units(rows, task, m) for m in [names["teacher"], *[names[a] for a in grid]]},
            "snr", nokd)),
        ("Task-based KD", table(task_rows) + "\n\n" + table(test_rows)),
        ("Inference time", timing_text),
        ("Findings", "\n".join(findings)),
        ("What this schedule does not show", limits),
        ("Examples", "\n".join(f"![{p.stem}]({p.name})" for p in panels)),
    ]
    summary = {"alpha_table": alpha_summary, "task_table": task_summary,
               "task_tests": task_tests, "timing": timing, "volumes": volumes}
    write_report(run_dir, "Enhancement KD (Shou et al.)", sections, summary)
    return {"report": str(run_dir / "report.md"), "text": (run_dir / "report.md").read_text(),
            "alpha_snr": {str(e["alpha"] if e["alpha"] is not None else e["model"]): e["snr"]
                          for e in alpha_summary},
            "speed_ratio": ratio}


def plot_alpha_curve(alpha_summary: list[dict], path: Path, task: str) -> Path:
    """SNR (mean +- standard error over test volumes) vs alpha, with the teacher, the no-KD
    student and the input as levels."""
    points = [(e["alpha"], e["snr"], e["snr_std"] / math.sqrt(e["snr_n"]) if e["snr_n"] > 1
               else 0.0) for e in alpha_summary if e["alpha"] is not None]
    by_model = {e["model"]: e["snr"] for e in alpha_summary}
    levels = {"SwinIR teacher": (by_model["SwinIR teacher"], "--"),
              "EDSR no KD": (points[0][1], "-."), "input": (by_model["input"], ":")}
    return save_curves({"EDSR student": points}, levels, path, "alpha (weight of the KD term)",
                       "SNR in ROIs", f"{TASK_LABELS[task]}: SNR vs alpha")


def save_example_panels(evaluate_dir: Path, out_dir: Path, rows: list[dict], task: str,
                        names: dict, grid: Sequence[float]) -> list[Path]:
    """One panel per evaluated group: the middle slice of its task's first test volume."""
    groups = [("model_based", task, ["input", "target", names["teacher"],
                                     *[names[a] for a in grid]])]
    for t in TASKS:
        groups.append((f"task_based_{t}", t, ["input", "target", f"EDSR {TASK_LABELS[t]} expert",
                                              "multi-task EDSR no KD", "multi-task EDSR KD"]))
    paths = []
    for group, group_task, models in groups:
        volumes = sorted({r["volume"] for r in rows if r["task"] == group_task})
        files = sorted(evaluate_dir.glob(f"{group}-rank*.h5"))
        if not volumes or not files:
            continue
        saved = read_predictions(files, volumes[0])
        images = [saved[f"{m}/{volumes[0]}"] for m in models]
        images = [image[image.shape[0] // 2] for image in images]
        paths.append(save_panel(images, models, out_dir / f"panel_{group}.png", rows=2,
                                vmax=[float(images[1].max())] * len(images)))
    return paths


RECIPE = Recipe("enhancement", stages, check_config, summary, trial_result, teacher_cache_parts)
