"""Distillation sweeps (alpha, temperature, ...) as one SLURM job array through submitit, or locally.

Run::

    python -m kdhpc.sweep configs/sweeps/seg_alpha_temperature.yaml [--dry-run]
    python -m kdhpc.sweep CONFIG [key=value ...] --grid loss.alpha=0:1:0.25 \\
        --grid loss.temperature=1,2,4 [--executor auto|slurm|local] [--dry-run] \\
        [--partition P] [--nodes N] [--tasks-per-node G] [--cpus-per-task C] [--gpus-per-node G] \\
        [--time MINUTES] [--mem 32G] [--account A] [--qos Q] [--array-parallelism K] \\
        [--slurm-arg key=value ...] [--sweep-dir DIR]

CONFIG is a recipe YAML or a sweep file (:func:`read_sweep_file`: the recipe YAML, overrides,
grid and SLURM options in one place; command-line values win). ``--grid KEY=SPEC`` takes a
dotted config key and either ``start:stop:step`` (inclusive of ``stop``), a comma list
(``1,2,4``) or one value; values are YAML scalars checked like any override. The grid is the
product of all ``--grid`` options, one trial per point. The plot and the first table columns
use the recipe's headline metric (the first of its ``metrics``).

Stages
------
A. *shared*: one job runs the recipe's stages that no swept key reaches
   (:func:`kdhpc.recipe.shared_stages`: typically data, the teacher trained or loaded, the
   teacher cache and the no-KD student), in ``<sweep>/shared``.
B. *trials*: one job array (``slurm_array_parallelism`` caps how many run at once), submitted
   when A has succeeded; each element runs the recipe's sweep stages (:func:`kdhpc.recipe.execute`
   with purpose ``sweep``: the validation split, never the test split) for one grid point in
   ``<sweep>/trials/<name>``. The sweep's :class:`TrialStages` hands a trial A's finished results
   (never runs or deletes them) and refuses, naming the stage, when the trial's inputs to a
   shared stage differ from A's. ``teacher.cache_dir`` (unless set) points every job at
   ``<sweep>/shared/teacher_cache``.
C. *aggregate*: ``sweep.csv``, ``sweep.md`` (mean +- std over volumes per trial and a paired
   t-test of each trial against the alpha = 0 trial, or the recipe's no-KD model) and
   ``sweep.png`` (the headline metric against alpha, one line per temperature, the teacher as
   a dashed reference line), in the sweep directory.

Every recipe is sweepable: its declaration (:class:`kdhpc.recipe.Recipe`) says which config
keys each stage reads, and ``trial_result`` gives the per-volume validation metrics.

Names, reruns, preemption
-------------------------
A trial is named from its grid values (``alpha0.25-temperature2``), so a rerun of the same
command finds its work: a finished trial (``trials/<name>/trial.json`` for the same resolved
config) is skipped, a failed or unfinished one is submitted again and resumes from its stage
records and checkpoints. ``--executor auto`` uses SLURM when ``sbatch`` is on PATH, else runs
the same jobs as local processes (at most ``--array-parallelism`` at a time). On SLURM the
jobs carry ``--requeue`` and ``--signal=USR2@<delay>`` (submitit's preemption signal): every
rank turns it into the engine's checkpoint request (kdhpc.train checkpoints on all ranks at the
same step), rank 0 then requeues the job, and the requeued element resumes. submitit's own
checkpoint hook (:class:`SweepJob` is ``Checkpointable``) only resubmits the same call.

Safety: everything a job needs travels pickled (configs as dicts) or as argv lists; job names
are reduced to ``[A-Za-z0-9._-]``; ``--slurm-arg`` keys must look like sbatch options and no
value may hold a control character, so nothing a user types can become a shell command.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit
import yaml

from kdhpc.config import (Config, ConfigError, digest, from_dict, load_config, parse_override,
                          to_dict, write_atomic)
from kdhpc.recipe import Stages, execute, preflight, recipe_of, shared_stages, stages_for

REPO = Path(__file__).resolve().parent.parent
SHARED_DIR, TRIALS_DIR, LOGS_DIR = "shared", "trials", "logs"
SHARED_RECORD, TRIAL_RECORD, PLAN_FILE = "sweep_shared.json", "trial.json", "plan.json"
ALPHA_KEY, TEMPERATURE_KEY = "loss.alpha", "loss.temperature"
EXECUTORS = ("auto", "slurm", "local")
POLL_SECONDS = 1.0
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_SBATCH_KEY = re.compile(r"[a-z][a-z0-9-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SweepError(RuntimeError):
    """A sweep that cannot be planned, run or aggregated; the message says what and where."""


# ---------------------------------------------------------------------------------------------
# grid and plan

def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["loss.alpha=0:1:0.25", "loss.temperature=1,2,4"]`` -> ``[(key, values), ...]``.

    ``start:stop:step`` is inclusive of ``stop`` (within 1e-9 of a step) and rounded to 12
    significant digits so that 0.1 steps give 0.3, not 0.30000000000000004.
    """
    grid: list[tuple[str, list[Any]]] = []
    for spec in specs:
        key, raw = _split_spec(spec)
        if any(key == k for k, _ in grid):
            raise SweepError(f"--grid {spec!r}: {key} is already swept by an earlier --grid")
        parts = raw.split(":")
        if len(parts) == 3:
            start, stop, step = (_grid_number(p, spec) for p in parts)
            if step <= 0 or stop < start:
                raise SweepError(f"--grid {spec!r}: expected start:stop:step with step > 0 and "
                                 f"stop >= start, found {start}:{stop}:{step}")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [float(f"{start + i * step:.12g}") for i in range(count)]
        elif len(parts) == 1:
            values = [parse_override(f"{key}={item}")[1] for item in raw.split(",")]
        else:
            raise SweepError(f"--grid {spec!r}: expected KEY=start:stop:step, KEY=v1,v2,... or "
                             f"KEY=value")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise SweepError(f"--grid {spec!r}: a value appears twice: {values}")
        grid.append((key, values))
    if not grid:
        raise SweepError("--grid: expected at least one KEY=VALUES, e.g. --grid loss.alpha=0:1:0.25")
    return grid


