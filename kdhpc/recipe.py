"""What a recipe is, and the one runner that executes it.

A recipe is a declaration (:class:`Recipe`): the checks it runs before anything is written and
its stages as data (:class:`Stage`: a name, the config keys it reads, the earlier stages it
consumes, the function that runs it). One runner, :func:`execute`, runs them for
``python -m kdhpc.distill``, for every trial of ``python -m kdhpc.sweep`` and for the sweep's
shared job, each stage resumable under one run directory (:class:`Stages`):

- a stage's digest covers exactly its declared keys and the records of the stages it consumes.
  A key is dotted (``loss.alpha``) or a section (``optim``); a section stands for its fields
  that can change a result (``kdhpc.config.result_values``: logging, progress and checkpoint
  bookkeeping are left out), so changing ``train.log_every`` reruns nothing;
- a rerun skips a finished stage whose digest is unchanged and reruns one whose inputs changed,
  and then everything downstream of it, because their digests include its record;
- an unfinished stage resumes from its own checkpoints (the engine resumes from
  ``<run_dir>/<stage>/checkpoints``); a stage whose inputs changed starts from an empty folder.

What a sweep shares follows from the declarations (:func:`shared_stages`): a stage that reads
no swept key and consumes no stage that does runs once, in the sweep's shared folder, and is
linked into every trial. A stage's ``use`` says which runs need it: ``"all"``, ``"test"``
(``kdhpc.distill``: evaluation on the test split, the report) or ``"validation"`` (sweep
trials: evaluation on the validation split, which is how sweeps choose settings).

Adding a recipe: a module in ``kdhpc/recipes/`` with ``RECIPE = Recipe(...)``, one config,
one test (README, "Adding a recipe").
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from kdhpc.config import Config, ConfigError, digest, result_values, write_atomic
from kdhpc.runtime import barrier, rank

RECIPES = {
    "reconstruction": "kdhpc.recipes.reconstruction",
    "superres": "kdhpc.recipes.reconstruction",
    "enhancement": "kdhpc.recipes.enhancement",
    "segmentation": "kdhpc.recipes.segmentation",
    "varnet": "kdhpc.recipes.varnet",
}
STAGE_RECORD = "stage.json"
STAGE_INPUTS = ".inputs"
USES = {"distill": ("all", "test"), "sweep": ("all", "validation")}


@dataclass(frozen=True)
class Stage:
    """One step of a recipe: ``run(run, stage_dir) -> dict`` (a JSON-able result)."""

    name: str
    run: Callable[["Run", Path], dict]
    keys: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    use: str = "all"
    # Inputs that are not config values (a checkpoint file's SHA-256): name -> value.
    extra: Callable[[Config], dict] | None = None


@dataclass(frozen=True)
class Recipe:
    """A recipe as data. ``stages(cfg)`` lists its stages in a runnable order (a stage consumes
    only earlier ones); ``check(cfg)`` refuses a config it cannot run, naming the key, before
    anything is written; ``summary(run)`` is the text printed at the end of ``kdhpc.distill``;
    ``trial_result(run)`` turns a sweep trial's validation stages into
    ``{"volumes", "metrics" (headline first), "per_volume": {"student", "teacher", "no_kd"}}``;
    ``cache_parts(cfg)`` gives ``(teacher, extract, training views)`` to
    ``python -m kdhpc.teacher.cache``."""

    name: str
    stages: Callable[[Config], list[Stage]]
    check: Callable[[Config], None]
    summary: Callable[["Run"], str]
    trial_result: Callable[["Run"], dict]
    cache_parts: Callable[[Config], tuple] | None = None


class Run:
    """What a stage function sees: the config, the results of the stages so far, and a memo
    for objects several stages build (datasets, networks)."""

    def __init__(self, cfg: Config, stages: "Stages"):
        self.cfg = cfg
        self.stages = stages
        self.results: dict[str, dict] = {}
        self._memo: dict[Any, Any] = {}

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def path(self, relative: str) -> Path:
        """A path recorded by a stage, relative to the run directory unless absolute."""
        path = Path(relative)
        return path if path.is_absolute() else self.run_dir / path


def recipe_of(cfg: Config) -> Recipe:
    """The declaration of ``cfg.recipe``: a name of :data:`RECIPES`, or the dotted path of any
    importable module that defines ``RECIPE`` (a recipe of the user's own)."""
    expected = f"one of {', '.join(RECIPES)}, or a module path defining RECIPE"
    module_name = RECIPES.get(cfg.recipe, cfg.recipe)
    if "." not in module_name:
        raise ConfigError(f"recipe: expected {expected}, found {cfg.recipe!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"recipe: expected {expected}, found {cfg.recipe!r} ({err})") from None
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe: expected {expected}, found module {module_name} without a "
                          f"kdhpc.recipe.Recipe named RECIPE")
    return recipe


def expect_dataset(cfg: Config, kinds: Sequence[str]) -> None:
    """Refuse a ``data.dataset`` the recipe cannot read, naming the ones it can."""
    if cfg.data.dataset not in kinds:
        raise ConfigError(f"data.dataset: expected {', '.join(kinds[:-1])} or {kinds[-1]} for "
                          f"recipe {cfg.recipe!r}, found {cfg.data.dataset!r}")


def preflight(cfg: Config) -> Recipe:
    """Every check that can fail before anything is written: the recipe exists and accepts the
    config (model names, dataset kind, sizes), ``data.root`` exists, the teacher checkpoint
    exists and matches. A failed rerun so leaves a finished run directory as it was."""
    from kdhpc.teacher.pretrained import resolve_teacher_checkpoint

    recipe = recipe_of(cfg)
    try:
        recipe.check(cfg)
    except ConfigError:
        raise
    except (KeyError, ValueError) as err:  # a registry's own refusal (unknown model name)
        raise ConfigError(str(err).strip("'\"")) from None
    if cfg.data.root and not Path(cfg.data.root).is_dir():
        raise ConfigError(f"data.root: expected a dataset folder, found {cfg.data.root!r} "
                          f"(no such folder)")
    if cfg.model.teacher_checkpoint:
        resolve_teacher_checkpoint(cfg)
    return recipe


def key_value(cfg: Config, key: str) -> Any:
    """The value a digest records for a declared key (a section: its result fields)."""
    node: Any = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            raise ConfigError(f"stage key {key!r}: no such config key")
        node = getattr(node, part)
    return result_values(node)


def stage_depends(stage: Stage, cfg: Config, results: dict[str, dict]) -> dict:
    """Everything a stage's digest covers: its keys' values, its inputs' records, extras."""
    return {"keys": {k: key_value(cfg, k) for k in stage.keys},
            "inputs": {name: results[name] for name in stage.consumes},
            **({"extra": stage.extra(cfg)} if stage.extra else {})}


def _overlaps(key: str, swept: str) -> bool:
    return key == swept or swept.startswith(key + ".") or key.startswith(swept + ".")


def shared_stages(stages: Sequence[Stage], swept_keys: Sequence[str]) -> list[str]:
    """The stages a sweep over ``swept_keys`` shares: those whose keys, and whose consumed
    stages' keys, do not touch a swept key."""
    varying: set[str] = set()
    for stage in stages:
        if (any(_overlaps(k, s) for k in stage.keys for s in swept_keys)
                or any(c in varying for c in stage.consumes)):
            varying.add(stage.name)
    return [s.name for s in stages if s.name not in varying]


def stages_for(recipe: Recipe, cfg: Config, purpose: str) -> list[Stage]:
    """The stages ``purpose`` (distill or sweep) runs, checked for a runnable order."""
    seen: set[str] = set()
    chosen = []
    for stage in recipe.stages(cfg):
        missing = [c for c in stage.consumes if c not in seen]
        if missing:
            raise ConfigError(f"recipe {recipe.name!r}: stage {stage.name!r} consumes "
                              f"{missing}, which no earlier stage provides")
        seen.add(stage.name)
        if stage.use in USES[purpose]:
            chosen.append(stage)
    return chosen


def planned_digests(cfg: Config, purpose: str = "distill") -> dict[str, str]:
    """Each stage's digest as the runner would key it, without running anything, taking a
    consumed stage's record to change exactly when its digest does: what a change of config
    reruns (``--dry-run`` and tests)."""
    results: dict[str, dict] = {}
    for stage in stages_for(recipe_of(cfg), cfg, purpose):
        results[stage.name] = {"digest": Stages.key(stage.name,
                                                     stage_depends(stage, cfg, results))}
    return {name: result["digest"] for name, result in results.items()}


def execute(cfg: Config, stages: "Stages", purpose: str = "distill",
            only: Sequence[str] | None = None) -> Run:
    """Run ``cfg``'s recipe stages for ``purpose`` (all of them, or ``only`` these)."""
    import torch

    recipe = recipe_of(cfg)
    run = Run(cfg, stages)
    # train.threads holds for every stage, not only while training (on a shared CPU, OpenMP
    # threads beyond the free cores slow small ops down many-fold); restored afterwards.
    previous = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        for stage in stages_for(recipe, cfg, purpose):
            if only is not None and stage.name not in only:
                continue
            run.results[stage.name] = stages.run(
                stage.name, stage_depends(stage, cfg, run.results),
                lambda stage_dir, stage=stage: stage.run(run, stage_dir))
    finally:
        torch.set_num_threads(previous)
    return run


class Stages:
    """Resumable, digest-keyed stages under one run directory.

    ``stages.run(name, depends, fn)`` returns ``fn(stage_dir)``'s result dict (JSON-able) with
    its ``"digest"`` added.
    """

    def __init__(self, run_dir: str | os.PathLike, log: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.log = log or (lambda msg: print(msg, flush=True) if rank() == 0 else None)
        self.ran: list[str] = []
        self.skipped: list[str] = []

    @staticmethod
    def key(name: str, depends: dict) -> str:
        return digest({"stage": name, "depends": depends})

    def record(self, name: str) -> dict | None:
        """The finished stage's record, or None."""
        path = self.run_dir / name / STAGE_RECORD
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # an unreadable record is a stage that must run again

    def run(self, name: str, depends: dict[str, Any], fn: Callable[[Path], dict]) -> dict:
        self._honour_preemption(f"before {name}")
        stage_dir = self.run_dir / name
        key = self.key(name, depends)
        done = self.record(name)
        if done is not None and done.get("digest") == key:
            self.skipped.append(name)
            self.log(f"stage {name}: up to date, skipped")
            return done["result"]
        inputs = stage_dir / STAGE_INPUTS
        if rank() == 0:
            if stage_dir.exists() and (not inputs.is_file() or inputs.read_text() != key):
                # Inputs changed since this folder was started: its checkpoints are not ours.
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(inputs, key)
        barrier()
        self.log(f"stage {name}: running")
        start = time.perf_counter()
        result = dict(fn(stage_dir))
        result["digest"] = key
        seconds = time.perf_counter() - start
        if rank() == 0:
            write_atomic(stage_dir / STAGE_RECORD,
                         json.dumps({"digest": key, "seconds": seconds, "result": result},
                                    indent=1, default=str))
        barrier()
        self.ran.append(name)
        self.log(f"stage {name}: done in {seconds:.1f} s")
        self._honour_preemption(f"after {name}")
        return result

    @staticmethod
    def _honour_preemption(where: str) -> None:
        """A SIGTERM/SIGUSR1 that arrived outside a training loop (or at its last step) stops the
        run here, on every rank at once; the finished stages are already recorded."""
        from kdhpc.train import agree_any, preempt, preemption_requested

        if agree_any(preemption_requested()):
            raise preempt(None, None, stage=where)


# ---------------------------------------------------------------------------------------------
# shared pieces of every recipe's declaration

def longer_training_config(cfg: Config, factor: int) -> Config:
    """``cfg`` trained ``factor`` times longer: epochs and ``max_steps`` multiplied, and the
    schedule stretched with the run (a step schedule's ``step_size`` in epochs and the warm-up
    in steps, by the same factor), so a 5x run decays at the same fractions of its run as a 1x
    run; poly and cosine follow the run's length by themselves. Unstretched, a 5x teacher run
    decayed six times and ended at 1e-6 of its learning rate."""
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, epochs=cfg.train.epochs * factor,
                                       max_steps=cfg.train.max_steps * factor),
        schedule=dataclasses.replace(cfg.schedule, step_size=cfg.schedule.step_size * factor,
                                     warmup_steps=cfg.schedule.warmup_steps * factor))


