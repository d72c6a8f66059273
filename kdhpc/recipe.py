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
from kdhpc.runtime import barrier, rank, world_size

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

    def network(self, stage: str) -> Any:
        """The network stage ``stage`` trained or loaded (:func:`load_network` of its record's
        ``arch`` and ``weights``), built once per run."""
        result = self.results[stage]
        return self.memo(("network", stage), lambda: load_network(
            result["arch"], self.path(result["weights"]), self.cfg))


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


def split_folder(cfg: Config, root: Path, split: str) -> Path:
    """The folder of ``split``: ``<challenge>_<split>`` (fastMRI) or ``<split>``; KD-MRI's
    ``validation`` also answers to ``val``."""
    names = [f"{cfg.data.challenge}_{split}", split]
    if cfg.data.dataset == "kdmri" and split == "val":
        names.append("validation")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise ConfigError(f"data.root: expected one of the folders {', '.join(names)} under {root} "
                      f"for split {split!r}, found none")


def train_network(cfg: Config, stage_dir: Path, arch: str, loss_fn: Callable, train_set,
                  val_set=None, *, build: Callable[[str], Any] | None = None,
                  teacher: Callable[[], Any] | None = None, eval_fn: Callable | None = None,
                  volume_metrics: Callable | None = None,
                  init: str | None = None) -> dict:
    """Every training stage: ``arch`` built by ``build`` (default: the registry or a factory,
    :func:`kdhpc.models.external.build_run_network`) from the seed's initial weights (the same
    on every rank and in every stage, so students differ only by their loss), or from the
    weights file ``init`` (relative to the run directory), trained by the engine in
    ``stage_dir``; ``teacher()`` makes its teacher source once the student is built (a teacher
    built there draws its initial weights after the student's). Returns the stage record
    (weights relative to the run directory)."""
    from kdhpc.models import count_parameters
    from kdhpc.models.external import build_run_network
    from kdhpc.teacher import teacher_fingerprint
    from kdhpc.train import load_weights, seed_everything, train

    seed_everything(cfg.train.seed)
    model = (build or (lambda a: build_run_network(cfg.model, a)))(arch)
    if init is not None:
        model.load_state_dict(load_weights(Path(cfg.run_dir) / init))
    result = train(cfg, model, loss_fn, train_set, val_set=val_set,
                   teacher=teacher() if teacher is not None else None, eval_fn=eval_fn,
                   volume_metrics=volume_metrics, run_dir=stage_dir)
    return {"arch": arch, "weights": str(result.best_weights.relative_to(cfg.run_dir)),
            "sha256": teacher_fingerprint(load_weights(result.best_weights)), "trained": True,
            "params": count_parameters(model), "steps": result.steps,
            "resumed_from": result.resumed_from, "best_metric": result.best_metric,
            "best_value": result.best_value, "best_step": result.best_step}


def load_network(arch: str, weights: str | os.PathLike, cfg: Config | None = None,
                 foreign: bool | None = None):
    """``arch`` with the weights at ``weights`` (eval mode), built and loaded as
    :func:`kdhpc.models.external.load_run_network` does with ``cfg``'s model section (factory
    keyword arguments; ``model.teacher_checkpoint`` in its layouts, or a TorchScript /
    torch.export teacher); without ``cfg``: the network with its defaults and a plain state
    dict."""
    from kdhpc.models.external import load_run_network

    if cfg is None:
        return load_run_network(Config().model, arch, weights, foreign=False)
    return load_run_network(cfg.model, arch, weights, foreign=foreign)


def load_teacher(load: Callable[[Config, str, Path], Any]) -> Callable[["Run", Path], dict]:
    """The teacher stage of a run with ``model.teacher_checkpoint``: the file resolved and
    checked (:func:`kdhpc.teacher.pretrained.resolve_teacher_checkpoint`), loaded by the
    recipe's ``load(cfg, arch, path)`` (which names the file on a mismatch)."""
    def run_stage(run: "Run", stage_dir: Path) -> dict:
        from kdhpc.models import count_parameters
        from kdhpc.teacher import teacher_fingerprint
        from kdhpc.teacher.pretrained import resolve_teacher_checkpoint

        path, sha256 = resolve_teacher_checkpoint(run.cfg)
        model = load(run.cfg, run.cfg.model.teacher, path)
        return {"arch": run.cfg.model.teacher, "weights": str(path), "file_sha256": sha256,
                "sha256": teacher_fingerprint(model), "params": count_parameters(model),
                "steps": 0, "trained": False}
    return run_stage


def teacher_weights(cfg: Config) -> Path:
    """The teacher's weights outside a run (``python -m kdhpc.teacher.cache``):
    ``model.teacher_checkpoint``, else those of the run's finished teacher stage."""
    from kdhpc.teacher.pretrained import resolve_teacher_checkpoint

    if cfg.model.teacher_checkpoint:
        return resolve_teacher_checkpoint(cfg)[0]
    record = Path(cfg.run_dir) / "teacher" / STAGE_RECORD
    if not record.is_file():
        raise ConfigError(f"model.teacher_checkpoint: expected teacher weights or a finished "
                          f"teacher stage ({record}), found neither; run python -m kdhpc.distill "
                          f"CONFIG first")
    return Path(cfg.run_dir) / json.loads(record.read_text())["result"]["weights"]


