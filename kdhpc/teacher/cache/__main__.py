"""``python -m kdhpc.teacher.cache``: fill, verify or repair a recipe's teacher cache.

Run::

    python -m kdhpc.teacher.cache CONFIG [key=value ...] [--force] [--verify]
    torchrun --nproc-per-node=4 -m kdhpc.teacher.cache CONFIG        # or srun, one task per GPU

The command line lives in its own module, above the recipe layer it asks for the teacher, its
``extract`` function and the training views (``Recipe.cache_parts``), so that the cache library
(:mod:`kdhpc.teacher.cache`) imports nothing of the recipes; running it does not re-execute the
library module either (runpy would warn and hold two copies of it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdhpc.config import Config, ConfigError, load_config
from kdhpc.recipe import recipe_of
from kdhpc.runtime import rank
from kdhpc.teacher.cache import (CacheError, CacheParts, CacheProblem, cache_config,
                                 default_cache_dir, fill_cache, teacher_fingerprint,
                                 verify_cache)


def _cache_parts(cfg: Config) -> CacheParts:
    """The recipe's teacher, ``extract`` function and training views (``Recipe.cache_parts``)."""
    recipe = recipe_of(cfg)
    if recipe.cache_parts is None:
        raise ConfigError(f"recipe: {cfg.recipe!r} has no teacher cache (it distils no teacher "
                          f"outputs); call kdhpc.teacher.cache.fill_cache(...) from Python "
                          f"instead")
    parts = recipe.cache_parts(cfg)
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise TypeError(f"recipe {cfg.recipe!r} cache_parts: expected (teacher, extract, "
                        f"dataset), found {type(parts).__name__}")
    return CacheParts(*parts)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors in what the user gave (config, files, data), reported as one line, exit 2."""
    from kdhpc.data.default import DefaultDataError
    from kdhpc.data.fastmri import DataFormatError
    from kdhpc.train import CheckpointRefused

    return (ConfigError, CacheError, DataFormatError, DefaultDataError, CheckpointRefused,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    """Fill, verify (``--verify``) or repair (``--force``) the teacher cache of a config.

    Exit status: 0 when the cache is complete and intact, 1 when ``--verify`` (or the check
    after ``--force``) finds problems (one line each, naming the shard), 2 on bad input (one
    line on stderr naming the key or path, what was expected and what was found).
    """
    prog = "python -m kdhpc.teacher.cache"
    parser = argparse.ArgumentParser(
        prog=prog, description="Fill, verify or repair a run's teacher cache: the frozen "
        "teacher's targets for every view of every training sample (teacher.mode: precompute).",
        epilog="Under torchrun or srun each rank fills its own shard. Exit status: 0 complete "
        "and intact, 1 problems found (listed), 2 bad input.")
    parser.add_argument("config", help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. teacher.cache_dtype=float32")
    parser.add_argument("--force", action="store_true",
                        help="check every finished shard and recompute exactly its damaged rows "
                        "(or a shard HDF5 cannot read), then verify; a cache made for another "
                        "teacher or config is never deleted")
    parser.add_argument("--verify", action="store_true",
                        help="check every shard (each record's CRC-32, each file's SHA-256) and "
                        "list each bad or missing one; computes nothing")
    args = parser.parse_args(argv)
    try:
        return _run_cli(args)
    except _user_errors() as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def _run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    cache_dir = default_cache_dir(cfg)
    if args.verify:
        return _report(cache_dir, verify_cache(cache_dir, data_config=cache_config(cfg)),
                       "every shard intact")
    from kdhpc.train import ensure_stderr_logging, init_distributed

    ensure_stderr_logging()  # a repair says what it recomputes
    init_distributed()  # first: the recipe layer may build data or place the teacher per rank
    parts = _cache_parts(cfg)
    fill_cache(cache_dir, parts.teacher, parts.extract, parts.dataset,
               data_config=cache_config(cfg), dtype=cfg.teacher.cache_dtype,
               compression=cfg.teacher.compression,
               batch_size=cfg.teacher.fill_batch_size or cfg.eval.batch_size,
               bf16=cfg.teacher.stream_bf16, force=args.force,
               commit_seconds=cfg.teacher.commit_seconds,
               progress=cfg.train.progress and rank() == 0)
    if rank() != 0:
        return 0
    # Claim completeness only for what was checked, whether this run computed it or not.
    problems = verify_cache(cache_dir, teacher_sha256=teacher_fingerprint(parts.teacher),
                            data_config=cache_config(cfg))
    return _report(cache_dir, problems, "teacher cache complete and verified")


def _report(cache_dir: Path, problems: list[CacheProblem], ok: str) -> int:
    for problem in problems:
        print(problem)
    if problems:
        print(f"{cache_dir}: {len(problems)} problem(s); repair with python -m "
              f"kdhpc.teacher.cache CONFIG --force")
        return 1
    print(f"{cache_dir}: {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
