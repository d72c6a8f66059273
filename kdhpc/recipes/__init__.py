"""The three published recipes, one module each, driven by ``python -m kdhpc.distill``.

Each module provides ``run(cfg, stages) -> dict`` (a chain of resumable stages, see
:class:`kdhpc.distill.Stages`) and, where a teacher's outputs are distilled,
``teacher_cache_parts(cfg) -> (teacher, extract, dataset of views)`` for
``python -m kdhpc.teacher.cache``.
"""
