"""Train a default teacher and ship it into the package, or list the shipped ones.

Run::

    python -m kdhpc.teacher.ship configs/teachers/recon_default.yaml [key=value ...] [--name N]
    python -m kdhpc.teacher.ship --list

The recipe's data and teacher stages run in the config's ``run_dir`` (resumable, like any
``kdhpc.distill`` run); the best weights are then copied into ``kdhpc/teacher/weights/<name>.pt``
(``--name``, default the config file's stem) and pinned in the manifest beside them
(:mod:`kdhpc.teacher.pretrained`), with the config, the data identity, the commit, the steps and
the validation metric. A config then names the teacher as ``pretrained:<name>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdhpc.config import ConfigError, load_config, save_config
from kdhpc.recipe import Stages, execute, preflight
from kdhpc.runtime import rank
from kdhpc.teacher.pretrained import PREFIX, read_manifest, ship


def train_and_ship(config_path: str, overrides: list[str], name: str) -> dict:
    """Run the recipe's data and teacher stages, then :func:`ship` the teacher."""
    from kdhpc.train import init_distributed, install_preemption_handlers

    cfg = load_config(config_path, overrides)
    if cfg.model.teacher_checkpoint:
        raise ConfigError(f"model.teacher_checkpoint: expected empty when training a teacher, "
                          f"found {cfg.model.teacher_checkpoint!r}")
    preflight(cfg)
    install_preemption_handlers()
    init_distributed()
    if rank() == 0:
        save_config(cfg, cfg.run_dir)
    run = execute(cfg, Stages(cfg.run_dir), only=("data", "teacher"))
    teacher = run.results["teacher"]
    validation = {k: teacher.get(k) for k in ("best_metric", "best_value", "best_step")}
    return ship(cfg, config_path, name, teacher, validation) if rank() == 0 else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdhpc.teacher.ship",
                                     description="Train a teacher and ship it into the package.")
    parser.add_argument("config", nargs="?",
                        help="teacher config, e.g. configs/teachers/recon_default.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=80")
    parser.add_argument("--name", help="shipped name (default: the config file's stem)")
    parser.add_argument("--list", action="store_true", help="print the shipped teachers")
    args = parser.parse_args(argv)
    if not args.list and not args.config:
        parser.error("expected a teacher config (or --list)")
    try:
        if args.list:
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