def _split_spec(spec: str) -> tuple[str, str]:
    key, sep, raw = spec.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise SweepError(f"--grid {spec!r}: expected KEY=VALUES, e.g. loss.alpha=0:1:0.25")
    if key in ("run_dir", "recipe") or key.startswith("teacher.cache_dir"):
        raise SweepError(f"--grid {spec!r}: {key} is set by the sweep itself and cannot be swept")
    return key, raw


def _grid_number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SweepError(f"--grid {spec!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SweepError(f"--grid {spec!r}: {text!r} is not a finite number")
    return value


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _label_value(label: str, value: Any) -> str:
    """``alpha0.25`` for numbers, ``at_mode_paper`` for words."""
    text = _format_value(value)
    return f"{label}{text}" if text[:1].isdigit() or text[:1] in "-." else f"{label}_{text}"


def safe_name(text: str, limit: int = 100) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]`` (what a job name, file name or log line may
    hold), runs of anything else replaced by ``_``, no leading dot or dash."""
    name = _SAFE_NAME.sub("_", text).lstrip(".-")[:limit]
    return name or "sweep"


def trial_names(grid: Sequence[tuple[str, list[Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Every grid point with its deterministic name, in grid order (last key fastest).

    A key is shown by its last component (``loss.alpha`` -> ``alpha``) unless two swept keys
    share it, then by the whole dotted key; a number follows it directly (``alpha0.25``), a
    word after an underscore (``at_mode_paper``). Distinct points always get distinct names.
    """
    short = [key.rsplit(".", 1)[-1] for key, _ in grid]
    labels = [s if short.count(s) == 1 else key.replace(".", "_")
              for s, (key, _) in zip(short, grid)]
    out, seen = [], {}
    for values in itertools.product(*(v for _, v in grid)):
        point = {key: value for (key, _), value in zip(grid, values)}
        name = safe_name("-".join(_label_value(label, value)
                                  for label, value in zip(labels, values)))
        if name in seen:
            raise SweepError(f"--grid: points {seen[name]} and {point} both get the trial name "
                             f"{name!r}; use values that differ in letters or digits")
        seen[name] = point
        out.append((name, point))
    return out


@dataclass
class Trial:
    """One grid point: its name, swept values and resolved config."""

    name: str
    point: dict[str, Any]
    cfg: Config


@dataclass
class SweepPlan:
    """Everything a sweep runs, resolved and checked before anything is submitted."""

    config_path: str
    overrides: list[str]
    grid: list[tuple[str, list[Any]]]
    sweep_dir: Path
    shared_cfg: Config
    trials: list[Trial]

    @property
    def shared_dir(self) -> Path:
        return self.sweep_dir / SHARED_DIR

    def trial_dir(self, name: str) -> Path:
        return self.sweep_dir / TRIALS_DIR / name

    def describe(self) -> dict:
        """The plan as plain data (``plan.json`` and ``--dry-run``)."""
        return {"config": self.config_path, "overrides": self.overrides,
                "grid": [[k, v] for k, v in self.grid], "sweep_dir": str(self.sweep_dir),
                "recipe": self.shared_cfg.recipe,
                "teacher_cache_dir": self.shared_cfg.teacher.cache_dir,
                "trials": [{"name": t.name, "point": t.point, "run_dir": t.cfg.run_dir}
                           for t in self.trials]}


def _check_path(path: Path, what: str) -> Path:
    text = str(path)
    if _CONTROL.search(text) or "%" in text:
        raise SweepError(f"{what}: {text!r} holds a control character or '%' (SLURM log file "
                         f"patterns); choose another folder")
    return path