def cache_stage(cfg: Config, teacher, extract: Callable, views, data_config: dict | None = None,
                cache_dir: Path | None = None) -> dict:
    """The teacher-cache stage body: with ``teacher.mode: precompute`` the cache filled and
    verified in ``cache_dir`` (default :func:`kdhpc.teacher.default_cache_dir`, the stage's own
    folder) for ``data_config`` (default :func:`kdhpc.teacher.cache_config`); with ``stream`` a
    record of the teacher only."""
    from kdhpc.teacher import cache_config, default_cache_dir, teacher_fingerprint

    record = {"mode": cfg.teacher.mode, "teacher_sha256": teacher_fingerprint(teacher)}
    if cfg.teacher.mode == "stream":
        return record
    path = fill_verified_cache(cache_dir or default_cache_dir(cfg), teacher, extract, views,
                               data_config or cache_config(cfg), cfg)
    return {**record, "cache_dir": str(path), "records": len(views) * views.num_views}


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


def evaluate_volumes(views, models: dict[str, Any], batch_size: int,
                     predict: Callable[[Any, dict], Any],
                     score: Callable[[str, list[int], dict, dict], list[dict]],
                     volume_name: Callable[[int], str] | None = None,
                     predictions: Path | None = None,
                     keep: Callable[[dict], dict] | None = None) -> list[dict]:
    """Every recipe's evaluation loop: the volumes of ``views`` at view 0, each volume whole on
    one rank (:func:`kdhpc.train.rank_volume_indices`); its slices in batches of ``batch_size``
    through ``predict(model, batch)`` for every model (inference mode), then
    ``score(volume, indices, batch, predictions)`` -> rows, with ``batch`` all the volume's
    slices collated and ``predictions`` model name -> ``[S, ...]`` tensor. ``volume_name(index)``
    names an item's volume (default ``str(views.volume_of(index))``).

    With ``predictions`` (a path) every prediction is written there volume by volume (HDF5,
    through a temporary name; float64 kept as float32: figures and re-checks read them, the
    scores are computed before) as ``<model>/<volume>``, beside ``index/<volume>`` (the items'
    dataset indices) and the arrays ``keep(batch)`` adds as ``<key>/<volume>``. Returns this
    rank's rows (:func:`save_gathered` collects every rank's)."""
    import contextlib

    import h5py
    import numpy as np
    import torch
    from torch.utils.data import default_collate

    from kdhpc.train import rank_volume_indices, volume_ids

    volumes = volume_ids(views)
    by_volume: dict[int, list[int]] = {}
    for index in rank_volume_indices(volumes, rank(), world_size()):
        by_volume.setdefault(volumes[index], []).append(index)
    rows: list[dict] = []
    tmp = None if predictions is None else predictions.with_name(f".{predictions.name}.tmp")
    with (contextlib.nullcontext() if tmp is None else h5py.File(tmp, "w")) as kept, \
            torch.inference_mode():
        for items in by_volume.values():
            name = volume_name(items[0]) if volume_name else str(views.volume_of(items[0]))
            batch = default_collate([views.get_view(i, 0) for i in items])
            parts = [{key: value[k:k + batch_size] for key, value in batch.items()}
                     for k in range(0, len(items), batch_size)]
            outputs = {key: torch.cat([predict(model, part) for part in parts])
                       for key, model in models.items()}
            rows += score(name, items, batch, outputs)
            if kept is not None:
                arrays = {"index": torch.tensor(items), **(keep(batch) if keep else {}),
                          **outputs}
                for key, value in arrays.items():
                    value = value.cpu().numpy()
                    kept[f"{key}/{name}"] = (value.astype(np.float32)
                                             if value.dtype == np.float64 else value)
    if tmp is not None:
        tmp.replace(predictions)
    return rows


def read_predictions(files, volume: str | None = None) -> dict[str, Any]:
    """The arrays :func:`evaluate_volumes` kept in ``files`` (every rank's), ``<key>/<volume>``
    -> numpy array; only ``volume``'s when given."""
    import h5py

    out: dict[str, Any] = {}
    for path in files:
        with h5py.File(path, "r") as f:
            for key in f:
                for name in f[key] if volume is None else [volume]:
                    if name in f[key]:
                        out[f"{key}/{name}"] = f[key][name][()]
    return out


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


def network_latency(networks: dict[str, Any], batch: dict, call: Callable[[Any, dict], Any],
                    repeats: int) -> list[dict]:
    """:func:`latency_rows` of ``call(network, batch)`` for each network on one batch (of one
    slice), the networks and the batch's tensors moved to each device in turn."""
    import torch

    moved = {"batch": batch}

    def to_device(device: str) -> None:
        for network in networks.values():
            network.to(device).eval()
        moved["batch"] = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                          for k, v in batch.items()}

    return latency_rows({name: (lambda net=net: call(net, moved["batch"]))
                         for name, net in networks.items()}, repeats, to_device)


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
