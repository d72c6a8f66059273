"""One dataclass tree: the only home of kdhpc's defaults.

A run's configuration is built in three layers, later ones winning:

1. the defaults below (every field documented in its ``help``),
2. a YAML file of overrides (``load_config("configs/recon_default.yaml")``),
3. dotted command-line overrides (``loss.alpha=0.5 train.epochs=3``).

Every layer is checked where it enters: an unknown key, a value of the wrong type or a value
out of range stops with a :class:`ConfigError` naming the file (or ``command line``), the dotted
key, what was expected and what was found. Values in YAML and on the command line are parsed as
YAML scalars (``0.5``, ``true``, ``[1, 2]``), then checked against the field's type; an int is
accepted where a float is expected, and so is any YAML 1.2 number that PyYAML (a YAML 1.1
reader) leaves as a string, such as ``1e-4``, ``5E3`` or ``0x10``; nothing else is coerced.

Conventions (docs/methods.md): ``loss.alpha`` is the weight of the distillation term and
``1 - alpha`` goes to the data term (KD-MRI's paper writes it the other way round; its configs
map onto ours).
The temperature KL is multiplied by T^2 (Hinton) unless ``loss.kl_t2_scaling`` is false.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names source, key, expected, found."""


def _f(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
       lo_open: bool = False, hi_open: bool = False, factory: bool = False,
       result: bool = True, omit_default: bool = False):
    """A documented field with an optional numeric range [lo, hi] (open ends where flagged).

    ``result=False`` marks a field that cannot change what a stage computes (logging, progress,
    checkpoint bookkeeping, where a cache lives): stage digests leave it out
    (:func:`result_values`), so changing it reruns nothing.
    ``omit_default=True`` marks a field added after runs, caches and shipped teachers were
    recorded whose default reproduces the earlier behaviour: digests leave it out while it
    holds its default, so those records stay valid, and cover it once it is set.
    """
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "result": result, "omit_default": omit_default}
    if factory:
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Which data a run reads and how it is cut into training samples."""

    dataset: Literal["default_brain", "default_cardiac", "fastmri", "kdmri", "acdc"] = _f(
        "default_brain", "dataset layout: the embedded defaults (generated on first use), fastMRI "
        "HDF5, KD-MRI HDF5 or ACDC/M&Ms NIfTI")
    root: str = _f("", "dataset root folder; empty means the embedded default data in the cache "
                   "directory (KDHPC_DATA, else the user cache dir)")
    challenge: Literal["singlecoil", "multicoil"] = _f(
        "singlecoil", "fastMRI challenge: single-coil (_esc targets) or multi-coil (_rss targets)")
    train_split: str = _f("train", "sub-folder (or split name) used for training")
    val_split: str = _f("val", "sub-folder (or split name) used for validation/model selection")
    test_split: str = _f("test", "sub-folder (or split name) used only for the final report")
    crop: list[int] = _f([320, 320], "centre crop (H, W) of targets and outputs; fastMRI metrics "
                         "use 320x320", factory=True)
    patch_size: int = _f(0, "training patch size in pixels (0 = whole slices)", lo=0)
    slice_fraction: float = _f(1.0, "fraction of central slices of each volume to use",
                               lo=0.0, hi=1.0, lo_open=True)
    max_volumes: int = _f(0, "cap on volumes per split (0 = all); for quick runs", lo=0)
    num_workers: int = _f(0, "DataLoader workers per rank", lo=0, result=False)
    val_fraction: float = _f(0.2, "ACDC download (data.root holding training/ and testing/): "
                             "fraction of training/'s patients held out for validation",
                             lo=0.0, hi=1.0, lo_open=True, hi_open=True, omit_default=True)
    split_seed: int = _f(0, "ACDC download: seed of the patient-level train/val split of "
                         "training/", omit_default=True)
    spacing: list[float] = _f([], "ACDC: in-plane spacing (mm) [row, column] that volumes are "
                              "resampled to; empty = the files' own grid",
                              factory=True, omit_default=True)
    unlabelled_split: str = _f("", "reconstruction: a split of extra training volumes used "
                               "WITHOUT their targets (undersampled k-space only): extra KD "
                               "stages train the student on them with the teacher's output as "
                               "the only target, beside the labelled training split; empty = "
                               "none. Never the val or test split", omit_default=True)


@dataclass
class MaskConfig:
    """Undersampling mask (docs/methods.md: Masks and seeds, FFT centring)."""

    kind: Literal["kdmri", "random", "equispaced", "file"] = _f(
        "kdmri", "kdmri: fixed 1-D variable-density lines with a fully sampled centre block; "
        "random / equispaced: fastMRI RandomMaskFunc / EquispacedMaskFractionFunc; file: a .npy")
    acceleration: float = _f(4.0, "undersampling factor (4, 5 and 8 are the published ones)", lo=1.0)
    center_fraction: float = _f(0.08, "fraction of fully sampled central lines", lo=0.0, hi=1.0,
                                lo_open=True, hi_open=True)
    layout: Literal["unshifted", "centered"] = _f(
        "unshifted", "k-space layout the mask is expressed in: unshifted (DC at index 0, KD-MRI) "
        "or centred (DC in the middle, fastMRI)")
    path: str = _f("", "mask .npy file when kind=file")
    seed: int = _f(42, "seed of a fixed mask (kdmri) and base of the per-file validation seeds")


@dataclass
class DegradeConfig:
    """How the network input is made from the target (kdhpc/data/degrade.py)."""

    task: Literal["undersample", "denoise", "superres"] = _f(
        "undersample", "undersample: masked k-space; denoise: reduced-NSA k-space noise; "
        "superres: phase-encode / central-block k-space truncation")
    nsa_factor: float = _f(4.0, "denoise: the input emulates 1/r of the averages (noise std x "
                           "sqrt(r))", lo=1.0)
    noise_sigma: float = _f(0.02, "denoise: k-space noise std at NSA factor 1, relative to the "
                            "slice's image max", lo=0.0)
    noise_jitter: list[float] = _f([1.0, 1.0], "training: random multiplier range of the noise "
                                   "level (augmentation); [1, 1] = fixed", factory=True)
    sr_scale: float = _f(4.0, "superres: keep the central 1/s of lines (s = 4 is KD-MRI's "
                         "64 of 256)", lo=1.0)
    sr_mode: Literal["phase_encode", "central_block"] = _f(
        "central_block", "superres: truncate phase encodes only, or the central block on both axes")
    dihedral: bool = _f(True, "training views include the 8 flips/rot90s (view id 0-7)")
    views_per_sample: int = _f(8, "size of each sample's enumerated view pool (dihedral id x "
                               "noise seed); the teacher cache holds one record per view", lo=1)
    max_rotation_deg: float = _f(15.0, "segmentation views: rotation drawn uniformly in "
                                 "+-this many degrees (kdhpc.data.acdc.view_params)", lo=0.0,
                                 omit_default=True)
    max_shift_fraction: float = _f(0.08, "segmentation views: translation drawn as whole pixels "
                                   "in +-this fraction of the crop size S", lo=0.0, hi=0.5,
                                   omit_default=True)
    gamma_range: list[float] = _f([0.7, 1.5], "segmentation views: [low, high] of the gamma "
                                  "contrast exponent, drawn log-uniformly", factory=True,
                                  omit_default=True)


@dataclass
class DefaultDataConfig:
    """The embedded default data (python -m kdhpc.data.default)."""

    seed: int = _f(0, "generation seed; the same seed gives byte-identical files")
    brain_subjects: int = _f(12, "pseudo-subjects made from the MNI ICBM152 template", lo=3)
    brain_slices: int = _f(16, "axial slices per brain subject", lo=1)
    brain_size: int = _f(160, "brain image size (square, pixels) before k-space simulation", lo=32)
    brain_coils: int = _f(8, "simulated receive coils", lo=1)
    cardiac_patients: int = _f(20, "analytic short-axis pseudo-patients", lo=3)
    cardiac_slices: int = _f(8, "short-axis slices per frame", lo=1)
    cardiac_size: int = _f(192, "cardiac image size (square, pixels)", lo=64)
    split: list[float] = _f([0.6, 0.2, 0.2], "train/val/test fractions, split by subject",
                            factory=True)
    brain_unlabelled_subjects: int = _f(0, "extra brain subjects written as the split "
                                        "'unlabelled' ({challenge}_unlabelled/); the train/val/"
                                        "test subjects stay the same files", lo=0,
                                        omit_default=True)


@dataclass
class ModelConfig:
    """Networks by registry name (kdhpc/models); named sizes live in the registry."""

    teacher: str = _f("dccnn_teacher", "teacher architecture: a registry name, or a factory "
                      "'package.module:callable' returning an nn.Module")
    student: str = _f("dccnn_student", "student architecture: a registry name, or a factory "
                      "'package.module:callable' returning an nn.Module")
    teacher_kwargs: dict = _f({}, "keyword arguments of the teacher factory (or overrides of a "
                              "registry network's constructor)",
                              factory=True, omit_default=True)
    student_kwargs: dict = _f({}, "keyword arguments of the student factory (or overrides of a "
                              "registry network's constructor)",
                              factory=True, omit_default=True)
    teacher_checkpoint: str = _f("", "trained teacher weights: a state-dict file (plain, "
                                 "Lightning or DDP; model.checkpoint_prefix), a TorchScript or "
                                 "torch.export (.pt2) file of a teacher that is only run "
                                 "(recognised by its content; model.teacher is then not built), "
                                 "or pretrained:<name> for a teacher shipped with kdhpc "
                                 "(python -m kdhpc.teacher.pretrained list); empty = the "
                                 "recipe trains one")
    checkpoint_strict: bool = _f(True, "teacher_checkpoint: refuse missing or unexpected keys "
                                 "(false: load the matching ones and report the rest)",
                                 omit_default=True)
    checkpoint_prefix: str = _f("auto", "teacher_checkpoint key prefix to strip: auto (model., "
                                "module., _orig_mod. while every key has one), a prefix such as "
                                "'net.' (keep only its keys), or '' (none)",
                                omit_default=True)
    teacher_layers: list[str] = _f([], "attention transfer: teacher module paths to tap (e.g. "
                                   "cascades.0.acts.2), paired by position with student_layers; "
                                   "empty = the registry network's feature_layers",
                                   factory=True, omit_default=True)
    student_layers: list[str] = _f([], "attention transfer: student module paths paired with "
                                   "teacher_layers; empty = the registry network's "
                                   "feature_layers", factory=True, omit_default=True)
    experts: list[str] = _f([], "task-based KD: one teacher checkpoint per task (enhancement)",
                            factory=True)
    multitask_student: str = _f("", "enhancement: the multi-task student of task-based KD, a "
                                "registry name or factory whose forward takes (input, task); "
                                "empty = the multi-task sibling of an EDSR model.student",
                                omit_default=True)


@dataclass
class LossConfig:
    """Data and distillation terms. alpha weighs the distillation term (docs/methods.md)."""

    alpha: float = _f(0.5, "weight of the distillation term; 1 - alpha goes to the data term",
                      lo=0.0, hi=1.0)
    temperature: float = _f(1.0, "softmax temperature of the KL term", lo=0.0, lo_open=True)
    kl_t2_scaling: bool = _f(True, "multiply the temperature KL by T^2 (Hinton)")
    at_mode: Literal["paper", "kdmri_code"] = _f(
        "paper", "attention transfer: per-sample L2 norm and L2 distance (paper) or batch-dim "
        "normalisation and L1 mean (released KD-MRI code)")
    at_p: float = _f(2.0, "attention map exponent: Q = sum_c |A_c|^p", lo=0.0, lo_open=True)
    attention_transfer: bool = _f(True, "reconstruction: run the student_at stage (attention "
                                  "transfer) before output imitation; false: student_kd starts "
                                  "from fresh weights and the teacher cache holds outputs only "
                                  "(required for a TorchScript / torch.export teacher, whose "
                                  "layers cannot be tapped)", omit_default=True)
    l1_weight: float = _f(1.0, "weight of L1 inside the data term", lo=0.0)
    ssim_weight: float = _f(0.0, "weight of (1 - SSIM) inside the data term", lo=0.0)
    perceptual_weight: float = _f(0.0, "weight of the perceptual term inside the data term", lo=0.0)
    perceptual_checkpoint: str = _f("", "feature network for the perceptual term; empty = the "
                                    "frozen teacher's early layers")
    alpha_grid: list[float] = _f([0.0, 0.25, 0.5, 0.75, 1.0], "enhancement: alphas of the "
                                 "model-based students in one run; must contain 0 (the no-KD "
                                 "student)", factory=True)
    ds_weights: list[float] = _f([], "deep-supervision weights, highest resolution first; "
                                 "empty = nnU-Net's 1/2^i, lowest 0, normalised", factory=True)
    cascade_weight: float = _f(0.0, "varnet: weight of the per-cascade transfer, the L1 between "
                               "each student cascade's RSS image and its paired teacher "
                               "cascade's", lo=0.0, omit_default=True)
    at_weight: float = _f(0.0, "varnet: weight of attention transfer between the U-Net "
                          "bottlenecks of paired cascades", lo=0.0, omit_default=True)


@dataclass
class OptimConfig:
    """Optimiser (KD-MRI: Adam 1e-3; nnU-Net: SGD 1e-2, momentum 0.99 Nesterov, wd 3e-5)."""

    name: Literal["adam", "adamw", "sgd"] = _f("adam", "optimiser")
    lr: float = _f(1e-3, "learning rate", lo=0.0, lo_open=True)
    weight_decay: float = _f(0.0, "weight decay", lo=0.0)
    momentum: float = _f(0.99, "SGD momentum", lo=0.0, hi=1.0)
    nesterov: bool = _f(True, "SGD Nesterov momentum")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, in optimiser steps."""

    kind: Literal["constant", "step", "poly", "cosine"] = _f("step", "schedule shape")
    step_size: int = _f(40, "step: decay every this many epochs", lo=1)
    gamma: float = _f(0.1, "step: decay factor", lo=0.0, hi=1.0, lo_open=True)
    power: float = _f(0.9, "poly: exponent", lo=0.0)
    warmup_steps: int = _f(0, "linear warm-up steps (cosine and poly)", lo=0)


