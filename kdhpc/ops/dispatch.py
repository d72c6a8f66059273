"""Choosing between an op's fast path and its plain-PyTorch reference.

Every op in ``kdhpc.ops`` takes ``impl="auto" | "fast" | "reference"``:

- ``"auto"`` uses the fast path where the op says it is available for the input's device
  (Triton kernels: CUDA tensors; the C++/CUDA extension: wherever it loaded), else the reference;
- ``"fast"`` forces the fast path and raises if it is unavailable;
- ``"reference"`` forces the reference.

A process-wide override (``force_impl`` or the ``KDHPC_IMPL`` environment variable) replaces
``"auto"`` for every op, so that a whole training run or test can be pinned to one path for
parity checks; an explicit ``"fast"`` / ``"reference"`` argument still wins over it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

IMPLS = ("auto", "fast", "reference")

_override: str | None = None


def _env_override() -> str | None:
    value = os.environ.get("KDHPC_IMPL", "").strip() or None
    if value is not None and value not in IMPLS:
        raise ValueError(f"environment variable KDHPC_IMPL: expected one of {IMPLS}, "
                         f"found {value!r}")
    return value


def set_impl(impl: str | None) -> None:
    """Set (or with None clear) the process-wide choice that replaces ``impl="auto"``."""
    global _override
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS} or None, found {impl!r}")
    _override = impl


@contextlib.contextmanager
def force_impl(impl: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_impl`; restores the previous choice on exit."""
    global _override
    previous = _override
    set_impl(impl)
    try:
        yield
    finally:
        _override = previous


def resolve(op: str, impl: str, fast_available: Callable[[bool], bool | str]) -> str:
    """Return ``"fast"`` or ``"reference"`` for one call of ``op``.

    ``fast_available(explicit)`` returns True, or False / a string saying why the fast path
    cannot run for this call (the string ends up in the error raised for ``impl="fast"``).
    ``explicit`` is True when the fast path was asked for by name (argument or process-wide
    override), so an op may admit a slow fast path only then: Triton's CPU interpreter serves
    parity tests but must never be picked by ``"auto"``.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl: expected one of {IMPLS}, found {impl!r}")
    if impl == "auto":
        impl = _override or _env_override() or "auto"
    if impl == "reference":
        return "reference"
    ok = fast_available(impl == "fast")
    if impl == "fast":
        if ok is not True:
            reason = ok if isinstance(ok, str) else "no fast path for these inputs"
            raise RuntimeError(f"{op}: impl='fast' requested but unavailable: {reason}")
        return "fast"
    return "fast" if ok is True else "reference"