def plan_sweep(config_path: str, overrides: Sequence[str], grid_specs: Sequence[str],
               sweep_dir: str | os.PathLike | None = None) -> SweepPlan:
    """Resolve and check the sweep: every trial's config is loaded (and so type- and
    range-checked) with its grid values before anything runs."""
    grid = parse_grid(grid_specs)
    base = load_config(config_path, overrides)
    root = _check_path(Path(sweep_dir if sweep_dir is not None else base.run_dir).absolute(),
                       "sweep directory")
    cache_dir = base.teacher.cache_dir or str(root / SHARED_DIR / "teacher_cache")
    trials = []
    for name, point in trial_names(grid):
        point_overrides = [f"{k}={json.dumps(v)}" for k, v in point.items()]
        cfg = load_config(config_path, [*overrides, *point_overrides])
        cfg.run_dir = str(root / TRIALS_DIR / name)
        cfg.teacher.cache_dir = cache_dir
        trials.append(Trial(name, point, cfg))
    shared = from_dict(to_dict(trials[0].cfg), "sweep: shared stages")
    shared.run_dir = str(root / SHARED_DIR)
    return SweepPlan(str(config_path), list(overrides), grid, root, shared, trials)


SWEEP_FILE_KEYS = ("config", "overrides", "grid", "slurm", "sweep_dir")


def read_sweep_file(path: str | os.PathLike) -> dict | None:
    """A sweep file (``configs/sweeps/*.yaml``), or None when ``path`` is a recipe config.

    A sweep file is YAML with a top-level ``grid`` mapping (key -> spec as for ``--grid``, or a
    list of values), ``config`` (the recipe YAML, relative to the sweep file's folder),
    optional ``overrides`` (list of ``key=value``), ``sweep_dir`` and ``slurm`` (the SLURM
    options by their long names with underscores: ``array_parallelism: 4``).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # load_config reports an unreadable recipe config properly
    if not isinstance(data, dict) or "grid" not in data:
        return None
    unknown = sorted(set(data) - set(SWEEP_FILE_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; a sweep file holds "
                         f"{', '.join(SWEEP_FILE_KEYS)}")
    if not isinstance(data.get("config"), str):
        raise SweepError(f"{path}: config: expected the recipe YAML's path, found "
                         f"{data.get('config')!r}")
    grid = data["grid"]
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{path}: grid: expected a mapping of dotted keys to values, found "
                         f"{grid!r}")
    specs = [f"{k}={','.join(json.dumps(x) if not isinstance(x, str) else x for x in v)}"
             if isinstance(v, list) else f"{k}={v}" for k, v in grid.items()]
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SweepError(f"{path}: overrides: expected a list of 'key=value' strings, found "
                         f"{overrides!r}")
    slurm = data.get("slurm") or {}
    fields = SlurmOptions.__dataclass_fields__
    if not isinstance(slurm, dict) or set(slurm) - set(fields):
        raise SweepError(f"{path}: slurm: expected keys among {', '.join(fields)}, found "
                         f"{slurm!r}")
    config = Path(data["config"])
    return {"config": str(config if config.is_absolute() else path.parent / config),
            "overrides": overrides, "grid": specs, "slurm": slurm,
            "sweep_dir": data.get("sweep_dir")}


# ---------------------------------------------------------------------------------------------
# the recipe hook and the stages a trial shares

def check_recipe(cfg: Config) -> None:
    """Refuse a config whose recipe does not exist or cannot run, before anything is submitted."""
    try:
        preflight(cfg)
    except ConfigError as err:
        raise SweepError(f"recipe {cfg.recipe!r}: {err}") from None


def shared_stage_names(cfg: Config, swept_keys: Sequence[str]) -> list[str]:
    """The stages of ``cfg``'s recipe that a sweep over ``swept_keys`` runs once (stage A)."""
    return shared_stages(stages_for(recipe_of(cfg), cfg, "sweep"), swept_keys)


def stage_key(name: str, depends: dict) -> str:
    """The digest :class:`kdhpc.recipe.Stages` keys a stage by (``Stages.key`` when the engine
    offers it; else the same formula)."""
    key_fn = getattr(Stages, "key", None)
    if callable(key_fn):
        return key_fn(name, depends)
    return digest({"stage": name, "depends": depends})


class TrialStages(Stages):
    """A trial's stages: the sweep's shared ones were finished by stage A in ``shared_dir`` and
    are never run, changed or deleted here; every other stage runs in the trial's ``run_dir``.

    A shared stage appears in the trial as a symbolic link ``<run_dir>/<name> ->
    <shared_dir>/<name>``, so whatever the recipe finds through ``cfg.run_dir`` (a result's
    weights path relative to the run directory, the default teacher cache folder) is the
    shared copy.
    """

    def __init__(self, run_dir: str | os.PathLike, shared_dir: str | os.PathLike,
                 shared: Sequence[str], log: Callable[[str], None] | None = None):
        super().__init__(run_dir, log)
        self.shared_dir = Path(shared_dir)
        self.shared = frozenset(shared)
        self._shared_stages = Stages(self.shared_dir, log=lambda msg: None)

    def run(self, name: str, depends: dict[str, Any], fn: Callable[[Path], dict]) -> dict:
        if name not in self.shared:
            return super().run(name, depends, fn)
        done = self._shared_stages.record(name)
        where = self.shared_dir / name
        if done is None:
            raise SweepError(f"shared stage {name!r}: no finished record in {where}; stage A "
                             f"(the shared job) must succeed first")
        if done.get("digest") != stage_key(name, depends):
            raise SweepError(f"shared stage {name!r}: this trial's inputs differ from those stage "
                             f"A ran it with ({where}): a swept or per-trial value reaches a "
                             f"stage that every trial shares; sweep only keys that the "
                             f"recipe's shared stages do not read")
        self._link(name, where)
        self.skipped.append(name)
        self.log(f"stage {name}: shared by the sweep, reused from {where}")
        return done["result"]

    def _link(self, name: str, target: Path) -> None:
        link = self.run_dir / name
        if _rank() == 0:
            if link.is_symlink() and link.resolve() != target.resolve():
                link.unlink()  # the sweep folder moved: point at its shared folder again
            if not link.is_symlink():
                if link.exists():
                    raise SweepError(f"{link}: expected a link to the shared stage {target}, "
                                     f"found a folder of the trial's own; remove it to reuse "
                                     f"the sweep's shared stage")
                link.parent.mkdir(parents=True, exist_ok=True)
                tmp = link.with_name(f".{name}.link{os.getpid()}")
                tmp.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
                os.replace(tmp, link)
        _barrier()