@dataclass
class TrainConfig:
    """The DeepSpeed loop (kdhpc/train.py)."""

    epochs: int = _f(150, "training epochs", lo=1)
    max_steps: int = _f(0, "stop after this many optimiser steps (0 = run all epochs)", lo=0)
    teacher_epochs_factor: int = _f(1, "a teacher trained by a recipe runs this many times "
                                    "epochs (and max_steps): a teacher should be trained further "
                                    "than its students", lo=1)
    equal_budget: bool = _f(False, "reconstruction: the no-KD student trains as many steps as "
                            "the KD student's attention-transfer and imitation stages together "
                            "(false: train.epochs each, KD-MRI's protocol)")
    batch_size: int = _f(4, "global batch size (micro batch x ranks x accumulation)", lo=1)
    grad_accum: int = _f(1, "gradient accumulation steps", lo=1)
    grad_clip: float = _f(0.0, "gradient norm clip (0 = off)", lo=0.0)
    precision: Literal["fp32", "bf16"] = _f("fp32", "training precision")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage", lo=0, hi=3)
    deepspeed_config: str = _f("", "DeepSpeed JSON to start from; empty = configs/deepspeed/"
                               "zero<stage>_<precision>.json")
    eval_every: int = _f(0, "evaluate every N optimiser steps (0 = at each epoch end)", lo=0)
    checkpoint_every: int = _f(0, "checkpoint every N steps (0 = at each epoch end)", lo=0,
                               result=False)
    keep_last: int = _f(2, "checkpoints kept besides the best", lo=1, result=False)
    best_metric: str = _f("val_loss", "metric that selects the best checkpoint")
    best_mode: Literal["min", "max"] = _f("min", "whether lower or higher best_metric is better")
    max_bad_steps: int = _f(3, "NaN/Inf loss steps tolerated before training stops", lo=0,
                            result=False)
    log_every: int = _f(10, "log every N steps", lo=1, result=False)
    progress: bool = _f(True, "report progress on rank 0: a bar on a terminal, else a plain "
                              "line per 10% of a stage or per 30 s", result=False)
    seed: int = _f(42, "run seed; ranks and workers derive theirs from it")
    threads: int = _f(0, "torch intra-op threads (0 = leave torch's default)", lo=0, result=False)


