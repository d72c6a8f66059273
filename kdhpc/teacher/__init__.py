"""Teacher outputs for distillation: one interface, two sources.

A *teacher source* has ``targets(batch) -> dict[str, Tensor]``: for a batch of views (carrying
int64 ``index`` and ``view`` [B], see :mod:`kdhpc.train`) it returns what the KD loss needs.

- :class:`StreamTeacher` (``teacher.mode: stream``): the frozen teacher runs on the batch's
  exact views, in eval/inference mode (optionally bf16), outside the DeepSpeed engine.
- :class:`CachedTeacher` (``teacher.mode: precompute``): the targets were computed once by
  :func:`fill_cache` (``python -m kdhpc.teacher.cache CONFIG``) for every view of every sample
  and are read back from HDF5 shards, checked against the teacher's SHA-256, the data/view
  config and per-record CRC-32s. :func:`verify_cache` checks a whole cache before it is
  trusted; ``fill_cache(..., force=True)`` repairs what it finds.

:func:`teacher_source` picks one from a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from kdhpc.config import Config
from kdhpc.teacher.cache import (CacheError, CachedTeacher, CacheParts, CacheProblem,
                                 cache_config, default_cache_dir, fill_cache,
                                 teacher_fingerprint, verify_cache)
from kdhpc.teacher.stream import Extract, StreamTeacher

__all__ = ["TeacherSource", "StreamTeacher", "CachedTeacher", "CacheError", "CacheParts",
           "CacheProblem", "fill_cache", "verify_cache", "teacher_fingerprint", "cache_config",
           "default_cache_dir", "teacher_source"]


class TeacherSource(Protocol):
    def targets(self, batch: dict) -> dict[str, torch.Tensor]: ...


def teacher_source(cfg: Config, teacher: nn.Module | None = None,
                   extract: Extract | None = None, cache_dir: Path | None = None,
                   data_config: dict | None = None) -> TeacherSource:
    """The source ``cfg.teacher.mode`` asks for.

    stream: needs ``teacher`` and ``extract``. precompute: opens ``cache_dir`` (default
    ``default_cache_dir(cfg)``), refusing it unless it was filled for ``data_config`` (default
    ``cache_config(cfg)``) and, when ``teacher`` is given (recommended), for these exact teacher
    weights.
    """
    if cfg.teacher.mode == "stream":
        if teacher is None or extract is None:
            raise ValueError("teacher.mode=stream: teacher_source needs the teacher module and "
                             "its extract function")
        return StreamTeacher(teacher, extract, bf16=cfg.teacher.stream_bf16)
    return CachedTeacher(cache_dir or default_cache_dir(cfg),
                         teacher_sha256=teacher_fingerprint(teacher) if teacher is not None else None,
                         data_config=data_config or cache_config(cfg))
