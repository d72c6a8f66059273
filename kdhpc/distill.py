"""Run a distillation recipe end to end: ``python -m kdhpc.distill CONFIG [key=value ...]``.

One process (a laptop CPU) or many: ``torchrun --nproc-per-node=N -m kdhpc.distill CONFIG`` or
``sbatch slurm/distill.sh CONFIG`` (one task per GPU; ranks from the SLURM variables).

``config.recipe`` names a recipe declaration (:mod:`kdhpc.recipe`: reconstruction, superres,
enhancement, segmentation). Its checks run before anything is written, so a config it cannot
run leaves an existing run directory exactly as it was; then its stages run, each resumable
and skipped when its inputs are unchanged, and the recipe's result table is printed (also when
every stage was up to date). The resolved config is written to ``<run_dir>/config.yaml``.
Errors in the config or the data end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from kdhpc.config import Config, ConfigError, load_config, save_config
from kdhpc.recipe import Stages, execute, preflight
from kdhpc.runtime import barrier, rank


def run(cfg: Config, stages: Stages | None = None) -> dict:
    """Run ``cfg``'s recipe in ``cfg.run_dir`` (through ``stages`` when given, e.g. a quiet
    one); return the stage results, the printed summary under ``"summary"``."""
    from kdhpc.train import init_distributed, install_preemption_handlers

    recipe = preflight(cfg)
    install_preemption_handlers()
    init_distributed()
    if rank() == 0:
        save_config(cfg, cfg.run_dir)
    barrier()
    done = execute(cfg, stages or Stages(cfg.run_dir))
    text = recipe.summary(done) if rank() == 0 else ""
    if text:
        print(f"\n{text}", flush=True)
    return {**done.results, "summary": text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdhpc.distill",
                                     description="Run a distillation recipe end to end.")
    parser.add_argument("config", help="YAML config, e.g. configs/recon_default.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.alpha=0.5")
    args = parser.parse_args(argv)
    from kdhpc.data.fastmri import DataFormatError
    from kdhpc.data.default import DefaultDataError
    from kdhpc.teacher.cache import CacheError
    from kdhpc.train import (CheckpointRefused, Preempted, ensure_stderr_logging,
                             ignore_preemption_signals)

    ensure_stderr_logging()  # resume and repair messages
    try:
        run(load_config(args.config, args.overrides))
    except (ConfigError, DataFormatError, DefaultDataError, CacheError, CheckpointRefused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:  # checkpointed on SIGTERM/SIGUSR1: let SLURM requeue us
        return int(stop.code)
    finally:
        ignore_preemption_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