# ---------------------------------------------------------------------------------------------
# the jobs

def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _export_local_ranks() -> None:
    """submitit's local executor runs ``tasks_per_node`` processes without SLURM variables:
    give them the launcher variables kdhpc.train.discover_ranks reads."""
    env = submitit.JobEnvironment()
    if env.cluster != "local" or env.num_tasks == 1:
        return
    os.environ.update({"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
                       "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(15000 + int(env.job_id.split("_")[0]) % 15000)})


def _forward_preemption_signal() -> None:
    """submitit warns a job with SIGUSR2 (SUBMITIT_PREEMPT_SIGNAL) and, by itself, lets only
    rank 0 react; turn it into SIGTERM on every rank, which the engine answers by checkpointing
    all ranks at the same step and raising Preempted."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    warning = getattr(signal, name, signal.SIGUSR2)
    signal.signal(warning, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))


def _start(cfg: Config) -> None:
    from kdhpc.config import save_config
    from kdhpc.train import init_distributed

    init_distributed()
    if _rank() == 0:
        save_config(cfg, cfg.run_dir)
    _barrier()


class SweepJob(submitit.helpers.Checkpointable):
    """A sweep stage as a submitit callable: ``SweepJob("shared")(cfg_dict)`` runs stage A,
    ``SweepJob("trial")(cfg_dict, name, point, shared_names)`` one trial.

    Preemption: when the engine has checkpointed every rank and raised
    :class:`kdhpc.train.Preempted`, rank 0 requeues the SLURM job and every rank exits without
    a result, so submitit keeps waiting for the requeued run, which resumes. The inherited
    ``checkpoint`` (used when submitit's own signal handler fires first) resubmits the same call.
    """

    def __init__(self, kind: str):
        if kind not in ("shared", "trial"):
            raise ValueError(f"SweepJob kind: expected 'shared' or 'trial', found {kind!r}")
        self.kind = kind

    def __call__(self, cfg_dict: dict, name: str = SHARED_DIR, point: dict | None = None,
                 shared: Sequence[str] = ()) -> dict:
        """``shared``: for stage A, the names of the stages to run; for a trial, the names
        stage A ran (the trial links them)."""
        from kdhpc.train import Preempted

        _export_local_ranks()
        _forward_preemption_signal()
        cfg = from_dict(cfg_dict, f"sweep job {name}")
        try:
            if self.kind == "shared":
                return self._shared(cfg, shared)
            return self._trial(cfg, name, point or {}, shared)
        except Preempted:
            if submitit.JobEnvironment().cluster == "slurm":
                if _rank() == 0:
                    subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]],
                                   check=True, timeout=60)
                raise
            raise SweepError(f"sweep job {name}: stopped by a signal after a checkpoint; run the "
                             f"sweep again to resume it") from None

    @staticmethod
    def _shared(cfg: Config, names: Sequence[str]) -> dict:
        stages = Stages(cfg.run_dir)
        start = time.perf_counter()
        _start(cfg)
        execute(cfg, stages, "sweep", only=names)
        record = {"config_digest": digest(to_dict(cfg)), "stages": stages.ran + stages.skipped,
                  "seconds": time.perf_counter() - start}
        if _rank() == 0:
            write_atomic(Path(cfg.run_dir) / SHARED_RECORD,
                         json.dumps(record, indent=1, default=str))
        _barrier()
        return {"stages": record["stages"]}

    @staticmethod
    def _trial(cfg: Config, name: str, point: dict, shared: Sequence[str]) -> dict:
        shared_dir = Path(cfg.run_dir).parent.parent / SHARED_DIR
        stages = TrialStages(cfg.run_dir, shared_dir, shared)
        start = time.perf_counter()
        _start(cfg)
        result = recipe_of(cfg).trial_result(execute(cfg, stages, "sweep"))
        check_trial_result(result, f"recipe {cfg.recipe!r} trial_result")
        record = {"name": name, "point": point, "config_digest": digest(to_dict(cfg)),
                  "result": result, "seconds": time.perf_counter() - start}
        if _rank() == 0:
            write_atomic(Path(cfg.run_dir) / TRIAL_RECORD,
                         json.dumps(record, indent=1, default=float))
        _barrier()
        return {"name": name}


def check_trial_result(result: Any, source: str) -> None:
    """Refuse a trial result (``Recipe.trial_result``) that the aggregation cannot read, saying what is wrong."""
    if not isinstance(result, dict):
        raise SweepError(f"{source}: expected a dict, found {type(result).__name__}")
    for key in ("volumes", "metrics", "per_volume"):
        if key not in result:
            raise SweepError(f"{source}: missing {key!r}; a trial result is {{'volumes': [...], "
                             f"'metrics': [headline, ...], 'per_volume': {{'student': {{metric: "
                             f"[one value per volume]}}, 'teacher': ..., 'no_kd': ...}}}}")
    volumes, metrics, per_volume = result["volumes"], result["metrics"], result["per_volume"]
    if not metrics or not isinstance(metrics, list):
        raise SweepError(f"{source}: 'metrics': expected a non-empty list of names, found "
                         f"{metrics!r}")
    if "student" not in per_volume:
        raise SweepError(f"{source}: 'per_volume' has no 'student' entry, found "
                         f"{sorted(per_volume)}")
    for model, values in per_volume.items():
        for metric in metrics:
            column = values.get(metric) if isinstance(values, dict) else None
            if not isinstance(column, list) or len(column) != len(volumes):
                raise SweepError(f"{source}: per_volume[{model!r}][{metric!r}]: expected "
                                 f"{len(volumes)} values (one per volume), found {column!r:.80}")


# ---------------------------------------------------------------------------------------------
# executors

@dataclass
class SlurmOptions:
    """What the sweep's jobs ask SLURM for (sbatch options of the same names)."""

    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    gpus_per_node: int | None = None
    time_min: int = 720
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int = 8
    signal_delay_s: int = 120
    extra: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node", "time_min",
                     "array_parallelism", "signal_delay_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SweepError(f"--{name.replace('_', '-')}: expected an integer, found "
                                 f"{value!r}")
        if not isinstance(self.extra, dict):
            raise SweepError(f"slurm extra: expected a mapping of sbatch options, found "
                             f"{self.extra!r}")
        for name in ("nodes", "tasks_per_node", "time_min", "array_parallelism"):
            if getattr(self, name) < 1:
                raise SweepError(f"--{name.replace('_', '-')}: expected >= 1, found "
                                 f"{getattr(self, name)}")
        for name in ("partition", "mem", "account", "qos"):
            value = getattr(self, name)
            if value is not None and (not value or _CONTROL.search(value)):
                raise SweepError(f"--{name}: {value!r} is empty or holds a control character")
        for key, value in self.extra.items():
            if not _SBATCH_KEY.fullmatch(key):
                raise SweepError(f"--slurm-arg {key}={value}: expected an sbatch option name "
                                 f"such as 'constraint' or 'mail-type' (lowercase letters, digits, "
                                 f"dashes), found {key!r}")
            if _CONTROL.search(value):
                raise SweepError(f"--slurm-arg {key}: the value holds a control character")

    def executor_parameters(self, name: str) -> dict[str, Any]:
        """submitit ``update_parameters`` keywords (its slurm_* ones are ignored locally)."""
        params: dict[str, Any] = {
            "name": safe_name(name), "timeout_min": self.time_min, "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "slurm_array_parallelism": self.array_parallelism,
            "slurm_signal_delay_s": self.signal_delay_s,
            # requeued by SLURM itself on preemption or node failure; --open-mode=append keeps
            # the earlier lives' logs
            "slurm_additional_parameters": {"requeue": True, **self.extra}}
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        for key in ("partition", "mem", "account", "qos"):
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        return params


def resolve_executor(kind: str) -> str:
    """``auto`` -> ``slurm`` when sbatch is on PATH, else ``local``."""
    if kind not in EXECUTORS:
        raise SweepError(f"--executor: expected one of {', '.join(EXECUTORS)}, found {kind!r}")
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if kind == "slurm" and not shutil.which("sbatch"):
        raise SweepError("--executor slurm: sbatch is not on PATH (use --executor local, or run "
                         "on a SLURM login node)")
    return kind


def make_executor(kind: str, folder: Path, options: SlurmOptions, name: str):
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=kind)
    executor.update_parameters(**options.executor_parameters(name))
    return executor


def sbatch_text(plan: SweepPlan, options: SlurmOptions, stage: str, count: int | None) -> str:
    """The sbatch script submitit writes for ``stage`` (``--dry-run``; needs no SLURM here)."""
    import shlex

    from submitit.slurm.slurm import _make_sbatch_string

    generic_names = {"name": "job_name", "timeout_min": "time", "tasks_per_node": "ntasks_per_node"}
    params = {generic_names.get(k, k.removeprefix("slurm_")): v
              for k, v in options.executor_parameters(job_name(plan, stage)).items()}
    folder = plan.sweep_dir / LOGS_DIR / stage / "%j"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=count, **params)


