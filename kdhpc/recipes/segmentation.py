"""Cui et al.'s cardiac segmentation recipe: nnU-Net-style teacher -> MobileNetV2 U-Net student.

Run::

    python -m kdhpc.distill configs/seg_default.yaml                 # CPU default, ~10 minutes
    python -m kdhpc.distill configs/seg_tiny.yaml run_dir=/tmp/seg   # seconds (tests)
    torchrun --nproc-per-node=2 -m kdhpc.distill configs/seg_default.yaml
    python -m kdhpc.teacher.cache configs/seg_default.yaml          # fill the cache by itself
    python -m kdhpc.segment IMAGE.nii.gz --model RUN_DIR             # use the KD student

Stages (declared in :func:`stages`, run by :func:`kdhpc.recipe.execute`, each resumable)::

    data -> teacher -> teacher_cache -> student_nokd -> student_kd -> evaluate -> speed
         -> export -> report

- ``teacher``: ``model.teacher`` (``unet_teacher``: 2-D nnU-Net-style U-Net, 4 deep-supervision
  heads) trained on Dice + CE with deep supervision for ``train.teacher_epochs_factor`` times the
  students' epochs, or ``model.teacher_checkpoint`` loaded.
- ``teacher_cache``: the frozen teacher's logits at every deep-supervision level for every view
  of every training slice (``teacher.mode: precompute``, :func:`kdhpc.teacher.fill_cache`,
  stored in ``teacher.cache_dtype``), so T can be swept later without refilling; skipped for
  ``teacher.mode: stream`` (the teacher then runs on each batch's exact views).
- ``student_nokd`` (W = 0, Dice + CE only) and ``student_kd`` (W = ``loss.alpha``, T =
  ``loss.temperature``): ``model.student`` (``mobilenet_unet_student``: MobileNetV2 inverted
  residual encoder, expansion 8), both from the same initial weights and data order.
- ``evaluate``: the TEST split at view 0; the teacher with flip test-time augmentation (softmax
  averaged over the 4 mirrorings of the two in-plane axes, nnU-Net's 2-D mirroring; the teacher
  without TTA is reported too), the students without. Dice per class (RV, myocardium, LV) per
  volume (one volume = one patient frame) from :func:`kdhpc.metrics.dice`, with
  ``|P| + |G| = 0`` counting 1; mean Dice = mean of the three. Predictions are saved in
  ``evaluate/predictions-rankRRRRR.h5``.
- ``speed``: images/s of teacher and student at ``S x S`` (``data.crop``), batch 1, on a real
  test slice, one CPU thread and all threads (and the GPU when present)
  (:func:`kdhpc.recipe.network_latency`: called in turn for ``eval.latency_repeats`` rounds,
  images/s from the minimum per call, the median beside it, a row flagged when the machine's
  load makes it unreliable).
- ``export``: the KD student (full-resolution logits) as TorchScript, and as ONNX when ``onnx``
  and ``onnxscript`` are installed (:func:`kdhpc.export.export_segmenter`: parity on a random
  input and CPU latency beside eager), each reloaded and checked against the eager model on
  test slices (max |logit difference| and label agreement); a failed parity check stops the
  run.
- ``report``: ``<run_dir>/report.md``, ``metrics.json`` and ``panel.png`` (image, ground truth,
  teacher, no-KD student and KD student contours on one test slice). Paired t-test of KD vs
  no-KD per-volume Dice (and teacher vs KD), and the goals: KD >= no-KD, teacher - KD <= 0.01.

Loss (:func:`kdhpc.losses.segmentation_kd_loss`)::

    L = sum_i w_i ((1 - W) (Dice + CE)_i + W T^2 KL(softmax(t_i / T) || softmax(s_i / T)))

over the 4 deep-supervision levels, highest resolution first; ``w_i`` = nnU-Net's ``1 / 2^i``
with the lowest level 0, normalised (or ``loss.ds_weights``); labels are downsampled by nearest
neighbour to each level; T^2 unless ``loss.kl_t2_scaling`` is false. Model selection: the
checkpoint with the best validation mean Dice (``train.best_metric`` left at its default
``val_loss`` means ``val_dice_mean``, maximised; any other ``val_<metric>`` of
:func:`volume_dice` may be named).

Data (:class:`kdhpc.data.acdc.CardiacViews`): ACDC / M&Ms layout (``data.dataset: acdc`` with
``data.root`` holding ``<split>/patientNNN/``; M&Ms converted to it, :mod:`kdhpc.data.acdc`),
the ACDC download as unpacked (``data.root`` holding ``training/`` and ``testing/``: train / val a
seeded patient-level split of ``training/`` by ``data.val_fraction`` and ``data.split_seed``,
test ``testing/``; symlinked patient folders followed), or the default cardiac set
(``default_cardiac``). ``data.spacing`` resamples every slice in-plane to that spacing first.
ED and ES frames; every short-axis slice is centre cropped or zero padded to ``S x S`` with
``S = data.crop`` (square; 192 for the published setting), then z-scored
(:func:`kdhpc.segment.prepare_slice`, which ``python -m kdhpc.segment`` applies too).

Views (enumerable augmentation, identical for teacher and student; :mod:`kdhpc.data.acdc`):
``degrade.views_per_sample`` views per slice, view 0 the identity, the others a seeded rotation
(``degrade.max_rotation_deg``), translation (``degrade.max_shift_fraction``), dihedral
flip/rotation and gamma contrast (``degrade.gamma_range``), then z-scored; each view's key
travels in its batch (``view_key``) and the teacher cache stores it, so a cached logit always
belongs to the student's exact input.

Patches: the teacher trains and predicts on whole S x S views (its InstanceNorm statistics of a
patch differ from a whole slice's, and it is evaluated on whole slices). Students train on the
central ``data.patch_size`` square of each view (0 = whole views; the translation moves the
patch over the slice; their BatchNorm uses running statistics at inference, so whole-slice
prediction is unaffected). Their teacher targets are the teacher's logits on the whole view,
centre-cropped at every level to the patch (:func:`extract_logits`; the view rides along in
the batch as ``context``), i.e. what the teacher predicts at those pixels of that image.

Networks of your own: ``model.teacher`` / ``model.student`` may be factories
(``package.module:callable`` with ``model.<role>_kwargs``) and the teacher checkpoint a state
dict in any layout or a TorchScript / torch.export program (docs/own-models.md); every network
is called as :data:`CALL` (a single logits tensor is one deep-supervision level; KD pairs level
i with level i, so the teacher needs at least the student's levels), checked on a probe batch
by :func:`check_models` before anything is written.

Optimiser: whatever ``optim`` / ``schedule`` say, for teacher and students alike. The CPU
default uses Adam (lr 1e-3, poly decay): nnU-Net's SGD (lr 1e-2, momentum 0.99 Nesterov, wd
3e-5, poly 0.9; ``configs/seg_published.yaml``) is tuned for 1000 epochs x 250 iterations and
trains far less in the few hundred steps a 10-minute CPU budget allows.

Config fields this recipe would like (hard-wired meanwhile): ``model.student_expansion`` (float,
8: the registry's default is used).
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

from kdhpc.config import Config, ConfigError
from kdhpc.data.acdc import (DOWNLOAD_SPLITS, LABELS, ACDCSliceDataset, CardiacViews,
                             center_patch, download_split, is_acdc_download)
from kdhpc.export import export_segmenter
from kdhpc.recipe import (TRAIN_KEYS, Recipe, Run, Stage, cache_stage, data_root,
                          evaluate_volumes, expect_dataset, load_network, load_teacher,
                          network_latency,
                          read_predictions, save_gathered, teacher_stage,
                          teacher_training_config, teacher_weights, train_network)
from kdhpc.runtime import from_rank0, rank, world_size
from kdhpc.teacher import teacher_source
from kdhpc.losses import segmentation_kd_loss
from kdhpc.metrics import dice, dice_counts, paired_test, summarize
from kdhpc.models import count_parameters
from kdhpc.models.external import (build_run_network, check_distinct_roles, expect_output,
                                   full_resolution_logits, is_factory_spec,
                                   logit_levels, probe, teacher_program)
from kdhpc.segment import EXPORT_FOLDER

NUM_CLASSES = len(LABELS)
CLASSES = {1: "RV", 2: "myo", 3: "LV"}
"""Foreground classes (ACDC numbering) and their short names in metric keys."""

TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
"""Mirrorings of the teacher's flip test-time augmentation (nnU-Net's 2-D mirror axes)."""

PATCH_ALIGNMENT = 16
"""crop - patch_size must be a multiple of this: the centred patch then starts at a multiple of
8 = 2^3, a whole pixel of the lowest of the 4 deep-supervision levels."""

MODEL_LABELS = {"teacher_tta": "teacher (flip TTA)", "teacher": "teacher (no TTA)",
                "student_nokd": "student no-KD", "student_kd": "student KD"}


# ---------------------------------------------------------------------------------------------
# configuration helpers

def image_size(cfg: Config) -> int:
    """The network's square input size S (``data.crop``)."""
    height, width = cfg.data.crop
    if height != width:
        raise ConfigError(f"data.crop: the segmentation recipe expected a square S x S crop "
                          f"(192 x 192 published), found {cfg.data.crop}")
    return height


