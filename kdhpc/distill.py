"""Run a distillation recipe end to end: ``python -m kdhpc.distill CONFIG [key=value ...]``.

One process (a laptop CPU) or many: ``torchrun --nproc-per-node=N -m kdhpc.distill CONFIG`` or
``sbatch slurm/distill.sh CONFIG`` (one task per GPU; ranks from the SLURM variables).

A recipe (``config.recipe``: reconstruction, superres, enhancement, segmentation, data) is a
module in ``kdhpc/recipes/`` with ``run(cfg, stages) -> dict`` and, for the teacher-cache CLI,
``teacher_cache_parts(cfg) -> (teacher, extract, dataset of views)``. Its work is a chain of
named :class:`Stages` (teacher, cache, student baseline, KD stages, evaluation, report), each
resumable:

- a stage's identity is a digest of what it depends on (the config subtrees it reads and the
  results of the stages it builds on); a rerun skips a finished stage whose digest is unchanged
  and reruns one whose inputs changed, and then everything downstream of it, because their
  digests include its result;
- an unfinished stage resumes from its own checkpoints (the engine resumes automatically from
  ``<run_dir>/<stage>/checkpoints``); a stage whose inputs changed starts from an empty folder.

The resolved config is written to ``<run_dir>/config.yaml``. Rank 0 writes every stage record;
all ranks run every stage (training stages are distributed by the engine).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from kdhpc.config import Config, ConfigError, digest, load_config, save_config, write_atomic

RECIPES = {
    "reconstruction": "kdhpc.recipes.reconstruction",
    "superres": "kdhpc.recipes.reconstruction",
    "enhancement": "kdhpc.recipes.enhancement",
    "segmentation": "kdhpc.recipes.segmentation",
    "data": "kdhpc.data.default",
}

STAGE_RECORD = "stage.json"
STAGE_INPUTS = ".inputs"


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def from_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its (picklable) result on every rank: stage results must agree."""
    result = fn() if rank() == 0 else None
    if world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def gather(rows: list) -> list:
    """Every rank's ``rows`` concatenated in rank order."""
    if world_size() == 1:
        return rows
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


class Stages:
    """Resumable, digest-keyed stages under one run directory.

    ``stages.run(name, depends, fn)`` returns ``fn(stage_dir)``'s result dict (JSON-able) with
    its ``"digest"`` added; pass that result inside a later stage's ``depends`` to chain them.
    """

    def __init__(self, run_dir: str | os.PathLike, log: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.log = log or (lambda msg: print(msg, flush=True) if rank() == 0 else None)
        self.ran: list[str] = []
        self.skipped: list[str] = []

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
        key = digest({"stage": name, "depends": depends})
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


def teacher_training_config(cfg: Config) -> Config:
    """``cfg`` for a recipe's teacher stage: ``train.teacher_epochs_factor`` times the epochs
    (and ``max_steps``), because a teacher should be trained further than its students."""
    factor = cfg.train.teacher_epochs_factor
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, epochs=cfg.train.epochs * factor, max_steps=cfg.train.max_steps * factor))


def recipe_module(cfg: Config):
    """The module that implements ``cfg.recipe``."""
    return importlib.import_module(RECIPES[cfg.recipe])


def teacher_cache_parts(cfg: Config):
    """(teacher, extract, dataset of views) for ``python -m kdhpc.teacher.cache``."""
    module = recipe_module(cfg)
    parts = getattr(module, "teacher_cache_parts", None)
    if parts is None:
        raise ConfigError(f"recipe: {cfg.recipe!r} has no teacher cache (it distils no teacher "
                          f"outputs)")
    return parts(cfg)


def run(cfg: Config) -> dict:
    """Run ``cfg``'s recipe in ``cfg.run_dir`` and return its summary."""
    from kdhpc.train import init_distributed, install_preemption_handlers

    install_preemption_handlers()
    init_distributed()
    if rank() == 0:
        save_config(cfg, cfg.run_dir)
    barrier()
    return recipe_module(cfg).run(cfg, Stages(cfg.run_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdhpc.distill",
                                     description="Run a distillation recipe end to end.")
    parser.add_argument("config", help="YAML config, e.g. configs/recon_default.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.alpha=0.5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from kdhpc.train import Preempted, ignore_preemption_signals

    try:
        run(cfg)
    except Preempted as stop:  # checkpointed on SIGTERM/SIGUSR1: let SLURM requeue us
        return int(stop.code)
    finally:
        ignore_preemption_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