def job_name(plan: SweepPlan, stage: str) -> str:
    return safe_name(f"kdhpc-sweep-{plan.sweep_dir.name}-{stage}")


# ---------------------------------------------------------------------------------------------
# the driver

def shared_done(plan: SweepPlan) -> dict | None:
    """Stage A's record when it finished for this plan's shared config, else None."""
    record = _read_json(plan.shared_dir / SHARED_RECORD)
    if record and record.get("config_digest") == digest(to_dict(plan.shared_cfg)):
        return record
    return None


def trial_done(plan: SweepPlan, trial: Trial) -> dict | None:
    record = _read_json(plan.trial_dir(trial.name) / TRIAL_RECORD)
    if record and record.get("config_digest") == digest(to_dict(trial.cfg)):
        return record
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _job_failure(job) -> str | None:
    """None for a job that succeeded, else the last lines of its error (submitit re-raises the
    job's traceback, or says how it died with the tail of its log)."""
    try:
        job.result()
        return None
    except Exception as err:
        lines = str(err).strip().splitlines()
        return f"job {job.job_id}: " + "\n    ".join(lines[-8:])


def _wait(jobs: Sequence, say: Callable[[str], None]) -> list[tuple[Any, str]]:
    """Wait for every job; returns the failed ones with their reasons."""
    pending, failed = list(jobs), []
    while pending:
        still = []
        for job in pending:
            if not job.done():
                still.append(job)
                continue
            reason = _job_failure(job)
            if reason is not None:
                failed.append((job, reason))
                say(f"job {job.job_id}: failed")
        pending = still
        if pending:
            time.sleep(POLL_SECONDS)
    return failed