@dataclass
class TeacherConfig:
    """Where teacher targets come from (kdhpc/teacher)."""

    mode: Literal["precompute", "stream"] = _f(
        "precompute", "precompute: an HDF5 cache filled once; stream: the frozen teacher runs on "
        "each batch's exact views")
    cache_dir: str = _f("", "teacher cache folder; empty = <run_dir>/teacher_cache", result=False)
    cache_dtype: Literal["float16", "bfloat16", "float32"] = _f(
        "float16", "stored dtype of cached teacher outputs")
    compression: Literal["none", "gzip", "lzf"] = _f("none", "HDF5 compression of the cache",
                                                     result=False)
    stream_bf16: bool = _f(False, "run a streamed teacher under bf16 autocast")
    fill_batch_size: int = _f(0, "batch size when filling the cache (0 = eval.batch_size)", lo=0,
                              result=False)
    commit_seconds: float = _f(1.0, "cache fill: flush written rows at least this often, bounding "
                               "the work a killed fill loses", lo=0.0, lo_open=True, result=False)


@dataclass
class EvalConfig:
    """Evaluation and report."""

    batch_size: int = _f(8, "evaluation batch size per rank", lo=1)
    latency_repeats: int = _f(20, "timed repetitions for per-slice latency", lo=1)
    tta_flip: bool = _f(True, "segmentation: flip test-time augmentation for the teacher")