def teacher_training_config(cfg: Config) -> Config:
    """``cfg`` for a recipe's teacher stage: ``train.teacher_epochs_factor`` times longer
    (:func:`longer_training_config`), because a teacher should be trained further than its
    students."""
    return longer_training_config(cfg, cfg.train.teacher_epochs_factor)


def save_gathered(rows: list, path: Path) -> int:
    """Every rank's evaluation ``rows`` gathered in rank order, written once (rank 0) as JSON at
    ``path``; every rank waits for the file and gets the number of rows."""
    from kdhpc.runtime import gather

    rows = gather(rows)
    if rank() == 0:
        write_atomic(path, json.dumps(rows, indent=0))
    barrier()
    return len(rows)


def data_root(cfg: Config) -> Path:
    """The dataset folder; the embedded default set is generated once, by rank 0, while the
    other ranks wait, then every rank reuses it."""
    from kdhpc.data.default import dataset_root

    if rank() == 0:
        dataset_root(cfg)
    barrier()
    return dataset_root(cfg)


def fill_verified_cache(cache_dir: Path, teacher, extract, dataset, data_config: dict,
                        cfg: Config) -> Path:
    """Fill the teacher cache in ``cache_dir`` (resuming a killed fill), then verify every shard
    before trusting it; a cache there that was made for another teacher or data config is
    refused (``CacheError`` naming what changed), never deleted: it may be another run's."""
    from kdhpc.teacher.cache import CacheError, fill_cache, teacher_fingerprint, verify_cache

    fill_cache(cache_dir, teacher, extract, dataset, data_config=data_config,
               dtype=cfg.teacher.cache_dtype, compression=cfg.teacher.compression,
               batch_size=cfg.teacher.fill_batch_size or cfg.eval.batch_size,
               bf16=cfg.teacher.stream_bf16, commit_seconds=cfg.teacher.commit_seconds)
    if rank() == 0:
        problems = verify_cache(cache_dir, teacher_sha256=teacher_fingerprint(teacher),
                                data_config=data_config)
        if problems:
            raise CacheError(f"{cache_dir}: {len(problems)} problem(s), first: {problems[0]}; "
                             f"repair with python -m kdhpc.teacher.cache CONFIG --force")
    barrier()
    return Path(cache_dir)