def patch_size(cfg: Config) -> int:
    """Training patch size (``data.patch_size``; 0 = the whole S x S view), checked."""
    size, patch = image_size(cfg), cfg.data.patch_size
    if patch > size or (patch and (size - patch) % PATCH_ALIGNMENT):
        raise ConfigError(f"data.patch_size: expected 0 or at most data.crop = {size} with "
                          f"crop - patch a multiple of {PATCH_ALIGNMENT} (so the patch starts "
                          f"on a pixel of every deep-supervision level), found {patch}")
    return patch


def split_folder(cfg: Config, root: Path, split: str) -> Path:
    """``<root>/<split>``, checked."""
    folder = root / split
    if not folder.is_dir():
        raise ConfigError(f"data.root: expected a folder {folder} for split {split!r} (ACDC "
                          f"layout <root>/<split>/patientNNN/, or the ACDC download with "
                          f"training/ and testing/), found none")
    return folder


def split_patients(cfg: Config, root: Path, split: str) -> Path | list[Path]:
    """Where the patients of ``split`` (a split name from ``cfg.data``) are: the folder
    ``<root>/<split>``, or, for the ACDC download (``training/`` and ``testing/``), the patient
    folders of :func:`kdhpc.data.acdc.download_split`: train and val a seeded patient-level
    split of ``training/`` (``data.val_fraction``, ``data.split_seed``), test ``testing/``."""
    if not (cfg.data.dataset == "acdc" and is_acdc_download(root)):
        return split_folder(cfg, root, split)
    role = next((name for name in DOWNLOAD_SPLITS
                 if getattr(cfg.data, f"{name}_split") == split), split)
    try:
        return download_split(root, role, cfg.data.val_fraction, cfg.data.split_seed)
    except ValueError as err:  # too few patients for the fraction, or an unknown split
        raise ConfigError(f"data.val_fraction: {err} (ACDC download {root})") from None


