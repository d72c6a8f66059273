"""impl="auto" | "fast" | "reference" resolution and the process-wide override."""

import pytest

from kdhpc.ops import dispatch


def test_auto_takes_fast_only_when_available_and_never_an_explicit_only_path():
    calls = []

    def available(explicit):
        calls.append(explicit)
        return True if explicit else "interpreter only"

    assert dispatch.resolve("op", "auto", lambda explicit: True) == "fast"
    assert dispatch.resolve("op", "auto", available) == "reference"
    assert dispatch.resolve("op", "fast", available) == "fast"
    assert calls == [False, True]
    assert dispatch.resolve("op", "reference", available) == "reference"


def test_fast_raises_with_the_reason():
    with pytest.raises(RuntimeError, match="op: impl='fast' requested but unavailable: no GPU"):
        dispatch.resolve("op", "fast", lambda explicit: "no GPU")
    with pytest.raises(ValueError, match="op: impl: expected one of"):
        dispatch.resolve("op", "triton", lambda explicit: True)


def test_override_replaces_auto_but_not_an_explicit_argument(monkeypatch):
    monkeypatch.delenv("KDHPC_IMPL", raising=False)
    with dispatch.force_impl("reference"):
        assert dispatch.resolve("op", "auto", lambda explicit: True) == "reference"
        assert dispatch.resolve("op", "fast", lambda explicit: True) == "fast"
    with dispatch.force_impl("fast"):
        assert dispatch.resolve("op", "auto", lambda explicit: explicit or "slow") == "fast"
    assert dispatch.resolve("op", "auto", lambda explicit: True) == "fast"  # restored
    monkeypatch.setenv("KDHPC_IMPL", "reference")
    assert dispatch.resolve("op", "auto", lambda explicit: True) == "reference"
    monkeypatch.setenv("KDHPC_IMPL", "bogus")
    with pytest.raises(ValueError, match="KDHPC_IMPL"):
        dispatch.resolve("op", "auto", lambda explicit: True)