# What every training stage reads besides its own keys: the data it trains on is consumed as
# the data stage's record.
TRAIN_KEYS = ("optim", "schedule", "train.epochs", "train.max_steps", "train.batch_size",
              "train.grad_accum", "train.grad_clip", "train.precision", "train.zero_stage",
              "train.deepspeed_config", "train.eval_every", "train.best_metric",
              "train.best_mode", "train.seed")
TEACHER_TRAIN_KEYS = (*TRAIN_KEYS, "train.teacher_epochs_factor")


def teacher_checkpoint_extra(cfg: Config) -> dict:
    """A loaded teacher's identity: the SHA-256 of its weights file (a changed file reruns the
    teacher and everything after it)."""
    from kdhpc.teacher.pretrained import resolve_teacher_checkpoint

    _, sha256 = resolve_teacher_checkpoint(cfg)
    return {"checkpoint": cfg.model.teacher_checkpoint, "sha256": sha256}


def teacher_stage(train: Callable[[Run, Path], dict], keys: Sequence[str],
                  cfg: Config, load: Callable[[Run, Path], dict]) -> Stage:
    """The teacher: trained by ``train`` (on ``TEACHER_TRAIN_KEYS`` and ``keys``), or, when
    ``model.teacher_checkpoint`` names weights (a file, or ``pretrained:<name>`` for a shipped one),
    loaded and checked by ``load``."""
    if cfg.model.teacher_checkpoint:
        return Stage("teacher", load, keys=("model.teacher",), consumes=("data",),
                     extra=teacher_checkpoint_extra)
    return Stage("teacher", train, keys=(*TEACHER_TRAIN_KEYS, *keys), consumes=("data",))


