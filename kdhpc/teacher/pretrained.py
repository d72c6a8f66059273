"""Trained default teachers, shipped inside the package, and the command that makes them.

A KD user starts from a teacher that is already trained; so do kdhpc's default configs. Each
shipped teacher is a weights file in ``kdhpc/teacher/weights/`` pinned in ``manifest.json``
beside it: the file's SHA-256, the architecture, the teacher config that trained it, the data
config it was trained on (and its digest), the commit, the optimiser steps and its validation
metrics. A config names one with ``model.teacher_checkpoint: pretrained:<name>``; loading checks
the file against its SHA-256 and the run's data config against the teacher's, and says what to
do when either does not match. A path to the user's own weights file works as before.

Train (and ship) a teacher with ``python -m kdhpc.teacher.ship`` (:mod:`kdhpc.teacher.ship`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

from kdhpc.config import (Config, ConfigError, describe_changes, digest, result_values, sha256_file,
                          write_atomic)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"
PREFIX = "pretrained:"
# The config sections a teacher's training data depends on: a run whose values differ would
# distil a teacher that never saw its data (another mask, size or split).
DATA_SECTIONS = ("recipe", "data", "default_data", "mask", "degrade")


def data_identity(cfg: Config) -> dict:
    """The data config a teacher is trained on (splits, crop, mask, degradation, generator)."""
    values = {name: result_values(getattr(cfg, name)) for name in DATA_SECTIONS}
    values["data"].pop("root", None)  # the same files may live elsewhere on another machine
    # Extra target-free volumes: the teacher's train/val/test files stay the same ones.
    values["data"].pop("unlabelled_split", None)
    values["default_data"].pop("brain_unlabelled_subjects", None)
    return values


def read_manifest() -> dict:
    if not MANIFEST.is_file():
        return {}
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{MANIFEST}: unreadable manifest of the shipped teachers: "
                          f"{err}") from None


def resolve_teacher_checkpoint(cfg: Config) -> tuple[Path, str]:
    """(weights file, its SHA-256) of ``model.teacher_checkpoint``, checked.

    ``pretrained:<name>``: the shipped file must match the manifest's SHA-256 and the run's data
    config the one the teacher was trained on; a path: the file must exist.
    """
    spec = cfg.model.teacher_checkpoint
    if not spec.startswith(PREFIX):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"model.teacher_checkpoint: expected a weights file or "
                              f"{PREFIX}<name>, found {spec!r} (no such file)")
        return path.resolve(), sha256_file(path)
    name = spec[len(PREFIX):]
    manifest = read_manifest()
    if name not in manifest:
        raise ConfigError(f"model.teacher_checkpoint: expected one of the shipped teachers "
                          f"{', '.join(PREFIX + n for n in sorted(manifest)) or '(none)'}, "
                          f"found {spec!r}")
    entry = manifest[name]
    path = WEIGHTS_DIR / entry["file"]
    command = f"python -m kdhpc.teacher.ship {entry['config']}"
    if not path.is_file():
        raise ConfigError(f"{path}: the shipped teacher {name!r} is missing; reinstall kdhpc or "
                          f"train it again with `{command}`")
    sha = sha256_file(path)
    if sha != entry["sha256"]:
        raise ConfigError(f"{path}: expected SHA-256 {entry['sha256']} (manifest), found {sha}: "
                          f"the shipped teacher file was changed or damaged; reinstall kdhpc or "
                          f"train it again with `{command}`")
    if cfg.model.teacher != entry["arch"]:
        raise ConfigError(f"model.teacher: expected {entry['arch']!r} for {spec}, found "
                          f"{cfg.model.teacher!r}")
    changed = describe_changes(entry["data"], data_identity(cfg))
    if changed:
        raise ConfigError(f"model.teacher_checkpoint: {spec} was trained on other data than this "
                          f"run's ({'; '.join(changed[:6])}); train a teacher for this data with "
                          f"`{command} <the same data overrides>` and set "
                          f"model.teacher_checkpoint to its weights (or {PREFIX}<its name>)")
    return path, sha


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def ship(cfg: Config, config_path: str, name: str, teacher: dict, validation: dict) -> dict:
    """Copy a trained teacher's weights into the package and pin them in the manifest."""
    source = Path(teacher["weights"])
    source = source if source.is_absolute() else Path(cfg.run_dir) / source
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    target = WEIGHTS_DIR / f"{name}.pt"
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    entry = {"file": target.name, "sha256": sha256_file(target), "arch": cfg.model.teacher,
             "recipe": cfg.recipe, "config": config_path, "data": data_identity(cfg),
             "data_digest": digest(data_identity(cfg)), "commit": _commit(),
             "steps": teacher.get("steps"), "params": teacher.get("params"),
             "validation": validation,
             "train": {"optim": dataclasses.asdict(cfg.optim),
                       "schedule": dataclasses.asdict(cfg.schedule),
                       "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                       "seed": cfg.train.seed}}
    manifest = read_manifest()
    manifest[name] = entry
    write_atomic(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return entry
