"""Where this process stands among the ranks: rank, world size, barriers, rank-0 results.

A leaf module (it imports nothing of kdhpc), so that the engine (:mod:`kdhpc.train`), the
teacher cache (:mod:`kdhpc.teacher.cache`) and the recipe runner (:mod:`kdhpc.recipe`) share
one copy without importing each other. Without torch.distributed every helper answers as the
only rank of one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist


def distributed() -> bool:
    """Whether a process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without torch.distributed)."""
    return dist.get_world_size() if distributed() else 1


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