@dataclass
class Config:
    """A whole run: recipe, data, models, losses, optimisation and outputs."""

    recipe: str = _f(
        "reconstruction", "which recipe python -m kdhpc.distill runs: reconstruction, superres, "
        "enhancement, segmentation, varnet, or the dotted path of a module that defines RECIPE (your own "
        "recipe, kdhpc.recipe.Recipe)")
    run_dir: str = _f("runs/default", "output folder: checkpoints, caches, metrics, report")
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    default_data: DefaultDataConfig = field(default_factory=DefaultDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# checking

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


# YAML 1.2 core-schema numbers (https://yaml.org/spec/1.2.2/#1032-tag-resolution). PyYAML
# follows YAML 1.1, whose floats need a dot and a signed exponent, so it reads ``1e-4`` as a
# string; float fields accept these spellings.
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_YAML12_INT = re.compile(r"0o([0-7]+)|0x([0-9a-fA-F]+)")
_YAML12_SPECIAL = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


def yaml12_number(text: str) -> float | None:
    """The value of a YAML 1.2 number written as ``text`` (``"1e-4"``, ``"0o17"``), else None."""
    text = text.strip()
    if _YAML12_FLOAT.fullmatch(text):
        return float(text)
    match = _YAML12_INT.fullmatch(text)
    if match:
        return float(int(match.group(1), 8) if match.group(1) else int(match.group(2), 16))
    return _YAML12_SPECIAL.get(text.lower())


def _check_value(value: Any, tp: Any, meta: dict, key: str, source: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming source and key."""

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}: expected {expected}, found {value!r}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail(_type_name(tp))
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail(_type_name(tp))
        (inner,) = typing.get_args(tp)
        return [_check_value(v, inner, meta, key, source) for v in value]
    if tp is dict:
        return _check_mapping(value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif tp is float:
        if isinstance(value, str) and yaml12_number(value) is not None:
            value = yaml12_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            fail("a finite number")
    elif tp is str:
        if not isinstance(value, str):
            fail("a string")
    if tp in (int, float):
        lo, hi = meta.get("lo"), meta.get("hi")
        too_low = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
        too_high = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
        if too_low or too_high:
            left = "(" if meta.get("lo_open") or lo is None else "["
            right = ")" if meta.get("hi_open") or hi is None else "]"
            fail(f"a value in {left}{'-inf' if lo is None else lo}, "
                 f"{'inf' if hi is None else hi}{right}")
    return value


MAPPING_SCALARS = (str, int, float, bool, type(None))


def _check_mapping(value: Any, key: str, source: str) -> dict:
    """A ``dict`` field: names (strings) to YAML scalars or lists of them (keyword arguments)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}: expected a mapping of names to values (e.g. "
                          f"{{channels: 16}}), found {value!r}")
    for name, item in value.items():
        items = item if isinstance(item, list) else [item]
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{source}: {key}: expected names that are Python identifiers, "
                              f"found {name!r}")
        if not all(isinstance(v, MAPPING_SCALARS) for v in items):
            raise ConfigError(f"{source}: {key}.{name}: expected a number, string, boolean, "
                              f"null or a list of them, found {item!r}")
    return dict(value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(node: Any, updates: dict, source: str, prefix: str = "") -> None:
    """Set ``updates`` (a nested dict) on the dataclass ``node`` with full checking."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or '<top>'}: expected a mapping, "
                          f"found {updates!r}")
    hints = _hints(type(node))
    fields = {f.name: f for f in dataclasses.fields(node)}
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in fields:
            close = [k for k in fields if k.startswith(str(name)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: {key}: unknown key; expected one of "
                              f"{', '.join(fields)}{hint}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(node, name), value, source, key + ".")
        else:
            setattr(node, name, _check_value(value, tp, fields[name].metadata, key, source))


def _check_cross(cfg: Config, source: str) -> None:
    """Constraints that involve more than one field."""
    lo, hi = cfg.degrade.noise_jitter if len(cfg.degrade.noise_jitter) == 2 else (1, 0)
    if len(cfg.degrade.noise_jitter) != 2 or not 0 < lo <= hi:
        raise ConfigError(f"{source}: degrade.noise_jitter: expected [low, high] with "
                          f"0 < low <= high, found {cfg.degrade.noise_jitter!r}")
    gamma = cfg.degrade.gamma_range
    if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
        raise ConfigError(f"{source}: degrade.gamma_range: expected [low, high] with "
                          f"0 < low <= high, found {gamma!r}")
    if len(cfg.data.crop) != 2 or min(cfg.data.crop) < 1:
        raise ConfigError(f"{source}: data.crop: expected [H, W] of positive integers, "
                          f"found {cfg.data.crop!r}")
    if cfg.data.spacing and (len(cfg.data.spacing) != 2 or min(cfg.data.spacing) <= 0):
        raise ConfigError(f"{source}: data.spacing: expected [] or two positive spacings in mm "
                          f"[row, column], found {cfg.data.spacing!r}")
    if (cfg.model.teacher_layers and cfg.model.student_layers
            and len(cfg.model.teacher_layers) != len(cfg.model.student_layers)):
        raise ConfigError(f"{source}: model.student_layers: expected as many layers as "
                          f"model.teacher_layers ({len(cfg.model.teacher_layers)}, paired by "
                          f"position), found {len(cfg.model.student_layers)}")
    split = cfg.default_data.split
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(f"{source}: default_data.split: expected three non-negative fractions "
                          f"summing to 1, found {split!r}")
    if cfg.mask.kind == "file" and not cfg.mask.path:
        raise ConfigError(f"{source}: mask.path: expected a .npy file when mask.kind is 'file', "
                          f"found ''")
    if any(not 0.0 <= a <= 1.0 for a in cfg.loss.alpha_grid):
        raise ConfigError(f"{source}: loss.alpha_grid: expected values in [0, 1], "
                          f"found {cfg.loss.alpha_grid!r}")
    if any(w < 0 for w in cfg.loss.ds_weights):
        raise ConfigError(f"{source}: loss.ds_weights: expected non-negative weights, "
                          f"found {cfg.loss.ds_weights!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """``'loss.alpha=0.5'`` -> ``('loss.alpha', 0.5)``; the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"command line: {text!r}: expected key=value (e.g. loss.alpha=0.5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: {key}: cannot parse value {raw!r}: {err}") from None
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then dotted ``overrides``."""
    cfg = Config()
    if path is not None:
        source = _apply_file(cfg, Path(path), ())
        _check_cross(cfg, source)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), "command line")
    if overrides:
        _check_cross(cfg, "command line")
    return cfg


BASE_KEY = "base"


def _apply_file(cfg: Config, path: Path, chain: tuple[Path, ...]) -> str:
    """Apply the YAML file ``path`` to ``cfg``; a top-level ``base: OTHER.yaml`` (relative to the
    file's folder) is applied first, so a config can say only how it differs from another."""
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: config file not found")
    if path.resolve() in chain:
        raise ConfigError(f"{source}: {BASE_KEY}: expected a chain of configs without a loop, "
                          f"found {' -> '.join(map(str, chain))} -> {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if isinstance(data, dict) and BASE_KEY in data:
        data = dict(data)
        base = data.pop(BASE_KEY)
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{source}: {BASE_KEY}: expected the path of another config, "
                              f"found {base!r}")
        _apply_file(cfg, path.parent / base, (*chain, path.resolve()))
    _apply(cfg, data, source)
    return source


def describe_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted differences between two nested dicts: ``"degrade.views_per_sample: 8 -> 4"``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}{key}"
            if key not in old:
                out.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                out += describe_changes(old[key], new[key], name + ".")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def result_values(node: Any) -> Any:
    """A config subtree as plain data without the fields marked ``result=False``: what a stage
    digest covers (changing a dropped field reruns nothing)."""
    if not dataclasses.is_dataclass(node):
        return node
    return {f.name: result_values(getattr(node, f.name)) for f in dataclasses.fields(node)
            if f.metadata.get("result", True)
            and not (f.metadata.get("omit_default") and getattr(node, f.name) == _default(f))}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what is written into run directories)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "<dict>") -> Config:
    """Rebuild a Config from :func:`to_dict` output (checked like a YAML file)."""
    cfg = Config()
    _apply(cfg, data, source)
    _check_cross(cfg, source)
    return cfg


def digest(data: Any) -> str:
    """SHA-256 of a config subtree (or any JSON-able data); names what a stage or cache depends on."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks (names what a checkpoint or cache held)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary name, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_config(cfg: Config, run_dir: str | os.PathLike | None = None) -> Path:
    """Write the resolved config as ``<run_dir>/config.yaml`` (atomically) and return its path."""
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    return write_atomic(run_dir / "config.yaml",
                        yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every field; used by ``--help`` texts and the README."""
    rows = []
    hints = _hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, f.metadata.get("help", ""), getattr(inst, f.name)))
    return rows
