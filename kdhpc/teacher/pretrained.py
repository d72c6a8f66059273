"""Trained default teachers, shipped inside the package, and the command that makes them.

A KD user starts from a teacher that is already trained; so do kdhpc's default configs. Each
shipped teacher is a weights file in ``kdhpc/teacher/weights/`` pinned in ``manifest.json``
beside it: the file's SHA-256, the architecture, the teacher config that trained it, the data
config it was trained on (and its digest), the commit, the optimiser steps and its validation
metrics. A config names one with ``model.teacher_checkpoint: pretrained:<name>``; loading checks
the file against its SHA-256 and the run's data config against the teacher's, and says what to
do when either does not match. A path to the user's own weights file works as before.

Train (and ship) a teacher::

    python -m kdhpc.teacher.pretrained train configs/teachers/recon_default.yaml [key=value ...]
    python -m kdhpc.teacher.pretrained list

``train`` runs the recipe's data and teacher stages in the config's ``run_dir`` (resumable),
then copies the best weights into ``kdhpc/teacher/weights/<name>.pt`` (``--name``, default the
config file's stem) and records them in the manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from kdhpc.config import Config, ConfigError, digest, load_config, result_values, write_atomic

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"
PREFIX = "pretrained:"
# The config sections a teacher's training data depends on: a run whose values differ would
# distil a teacher that never saw its data (another mask, size or split).
DATA_SECTIONS = ("recipe", "data", "default_data", "mask", "degrade")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_identity(cfg: Config) -> dict:
    """The data config a teacher is trained on (splits, crop, mask, degradation, generator)."""
    values = {name: result_values(getattr(cfg, name)) for name in DATA_SECTIONS}
    values["data"].pop("root", None)  # the same files may live elsewhere on another machine
    return values


def read_manifest() -> dict:
    if not MANIFEST.is_file():
        return {}
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{MANIFEST}: unreadable manifest of the shipped teachers: {err}") from None


def resolve_teacher_checkpoint(cfg: Config) -> tuple[Path, str]:
    """(weights file, its SHA-256) of ``model.teacher_checkpoint``, checked.

    ``pretrained:<name>``: the shipped file must match the manifest's SHA-256 and the run's data
    config the one the teacher was trained on; a path: the file must exist.
    """
    from kdhpc.teacher.cache import describe_changes

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
    command = f"python -m kdhpc.teacher.pretrained train {entry['config']}"
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


def train_and_ship(config_path: str, overrides: list[str], name: str) -> dict:
    """Run the recipe's data and teacher stages, then :func:`ship` the teacher."""
    from kdhpc.config import save_config
    from kdhpc.recipe import Stages, execute, recipe_of
    from kdhpc.runtime import rank
    from kdhpc.train import init_distributed, install_preemption_handlers

    cfg = load_config(config_path, overrides)
    if cfg.model.teacher_checkpoint:
        raise ConfigError(f"model.teacher_checkpoint: expected empty when training a teacher, "
                          f"found {cfg.model.teacher_checkpoint!r}")
    recipe_of(cfg).check(cfg)
    install_preemption_handlers()
    init_distributed()
    if rank() == 0:
        save_config(cfg, cfg.run_dir)
    run = execute(cfg, Stages(cfg.run_dir), only=("data", "teacher"))
    teacher = run.results["teacher"]
    validation = {k: teacher.get(k) for k in ("best_metric", "best_value", "best_step")}
    return ship(cfg, config_path, name, teacher, validation) if rank() == 0 else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdhpc.teacher.pretrained",
                                     description="Train and ship, or list, the default teachers.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a teacher and ship it into the package")
    train.add_argument("config", help="teacher config, e.g. configs/teachers/recon_default.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=80")
    train.add_argument("--name", help="shipped name (default: the config file's stem)")
    sub.add_parser("list", help="print the shipped teachers")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for key, entry in sorted(read_manifest().items()):
                print(f"{PREFIX}{key}: {entry['arch']} ({entry['recipe']}), {entry['steps']} "
                      f"steps, {entry['validation']}, sha256 {entry['sha256'][:12]}")
            return 0
        entry = train_and_ship(args.config, args.overrides, args.name or Path(args.config).stem)
        if entry:
            print(f"shipped {PREFIX}{args.name or Path(args.config).stem}: {entry['file']} "
                  f"sha256 {entry['sha256']}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
