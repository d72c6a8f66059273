"""Preemption drills for tests: SIGTERM sent from inside the training loop at a chosen step.

kdhpc's production loop has no drill switch; it calls the callbacks of
:data:`kdhpc.train.step_callbacks` after every optimiser step, and this module puts one there.

In-process (pytest)::

    monkeypatch.setattr(T, "step_callbacks", [sigterm_at_step(1)])

As a launcher, for a child process or every rank of a torchrun job; it installs the drill and
then runs the module (``-m``) or script as ``python -m`` / ``python`` would::

    python tests/drills.py --sigterm-at-step 2 --rank 1 -m kdhpc.distill CONFIG ...
    torchrun --nproc-per-node=2 tests/drills.py --sigterm-at-step 2 --rank 1 SCRIPT ARGS...
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
from typing import Callable


def sigterm_at_step(step: int, rank: int | None = None) -> Callable[[int, int], None]:
    """A step callback sending this process SIGTERM once optimiser step ``step`` is done (on
    ``rank`` only, when given). The loop then checkpoints at the next step boundary."""

    def drill(done: int, this_rank: int) -> None:
        if done == step and (rank is None or this_rank == rank):
            os.kill(os.getpid(), signal.SIGTERM)

    return drill


VALUED = ("--sigterm-at-step", "--rank")  # drill options followed by a value


def _split(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(drill options, module or None, the target's argv) from ``argv``: drill options come
    first; ``-m MODULE`` or the first bare word (a script) starts the target, whose own options
    (even ``--help``) pass through untouched."""
    for i, arg in enumerate(argv):
        if arg == "-m":
            return argv[:i], (argv[i + 1] if i + 1 < len(argv) else ""), argv[i + 2:]
        if not arg.startswith("-") and (i == 0 or argv[i - 1] not in VALUED):
            return argv[:i], None, argv[i:]
    return argv, None, []


def main(argv: list[str] | None = None) -> None:
    own, module, target = _split(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python tests/drills.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --sigterm-at-step K [--rank R] "
                                           "(-m MODULE | SCRIPT) [ARGS...]")
    parser.add_argument("--sigterm-at-step", type=int, required=True, metavar="K")
    parser.add_argument("--rank", type=int, default=None, help="only this rank (default: all)")
    args = parser.parse_args(own)
    if not module and not target:
        parser.error("expected -m MODULE or a SCRIPT to run")
    from kdhpc import train

    train.step_callbacks.append(sigterm_at_step(args.sigterm_at_step, args.rank))
    if module:
        sys.argv = [module, *target]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(target)
        sys.path[0] = os.path.dirname(os.path.abspath(target[0]))
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