def slice_dataset(cfg: Config, root: Path, split: str) -> ACDCSliceDataset:
    """Raw (un-normalised) S x S slices of the ED and ES frames of one split, resampled
    in-plane to ``data.spacing`` when it is set."""
    if cfg.data.dataset not in ("acdc", "default_cardiac"):
        raise ConfigError(f"data.dataset: the segmentation recipe expected 'acdc' or "
                          f"'default_cardiac', found {cfg.data.dataset!r}")
    return ACDCSliceDataset(split_patients(cfg, root, split), size=image_size(cfg),
                            frames="ED+ES", normalize=False, max_volumes=cfg.data.max_volumes,
                            spacing=cfg.data.spacing or None)


def selection_config(cfg: Config) -> Config:
    """``cfg`` with model selection on validation mean Dice unless another metric was named."""
    if cfg.train.best_metric != "val_loss":
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, best_metric="val_dice_mean", best_mode="max"))


# ---------------------------------------------------------------------------------------------
# networks, loss, metrics

CALL = ("model(image) with image [B, 1, S, S] (a z-scored slice), returning logits "
        "[B, 4, S, S] or a list of deep-supervision logits [B, 4, S / 2^i, S / 2^i], highest "
        "resolution first")
"""How this recipe calls every network, registry or user-defined (a user network's contract)."""


def check_models(cfg: Config) -> None:
    """Teacher and student build; a user-defined network (or a program teacher) takes this
    recipe's call (:data:`CALL`) on a probe batch with logits of the right shapes at every
    level, and the teacher has at least as many deep-supervision levels as the student (KD pairs
    level i with level i; the teacher's extra levels go unused)."""
    size = image_size(cfg)
    check_distinct_roles(cfg.model)
    program = teacher_program(cfg.model)
    nets = {"teacher": (load_network(cfg.model.teacher, program, cfg) if program is not None
                        else build_run_network(cfg.model, cfg.model.teacher)),
            "student": build_run_network(cfg.model, cfg.model.student)}
    if program is None and not any(is_factory_spec(getattr(cfg.model, r)) for r in nets):
        return  # the registry U-Nets' calls are tested with the package
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    levels = {}
    for role, net in nets.items():
        name = str(program) if role == "teacher" and program is not None else getattr(
            cfg.model, role)
        levels[role] = probe(f"model.{role}", name, lambda: logit_levels(net.eval()(x)), CALL)
        for i, level in enumerate(levels[role]):
            expect_output(f"model.{role}", name, level, (2, NUM_CLASSES, size >> i, size >> i),
                          CALL, f"level {i}")
    if len(levels["teacher"]) < len(levels["student"]):
        raise ConfigError(f"model.student: expected at most as many deep-supervision levels as "
                          f"the teacher ({len(levels['teacher'])}; KD pairs level i with level "
                          f"i), found {len(levels['student'])}")