def _submit_capped(executor, fn: Callable, calls: Sequence[tuple], cap: int,
                   say: Callable[[str], None]) -> list:
    """Local executor: submit ``calls`` as separate processes, at most ``cap`` at a time."""
    waiting, running, failed = list(calls), [], []
    while waiting or running:
        while waiting and len(running) < cap:
            running.append(executor.submit(fn, *waiting.pop(0)))
        time.sleep(POLL_SECONDS)
        still = []
        for job in running:
            if job.done():
                failed += _wait([job], say)
            else:
                still.append(job)
        running = still
    return failed


def run_sweep(plan: SweepPlan, executor_kind: str, options: SlurmOptions, *,
              say: Callable[[str], None] = print) -> dict:
    """Stages A, B and C (module docstring); returns the aggregate summary."""
    kind = resolve_executor(executor_kind)
    check_recipe(plan.shared_cfg)
    options.check()
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(plan.sweep_dir / PLAN_FILE, json.dumps(plan.describe(), indent=1))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    logs = plan.sweep_dir / LOGS_DIR

    shared = shared_done(plan)
    if shared is None:
        say(f"stage A: shared stages of recipe {plan.shared_cfg.recipe!r} ({kind})")
        executor = make_executor(kind, logs / SHARED_DIR, options, job_name(plan, SHARED_DIR))
        names = shared_stage_names(plan.shared_cfg, [k for k, _ in plan.grid])
        job = executor.submit(SweepJob("shared"), to_dict(plan.shared_cfg), SHARED_DIR, None,
                              names)
        say(f"stage A: job {job.job_id}")
        failed = _wait([job], say)
        if failed:
            raise SweepError(f"stage A (shared stages) failed, so no trial was submitted; see "
                             f"{logs / SHARED_DIR}:\n    {failed[0][1]}")
        shared = shared_done(plan)
        if shared is None:
            raise SweepError(f"stage A finished without writing {plan.shared_dir / SHARED_RECORD}")
    else:
        say(f"stage A: done before ({', '.join(shared['stages'])}), skipped")

    todo = [t for t in plan.trials if trial_done(plan, t) is None]
    say(f"stage B: {len(todo)} of {len(plan.trials)} trials to run "
        f"({len(plan.trials) - len(todo)} finished before)")
    failed = []
    if todo:
        calls = [(to_dict(t.cfg), t.name, t.point, shared["stages"]) for t in todo]
        executor = make_executor(kind, logs / TRIALS_DIR, options, job_name(plan, TRIALS_DIR))
        if kind == "slurm":
            jobs = executor.map_array(SweepJob("trial"), *zip(*calls))
            say(f"stage B: job array {jobs[0].job_id.split('_')[0]} "
                f"({len(jobs)} trials, at most {options.array_parallelism} at once)")
            failed = _wait(jobs, say)
        else:
            failed = _submit_capped(executor, SweepJob("trial"), calls,
                                    options.array_parallelism, say)
    summary = aggregate(plan)
    say(summary["markdown"])
    if failed:
        names = ", ".join(n for n, r in summary["trials"].items() if r is None)
        raise SweepError(f"stage B: {len(failed)} trial(s) failed ({names}); the table above "
                         f"leaves them out; run the same command again to retry them:\n    "
                         + "\n    ".join(reason for _, reason in failed))
    return summary


# ---------------------------------------------------------------------------------------------
# stage C: aggregate

def _reference_for(trial: Trial, done: dict[str, dict], trials: Sequence[Trial]) -> str | None:
    """The trial a trial is compared with: alpha = 0 with the same other grid values, else any
    alpha = 0 trial; None when the grid has no alpha = 0 (the recipe's no-KD model is used)."""
    zero = [t for t in trials if t.point.get(ALPHA_KEY) == 0 and t.name in done]
    same = [t for t in zero if all(v == trial.point[k] for k, v in t.point.items()
                                   if k != ALPHA_KEY)]
    pick = same or zero
    return pick[0].name if pick else None