def timed_interleaved(calls: dict[str, Callable[[], Any]], repeats: int,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Milliseconds of each call, interleaved round by round after one warm-up round, so that a
    change in the machine's load hits every form alike."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = clock()
            call()
            times[name].append(1e3 * (clock() - start))
    return times


def latency_rows(models: dict[str, Callable[[], Any]], repeats: int,
                 to_device: Callable[[str], None] | None = None) -> list[dict]:
    """Per-call latency of each model, forms interleaved, min and median, at one thread and at
    all threads (and on the GPU when present). ``models`` are zero-argument calls (inputs bound).

    The speed-up of the first model over the last is reported from the minima; a row whose
    speed-up disagrees with the one-thread row by more than 2x is flagged ``unreliable`` (a
    loaded machine descheduling one form's threads), never published bare.
    """
    import torch

    settings: list[tuple[str, int]] = [("cpu", 1), ("cpu", len(os.sched_getaffinity(0)))]
    if torch.cuda.is_available():
        settings.append(("cuda", torch.get_num_threads()))
    previous = torch.get_num_threads()
    names = list(models)
    rows: list[dict] = []
    try:
        for device, threads in settings:
            if to_device is not None:
                to_device(device)
            torch.set_num_threads(threads)
            with torch.inference_mode():
                times = timed_interleaved(models, repeats)
            row: dict[str, Any] = {"device": device, "threads": threads if device == "cpu" else "-",
                                   "load": round(os.getloadavg()[0], 2)}
            for name in names:
                row[f"{name} min ms"] = min(times[name])
                row[f"{name} median ms"] = float(sorted(times[name])[len(times[name]) // 2])
            row["speed-up"] = row[f"{names[0]} min ms"] / row[f"{names[-1]} min ms"]
            rows.append(row)
    finally:
        torch.set_num_threads(previous)
        if to_device is not None:
            to_device("cpu")
    reference = rows[0]["speed-up"]
    for row in rows[1:]:
        ratio = row["speed-up"] / reference
        row["reliable"] = "yes" if 0.5 <= ratio <= 2.0 else (
            f"unreliable: {ratio:.1f}x the 1-thread speed-up")
    rows[0]["reliable"] = "yes"
    return rows
