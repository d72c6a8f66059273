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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tests/drills.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigterm-at-step", type=int, required=True, metavar="K")
    parser.add_argument("--rank", type=int, default=None, help="only this rank (default: all)")
    parser.add_argument("-m", dest="module", help="run this module as __main__")
    parser.add_argument("target", nargs=argparse.REMAINDER,
                        help="SCRIPT ARGS... (or the module's ARGS... with -m)")
    args = parser.parse_args(argv)
    if not args.module and not args.target:
        parser.error("expected -m MODULE or a SCRIPT to run")
    from kdhpc import train

    train.step_callbacks.append(sigterm_at_step(args.sigterm_at_step, args.rank))
    if args.module:
        sys.argv = [args.module, *args.target]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args.target)
        sys.path[0] = os.path.dirname(os.path.abspath(args.target[0]))
        runpy.run_path(args.target[0], run_name="__main__")


if __name__ == "__main__":
    main()