def aggregate(plan: SweepPlan) -> dict:
    """Write sweep.csv, sweep.md and sweep.png from the finished trials; return the summary."""
    from kdhpc.metrics import paired_test, summarize
    from kdhpc.report import table

    done = {t.name: r["result"] for t in plan.trials if (r := trial_done(plan, t))}
    if not done:
        raise SweepError(f"no finished trial in {plan.sweep_dir / TRIALS_DIR}; nothing to "
                         f"aggregate")
    first = next(iter(done.values()))
    metrics, volumes = list(first["metrics"]), list(first["volumes"])
    for name, result in done.items():
        if list(result["volumes"]) != volumes:
            raise SweepError(f"trial {name}: evaluated other volumes than the others "
                             f"({result['volumes'][:3]}... vs {volumes[:3]}...); paired tests "
                             f"need the same volumes in the same order")
    keys = [k for k, _ in plan.grid]
    teacher = first["per_volume"].get("teacher")
    rows, md_rows = [], []
    for trial in plan.trials:
        result = done.get(trial.name)
        md = {"trial": trial.name, **{k: _format_value(trial.point[k]) for k in keys}}
        if result is None:
            md.update({m: "failed / not run" for m in metrics})
            md_rows.append(md)
            continue
        ref_name = _reference_for(trial, done, plan.trials)
        reference = (done[ref_name]["per_volume"]["student"] if ref_name
                     else result["per_volume"].get("no_kd"))
        ref_label = ref_name or ("no-KD model" if reference else "")
        for metric in metrics:
            values = result["per_volume"]["student"][metric]
            stats = summarize(values)
            row = {"trial": trial.name, **{k: trial.point[k] for k in keys}, "metric": metric,
                   "n": stats["n"], "mean": stats["mean"], "std": stats["std"],
                   "reference": ref_label, "mean_diff": "", "p_value": ""}
            test_text = "reference" if ref_name == trial.name else "n/a"
            if reference is not None and ref_name != trial.name:
                try:
                    test = paired_test(values, reference[metric])
                    row.update(mean_diff=test["mean_difference"], p_value=test["p_value"])
                    test_text = f"{test['mean_difference']:+.4g} (p={test['p_value']:.3g})"
                except ValueError as err:
                    test_text = f"n/a ({err})"
            rows.append(row)
            md[metric] = f"{stats['mean']:.4g} +- {stats['std']:.4g}"
            md[f"{metric} vs ref"] = test_text
        md_rows.append(md)
    if teacher is not None:
        md = {"trial": "teacher", **{k: "" for k in keys}}
        for metric in metrics:
            stats = summarize(teacher[metric])
            rows.append({"trial": "teacher", **{k: "" for k in keys}, "metric": metric,
                         "n": stats["n"], "mean": stats["mean"], "std": stats["std"],
                         "reference": "", "mean_diff": "", "p_value": ""})
            md[metric] = f"{stats['mean']:.4g} +- {stats['std']:.4g}"
            md[f"{metric} vs ref"] = ""
        md_rows.append(md)

    columns = ["trial", *keys, "metric", "n", "mean", "std", "reference", "mean_diff", "p_value"]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(plan.sweep_dir / "sweep.csv", out.getvalue())
    md_columns = ["trial", *keys, *[c for m in metrics for c in (m, f"{m} vs ref")]]
    markdown = (f"# Sweep {plan.sweep_dir.name}: recipe {plan.shared_cfg.recipe}\n\n"
                f"{len(done)} of {len(plan.trials)} trials finished; metrics over "
                f"{len(volumes)} validation volumes (mean +- sample std); 'vs ref' is the mean "
                f"difference to the reference trial (alpha = 0 with the same other values, else "
                f"the recipe's no-KD model) and its paired t-test p-value.\n\n"
                + table(md_rows, md_columns))
    write_atomic(plan.sweep_dir / "sweep.md", markdown)
    plot = plot_sweep(plan, done, metrics[0], teacher)
    return {"trials": {t.name: done.get(t.name) for t in plan.trials}, "rows": rows,
            "markdown": markdown, "plot": str(plot)}


def plot_sweep(plan: SweepPlan, done: dict[str, dict], metric: str,
               teacher: dict | None) -> Path:
    """``sweep.png``: ``metric`` (mean +- std) against alpha (else the first swept key), one
    line per value of the other swept keys, the teacher's mean as a dashed line."""
    import numpy as np

    from kdhpc.report import save_curves

    keys = [k for k, _ in plan.grid]
    x_key = ALPHA_KEY if ALPHA_KEY in keys else keys[0]
    other = [k for k in keys if k != x_key]
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for trial in plan.trials:
        if trial.name not in done:
            continue
        values = np.asarray(done[trial.name]["per_volume"]["student"][metric], dtype=float)
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        name = ", ".join(f"{k.rsplit('.', 1)[-1]}={_format_value(trial.point[k])}"
                         for k in other)
        lines.setdefault(name or "student", []).append(
            (float(trial.point[x_key]), float(values.mean()), std))
    levels = {} if teacher is None else {"teacher": (float(np.mean(teacher[metric])), "--")}
    return save_curves(lines, levels, plan.sweep_dir / "sweep.png", x_key,
                       f"{metric} (validation, mean +- std)", f"sweep {plan.sweep_dir.name}")