def extract_logits(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Teacher targets: ``logits_i`` [B, K, P / 2^i, P / 2^i] for every deep-supervision level.

    The teacher sees the whole view (``batch["context"]`` [B, 1, S, S] when the student's
    ``image`` is a central P x P patch of it) and its logits are centre-cropped to the patch.
    """
    context = batch.get("context")
    logits = logit_levels(model(batch["image"] if context is None else context))
    if context is None:
        return {f"logits_{i}": level for i, level in enumerate(logits)}
    patch = batch["image"].shape[-1]
    return {f"logits_{i}": center_patch(level, patch >> i) for i, level in enumerate(logits)}


def teacher_levels(targets: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The ``logits_i`` of a teacher source's targets, in level order."""
    return [targets[f"logits_{i}"] for i in range(len(targets))]


def make_loss(cfg: Config, weight: float) -> Callable:
    """Engine loss: Cui et al.'s loss with KD weight ``weight`` (0: Dice + CE only)."""
    loss = cfg.loss

    def loss_fn(model, batch: dict, targets: dict | None) -> dict[str, torch.Tensor]:
        student = logit_levels(model(batch["image"]))
        # A teacher with more levels than the student: level i pairs with level i, the rest
        # go unused (check_models).
        teacher = (teacher_levels(targets)[:len(student)]
                   if targets is not None and weight > 0 else None)
        return segmentation_kd_loss(student, batch["label"], teacher, weight,
                                    loss.temperature, loss.ds_weights, loss.kl_t2_scaling)

    return loss_fn


def slice_counts(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Engine ``eval_fn``: per-slice ``inter_k``, ``pred_k``, ``gt_k`` of every foreground class
    (:func:`kdhpc.metrics.dice_counts` of the argmax of the full-resolution logits)."""
    pred = full_resolution_logits(model, batch["image"]).argmax(1).cpu().numpy()  # [B, H, W]
    labels = batch["label"].cpu().numpy()
    counts = np.array([dice_counts(p, g, NUM_CLASSES) for p, g in zip(pred, labels)])  # [B,3,K]
    out = {}
    for k, name in CLASSES.items():
        for j, part in enumerate(("inter", "pred", "gt")):
            out[f"{part}_{name}"] = torch.from_numpy(counts[:, j, k].astype(np.float64))
    return out


def volume_dice(sums: dict[str, float]) -> dict[str, float]:
    """Engine ``volume_metrics``: ``dice_<class>`` = 2 I / (P + G) (1 when both are empty) of
    the volume's summed counts, and ``dice_mean`` over the three classes."""
    out = {}
    for name in CLASSES.values():
        total = sums[f"pred_{name}"] + sums[f"gt_{name}"]
        out[f"dice_{name}"] = 2.0 * sums[f"inter_{name}"] / total if total > 0 else 1.0
    out["dice_mean"] = float(np.mean([out[f"dice_{n}"] for n in CLASSES.values()]))
    return out


def predict_probs(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Softmax of the full-resolution logits [B, K, H, W]; with ``tta`` averaged over
    :data:`TTA_FLIPS` (each prediction flipped back before averaging)."""
    if not tta:
        return full_resolution_logits(model, x).softmax(1)
    total = None
    for dims in TTA_FLIPS:
        xf = torch.flip(x, dims) if dims else x
        probs = full_resolution_logits(model, xf).softmax(1)
        probs = torch.flip(probs, dims) if dims else probs
        total = probs if total is None else total + probs
    return total / len(TTA_FLIPS)


# ---------------------------------------------------------------------------------------------
# stages

class CardiacData:
    """The run's datasets: the slices of each split and their views."""

    def __init__(self, cfg: Config, root: Path):
        self.cfg, self.root = cfg, Path(root)
        self.size, self.patch = image_size(cfg), patch_size(cfg)
        self._slices: dict[str, ACDCSliceDataset] = {}

    def slices(self, split: str) -> ACDCSliceDataset:
        if split not in self._slices:
            name = getattr(self.cfg.data, f"{split}_split")
            self._slices[split] = slice_dataset(self.cfg, self.root, name)
        return self._slices[split]

    def views(self, split: str, whole: bool = False) -> CardiacViews:
        """Training views (augmented; student patches unless ``whole``) or view 0 of whole
        slices (val, test)."""
        train = split == "train"
        return CardiacViews(self.slices(split), self.cfg.degrade, self.size,
                            self.patch if train and not whole else 0, augment=train)


def teacher_cache_parts(cfg: Config):
    """(teacher, extract, training views) for ``python -m kdhpc.teacher.cache``."""
    from kdhpc.data.default import dataset_root

    teacher = load_network(cfg.model.teacher, teacher_weights(cfg), cfg)
    return teacher, extract_logits, CardiacData(cfg, dataset_root(cfg)).views("train")


# ---------------------------------------------------------------------------------------------
# evaluation

def evaluate_models(views: CardiacViews, models: dict[str, tuple[nn.Module, bool]],
                    batch_size: int, predictions: Path) -> list[dict]:
    """Per-volume Dice of each model on ``views`` (view 0, :func:`kdhpc.recipe.evaluate_volumes`).

    ``models`` maps a key to ``(network, tta)``. Rows: ``{"volume", "model", "slices",
    "dice_RV", "dice_myo", "dice_LV", "dice_mean"}``; the predicted labels are kept in
    ``predictions`` (``<model>/<volume>`` -> uint8 [S, H, W], slices in order)."""
    for model, _ in models.values():
        model.eval()

    def predict(model: tuple[nn.Module, bool], batch: dict) -> torch.Tensor:
        return predict_probs(model[0], batch["image"], model[1]).argmax(1).to(torch.uint8)

    def score(volume: str, items: list[int], batch: dict, outputs: dict) -> list[dict]:
        rows = []
        for key, pred in outputs.items():
            scores = dice(pred.numpy(), batch["label"].numpy(), NUM_CLASSES)
            row = {"volume": volume, "model": key, "slices": len(items),
                   **{f"dice_{name}": float(scores[k]) for k, name in CLASSES.items()}}
            row["dice_mean"] = float(np.mean([row[f"dice_{n}"] for n in CLASSES.values()]))
            rows.append(row)
        return rows

    return evaluate_volumes(views, models, batch_size, predict, score, predictions=predictions)


def patient_of(volume: str) -> str:
    """The patient of a volume (``patient005_frame01`` -> ``patient005``)."""
    return volume.split("_frame")[0]


def per_model(rows: Sequence[dict]) -> dict[str, dict[str, list[float]]]:
    """``{model: {metric: per-patient values}}``, patients in one (sorted) order: each patient's
    value is the mean over its frames (ED, ES), so paired tests count patients, never frames of
    one heart twice."""
    frames: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        metrics = frames.setdefault((row["model"], patient_of(row["volume"])), {})
        for key, value in row.items():
            if key.startswith("dice_"):
                metrics.setdefault(key, []).append(value)
    out: dict[str, dict[str, list[float]]] = {}
    for (model, _), metrics in sorted(frames.items()):
        for key, values in metrics.items():
            out.setdefault(model, {}).setdefault(key, []).append(float(np.mean(values)))
    return out


# ---------------------------------------------------------------------------------------------
# the recipe as data

def _data(run: Run, stage_dir: Path) -> dict:
    root = data_root(run.cfg)
    recipe = CardiacData(run.cfg, root)
    counts = {}
    for split in ("train", "val", "test"):
        slices = recipe.slices(split)
        counts[f"{split}_volumes"], counts[f"{split}_slices"] = len(slices.volumes), len(slices)
        counts[f"{split}_patients"] = len({patient_of(Path(v[0]).name) for v in slices.volumes})
    if counts["test_patients"] < 2:
        raise ConfigError(f"data.test_split: the paired KD vs no-KD test needs at least 2 "
                          f"test patients, found {counts['test_patients']}")
    return {"root": str(root), **counts}


def _recipe(run: Run) -> CardiacData:
    return run.memo("recipe", lambda: CardiacData(run.cfg, Path(run.results["data"]["root"])))


def _train(run: Run, stage_dir: Path, arch: str, weight: float, teacher=None,
           whole: bool = False, cfg: Config | None = None) -> dict:
    """Students (and a trained teacher) on Dice + CE with KD weight ``weight``, selected on
    validation Dice (:func:`selection_config`)."""
    cfg, recipe = cfg or run.cfg, _recipe(run)
    result = train_network(selection_config(cfg), stage_dir, arch, make_loss(cfg, weight),
                           recipe.views("train", whole), recipe.views("val"),
                           teacher=None if teacher is None else lambda: teacher,
                           eval_fn=slice_counts, volume_metrics=volume_dice)
    return {**result, "kd_weight": weight}


def _train_teacher(run: Run, stage_dir: Path) -> dict:
    # The teacher trains on whole views (its InstanceNorm statistics; module docstring).
    return _train(run, stage_dir, run.cfg.model.teacher, 0.0, whole=True,
                  cfg=teacher_training_config(run.cfg))


def _fill_cache(run: Run, stage_dir: Path) -> dict:
    return cache_stage(run.cfg, run.network("teacher"), extract_logits,
                       _recipe(run).views("train"))


def _student(weight: Callable[[Config], float], kd: bool) -> Callable[[Run, Path], dict]:
    def run_stage(run: Run, stage_dir: Path) -> dict:
        source = (teacher_source(run.cfg, run.network("teacher"), extract_logits) if kd
                  else None)
        return _train(run, stage_dir, run.cfg.model.student, weight(run.cfg), source)
    return run_stage


STUDENTS = ("student_nokd", "student_kd")


def _evaluate(split: str) -> Callable[[Run, Path], dict]:
    def run_stage(run: Run, stage_dir: Path) -> dict:
        teacher = run.network("teacher")
        nets = {"teacher_tta": (teacher, True), "teacher": (teacher, False),
                **{k: (run.network(k), False) for k in STUDENTS}}
        if not run.cfg.eval.tta_flip:
            del nets["teacher_tta"]
        rows = evaluate_models(_recipe(run).views(split), nets, run.cfg.eval.batch_size,
                               stage_dir / f"predictions-rank{rank():05d}.h5")
        count = save_gathered(rows, stage_dir / "volumes.json")
        return {"volumes_file": str(stage_dir / "volumes.json"), "rows": count,
                "world_size": world_size()}
    return run_stage


def _speed(run: Run, stage_dir: Path) -> dict:
    def measure() -> dict:
        recipe = _recipe(run)
        views = recipe.views("test")
        x = views.get_view(len(views) // 2, 0)["image"][None]  # [1, 1, S, S], a real slice
        rows = network_latency({"teacher": run.network("teacher"),
                                "student": run.network("student_kd")}, {"image": x},
                               lambda net, batch: net(batch["image"]), run.cfg.eval.latency_repeats)
        return {"rows": rows, "size": recipe.size}
    return from_rank0(measure)


def _export(run: Run, stage_dir: Path) -> dict:
    def export() -> dict:
        views = _recipe(run).views("test")
        inputs = torch.stack([views.get_view(i, 0)["image"] for i in range(min(4, len(views)))])
        return export_segmenter(run.network("student_kd"), inputs,
                                stage_dir, log=run.stages.log)
    return from_rank0(export)


def _report(run: Run, stage_dir: Path) -> dict:
    rows = json.loads(Path(run.results["evaluate"]["volumes_file"]).read_text())
    results = {name: run.results[name] for name in ("data", "teacher", *STUDENTS)}
    results["cache"] = run.results["teacher_cache"]
    results["params"] = {k: count_parameters(run.network(k)) for k in ("teacher", "student_kd")}
    return from_rank0(lambda: write_segmentation_report(
        run.cfg, run.run_dir, _recipe(run), rows, run.results["speed"],
        run.results[EXPORT_FOLDER], results, sum(stage_seconds(run.run_dir).values())))


def check_config(cfg: Config) -> None:
    """Refuse what this recipe cannot run, before anything is written."""
    expect_dataset(cfg, ("default_cardiac", "acdc"))
    image_size(cfg)
    patch_size(cfg)
    check_models(cfg)


def stages(cfg: Config) -> list[Stage]:
    views = ("degrade", "loss.ds_weights")
    student = ("model.student", *TRAIN_KEYS, *views)
    kd = ("loss.alpha", "loss.temperature", "loss.kl_t2_scaling")
    trained = ("data", "teacher", *STUDENTS)
    return [
        Stage("data", _data, keys=("recipe", "data", "default_data")),
        teacher_stage(_train_teacher, ("model.teacher", *views), cfg,
                      load_teacher(lambda c, arch, path: load_network(arch, path, c))),
        Stage("teacher_cache", _fill_cache, keys=("teacher", "degrade"),
              consumes=("data", "teacher")),
        Stage("student_nokd", _student(lambda c: 0.0, False), keys=student, consumes=("data",)),
        Stage("student_kd", _student(lambda c: c.loss.alpha, True), keys=(*student, *kd),
              consumes=("data", "teacher", "teacher_cache")),
        Stage("evaluate", _evaluate("test"), keys=("eval.tta_flip", "eval.batch_size"),
              consumes=trained, use="test"),
        Stage("speed", _speed, keys=("eval.latency_repeats",),
              consumes=("data", "teacher", "student_kd"), use="test"),
        Stage(EXPORT_FOLDER, _export, consumes=("data", "student_kd"), use="test"),
        Stage("report", _report, keys=("loss",),
              consumes=("evaluate", "speed", EXPORT_FOLDER, "teacher", "teacher_cache",
                        *STUDENTS), use="test"),
        Stage("evaluate_val", _evaluate("val"), keys=("eval.tta_flip", "eval.batch_size"),
              consumes=trained, use="validation"),
    ]


def summary(run: Run) -> str:
    return run.results["report"]["text"]


def trial_result(run: Run) -> dict:
    """A sweep trial: per-volume validation Dice of the KD student, teacher and no-KD student."""
    evaluated = json.loads(Path(run.results["evaluate_val"]["volumes_file"]).read_text())
    values = per_model(evaluated)
    rows = {"student": "student_kd", "no_kd": "student_nokd",
            "teacher": "teacher_tta" if "teacher_tta" in values else "teacher"}
    volumes = sorted({patient_of(r["volume"]) for r in evaluated})
    metrics = ["dice_mean", *DICE_KEYS[:-1]]
    return {"volumes": volumes, "metrics": metrics,
            "per_volume": {key: {m: values[model][m] for m in metrics}
                           for key, model in rows.items()}}


# ---------------------------------------------------------------------------------------------
# report

STAGE_NAMES = ("data", "teacher", "teacher_cache", "student_nokd", "student_kd", "evaluate",
               "speed", EXPORT_FOLDER)
DICE_KEYS = tuple(f"dice_{name}" for name in CLASSES.values()) + ("dice_mean",)
GAP_GOAL = 0.01
"""Goal of the issue: teacher mean Dice - KD student mean Dice <= this."""


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds each finished stage took (from its record; earlier invocations included)."""
    out = {}
    for name in STAGE_NAMES:
        record = run_dir / name / "stage.json"
        if record.is_file():
            out[name] = float(json.loads(record.read_text()).get("seconds", math.nan))
    return out


def write_segmentation_report(cfg: Config, run_dir: Path, recipe: CardiacData, rows: list[dict],
                              speed: dict, exported: dict, results: dict,
                              elapsed: float) -> dict:
    """``report.md``, ``metrics.json`` and ``panel.png`` in ``run_dir``; returns the summary."""
    from kdhpc.report import (comparison_row, latency_table, mean_std_rows, save_panel, table,
                              write_report)

    values = per_model(rows)
    volumes = sorted({r["volume"] for r in rows})
    reference = "teacher_tta" if "teacher_tta" in values else "teacher"
    means = {m: float(np.mean(values[m]["dice_mean"])) for m in values}
    dice_rows = mean_std_rows({MODEL_LABELS[m]: values[m] for m in MODEL_LABELS if m in values},
                              DICE_KEYS)
    tests = {}
    for a, b in (("student_kd", "student_nokd"), (reference, "student_kd")):
        for key in DICE_KEYS:
            tests[f"{a} vs {b}: {key}"] = paired_test(values[a][key], values[b][key])
    test_rows = [comparison_row(*name.split(": "), t, "+.4f") for name, t in tests.items()]
    kd_vs_nokd = tests["student_kd vs student_nokd: dice_mean"]
    kd_means, nokd_means = values["student_kd"]["dice_mean"], values["student_nokd"]["dice_mean"]
    wilcoxon = (paired_test(kd_means, nokd_means, method="wilcoxon")
                if np.any(np.subtract(kd_means, nokd_means) != 0) else None)
    gap = means[reference] - means["student_kd"]
    goals = {"kd_ge_nokd": means["student_kd"] >= means["student_nokd"],
             "gap_to_teacher": gap, "gap_le_goal": gap <= GAP_GOAL}

    one_thread = speed["rows"][0]  # images/s from the minimum per call on one CPU thread
    per_second = {m: 1e3 / one_thread[f"{m} min ms"] for m in ("teacher", "student")}
    speedup = one_thread["speed-up"]

    # panel: middle slice of the first test volume
    views = recipe.views("test")
    predictions = read_predictions(sorted((run_dir / "evaluate").glob("predictions-rank*.h5")),
                                   volumes[0])
    indices = predictions[f"index/{volumes[0]}"]
    position = len(indices) // 2
    item = views.get_view(int(indices[position]), 0)
    image = item["image"][0].numpy()
    panel_models = [reference, "student_nokd", "student_kd"]
    overlays = [None, item["label"].numpy()] + [predictions[f"{m}/{volumes[0]}"][position]
                                                for m in panel_models]
    titles = ["image", "ground truth"] + [MODEL_LABELS[m] for m in panel_models]
    panel = save_panel([image] * len(overlays), titles, run_dir / "panel.png",
                       overlays=overlays)

    seconds = stage_seconds(run_dir)
    teacher_res, kd_res = results["teacher"], results["student_kd"]
    teacher_origin = (f"trained here, {teacher_res['steps']} steps" if teacher_res["trained"]
                      else f"loaded from {teacher_res['weights']}")
    setup = "\n".join([
        f"- data: {cfg.data.dataset} at {results['data']['root']}; "
        f"train {results['data']['train_volumes']} volumes / {results['data']['train_slices']} "
        f"slices, val {results['data']['val_volumes']} / {results['data']['val_slices']}, test "
        f"{results['data']['test_volumes']} / {results['data']['test_slices']} (ED + ES frames; "
        f"one volume = one patient frame); slices {recipe.size} x {recipe.size}, student "
        f"training patches {recipe.patch or recipe.size} (teacher: whole slices), "
        f"{cfg.degrade.views_per_sample} views per slice",
        f"- teacher: {teacher_res['arch']} ({teacher_origin}); "
        f"students: {kd_res['arch']}, {kd_res['steps']} steps each, same initial weights",
        f"- loss: W = loss.alpha = {cfg.loss.alpha}, T = {cfg.loss.temperature}, T^2 scaling "
        f"{cfg.loss.kl_t2_scaling}, deep-supervision weights "
        f"{cfg.loss.ds_weights or 'nnU-Net 1/2^i, lowest 0'}; teacher targets: "
        f"{results['cache']['mode']}",
        f"- optimiser: {cfg.optim.name} lr {cfg.optim.lr} (wd {cfg.optim.weight_decay}), "
        f"schedule {cfg.schedule.kind}, batch {cfg.train.batch_size}, epochs {cfg.train.epochs}"
        f"{', max_steps ' + str(cfg.train.max_steps) if cfg.train.max_steps else ''}; "
        f"selection on validation {selection_config(cfg).train.best_metric}",
    ])
    findings = "\n".join([
        f"- KD student mean Dice {means['student_kd']:.4f} vs no-KD {means['student_nokd']:.4f} "
        f"(KD - no-KD {kd_vs_nokd['mean_difference']:+.4f}, paired t-test p = "
        f"{kd_vs_nokd['p_value']:.3g}, Wilcoxon signed-rank p = "
        f"{wilcoxon['p_value'] if wilcoxon else float('nan'):.3g}, n = {kd_vs_nokd['n']} "
        f"patients): goal KD >= no-KD "
        f"{'met' if goals['kd_ge_nokd'] else 'NOT met'}.",
        f"- {MODEL_LABELS[reference]} mean Dice {means[reference]:.4f}; gap to the KD student "
        f"{gap:+.4f}: goal <= {GAP_GOAL} {'met' if goals['gap_le_goal'] else 'NOT met'}.",
        f"- student {per_second['student']:.1f} images/s on one CPU thread "
        f"({'>=' if per_second['student'] >= 10 else '<'} 10, real time), "
        f"{speedup:.1f}x the teacher's {per_second['teacher']:.1f} (same run).",
    ])
    export_lines = []
    for kind, check in exported.items():
        if kind == "digest":
            continue
        if "max_abs_diff" in check:
            export_lines.append(f"- {kind}: `{check['file']}`, max |logit difference| "
                                f"{check['max_abs_diff']:.2e}, label agreement "
                                f"{100 * check['label_agreement']:.2f} %")
        else:
            export_lines.append(f"- {kind}: {check.get('skipped') or check.get('parity')}")
    timing = [{"stage": name, "seconds": f"{s:.1f}"} for name, s in seconds.items()]
    timing.append({"stage": "all stages (sum)", "seconds": f"{sum(seconds.values()):.1f}"})
    sections = [
        ("Setup", setup),
        ("Findings", findings),
        ("Dice on the test split (mean +- std over patients, each the mean of its ED and ES "
         "frames)",
         "Teacher with flip test-time augmentation; students without.\n\n" + table(dice_rows)),
        ("Paired t-tests over test patients (not corrected for multiple comparisons)",
         table(test_rows)),
        (f"Speed at {recipe.size} x {recipe.size}, batch 1",
         "Teacher and student called in turn, round by round; milliseconds per image, the "
         "minimum (what the code can do) and the median (what a loaded machine gave); a row "
         "whose speed-up disagrees with the one-thread row by more than 2x is marked unreliable. "
         f"Parameters: teacher {results['params']['teacher']:,}, student "
         f"{results['params']['student_kd']:,}.\n\n" + latency_table(speed["rows"])),
        ("Export", "\n".join(export_lines)),
        ("Panel", f"![panel]({panel.name}) test volume {volumes[0]}, slice {position}"),
        ("Wall time", f"This invocation: {elapsed:.1f} s.\n\n" + table(timing)),
    ]
    metrics = {"dice": {m: {k: summarize(values[m][k]) for k in DICE_KEYS} for m in values},
               "per_volume": rows, "paired_tests": tests, "wilcoxon_kd_vs_nokd": wilcoxon,
               "goals": goals, "speed": speed["rows"],
               "speedup_one_thread": speedup, "export": exported, "stage_seconds": seconds,
               "invocation_seconds": elapsed}
    path = write_report(run_dir, "Cardiac segmentation: nnU-Net-style teacher -> MobileNetV2 "
                        "U-Net student", sections, metrics)
    text = (f"{table(dice_rows)}\n\nKD - no-KD mean Dice {kd_vs_nokd['mean_difference']:+.4f} "
            f"(paired t-test over {kd_vs_nokd['n']} patients, p = {kd_vs_nokd['p_value']:.3g}); "
            f"teacher - KD {means[reference] - means['student_kd']:+.4f}\n\nreport: {path}")
    return {"report": str(path), "mean_dice": means, "kd_vs_nokd_p": kd_vs_nokd["p_value"],
            "goals": goals, "speedup_one_thread": speedup, "text": text}


RECIPE = Recipe("segmentation", stages, check_config, summary, trial_result, teacher_cache_parts)