# ---------------------------------------------------------------------------------------------
# command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kdhpc.sweep",
        description="Sweep distillation settings: stage A (shared teacher and cache), stage B "
                    "(one trial per grid point, a SLURM job array), stage C (table, plot, tests).")
    p.add_argument("config", help="recipe YAML (configs/*.yaml) or sweep file "
                                   "(configs/sweeps/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every trial")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=VALUES",
                   help="swept key: start:stop:step (inclusive), v1,v2,... or one value; "
                        "replaces a sweep file's grid entry of the same key")
    p.add_argument("--executor", default="auto", choices=EXECUTORS,
                   help="slurm (submitit job arrays), local (processes here), auto (slurm when "
                        "sbatch exists)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and the sbatch parameters, submit nothing")
    p.add_argument("--sweep-dir", help="sweep folder (default: the config's run_dir)")
    g = p.add_argument_group("SLURM options (every job of the sweep; defaults in brackets)")
    g.add_argument("--partition")
    g.add_argument("--nodes", type=int, help="[1]")
    g.add_argument("--tasks-per-node", type=int, help="ranks per node = GPUs per node [1]")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--time", type=int, dest="time_min", help="minutes per job [720]")
    g.add_argument("--mem")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--array-parallelism", type=int,
                   help="trials running at once (SLURM array %%K; local processes) [8]")
    g.add_argument("--signal-delay", type=int, dest="signal_delay_s",
                   help="seconds before the time limit at which jobs checkpoint [120]")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. constraint=a100")
    return p


def _merge_grid(file_specs: Sequence[str], cli_specs: Sequence[str]) -> list[str]:
    """The sweep file's grid with each ``--grid`` key replaced in place, new keys appended."""
    merged = {_split_spec(spec)[0]: spec for spec in file_specs}
    merged.update({_split_spec(spec)[0]: spec for spec in cli_specs})
    return list(merged.values())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        sweep_file = read_sweep_file(args.config) or {
            "config": args.config, "overrides": [], "grid": [], "slurm": {}, "sweep_dir": None}
        slurm = dict(sweep_file["slurm"])
        for name in SlurmOptions.__dataclass_fields__:
            if getattr(args, name, None) is not None:
                slurm[name] = getattr(args, name)
        extra = dict(slurm.get("extra") or {})
        for item in args.slurm_arg:
            key, sep, value = item.partition("=")
            if not sep:
                raise SweepError(f"--slurm-arg {item!r}: expected KEY=VALUE")
            extra[key.strip()] = value
        slurm["extra"] = extra
        options = SlurmOptions(**slurm)
        options.check()
        plan = plan_sweep(sweep_file["config"], [*sweep_file["overrides"], *args.overrides],
                          _merge_grid(sweep_file["grid"], args.grid),
                          args.sweep_dir or sweep_file["sweep_dir"])
        if args.dry_run:
            print_dry_run(plan, args.executor, options)
            return 0
        run_sweep(plan, args.executor, options)
    except (SweepError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0


def print_dry_run(plan: SweepPlan, executor_kind: str, options: SlurmOptions) -> None:
    """The plan, the stage records already present and the sbatch scripts; submits nothing."""
    kind = resolve_executor(executor_kind)
    try:
        check_recipe(plan.shared_cfg)
        shared = ", ".join(shared_stage_names(plan.shared_cfg, [k for k, _ in plan.grid]))
    except SweepError as err:
        shared = f"NOT RUNNABLE: {err}"
    print(f"sweep directory: {plan.sweep_dir}")
    print(f"recipe: {plan.shared_cfg.recipe} (shared stages: {shared})")
    print(f"executor: {kind} (requested {executor_kind})")
    print(f"stage A: the shared stages in {plan.shared_dir}"
          f"{' (done, skipped)' if shared_done(plan) else ''}")
    print(f"stage B: {len(plan.trials)} trials, at most {options.array_parallelism} at once:")
    for trial in plan.trials:
        state = " (done, skipped)" if trial_done(plan, trial) else ""
        values = " ".join(f"{k}={json.dumps(v)}" for k, v in trial.point.items())
        print(f"  {trial.name}: {values}{state}")
    print(f"stage C: {plan.sweep_dir / 'sweep.csv'}, sweep.md, sweep.png")
    use = "these are the jobs it submits" if kind == "slurm" else "not used by the local executor"
    for stage, count in ((SHARED_DIR, None), (TRIALS_DIR, len(plan.trials))):
        print(f"\n--- sbatch script, stage {'A' if count is None else 'B'} ({use}) ---")
        print(sbatch_text(plan, options, stage, count))


if __name__ == "__main__":
    # Import the module under its own name, so that submitit pickles kdhpc.sweep.SweepJob (which
    # the jobs can import) and not __main__.SweepJob.
    from kdhpc.sweep import main as _main

    sys.exit(_main())
