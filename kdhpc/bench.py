"""Shared benchmark harness: timing, the copy-bandwidth yardstick, result rows and tables.

Entry point: ``python -m kdhpc.bench`` runs every script in ``benchmarks/`` in turn (the same as
``python benchmarks/<op>.py`` for each). Each script times its op with :func:`time_ms`, reports
GB/s against the op's bytes-moved floor and against :func:`copy_gbps` measured in the same run,
prints a table with :func:`print_table` and appends rows with :func:`write_results` to
``benchmarks/results/<topic>.csv`` (plus ``<topic>_<device>.md``, the latest run as markdown).

Rules (DESIGN.md, Measuring): never time zeros, warm up, take the median of many runs; ratios
are meaningful within one run, absolute times only for the device they name.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def device_name(device: torch.device | str) -> str:
    """Human name of the device a row was measured on (GPU model, or CPU model and threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{torch.get_num_threads()} threads"


def device_slug(device: torch.device | str) -> str:
    """File-name form of the device: ``cpu`` or the GPU model (``nvidia_h100_80gb_hbm3``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:  # an optional package that is missing or broken on this machine
        return "-"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def environment(device: torch.device | str) -> dict:
    """The columns every result row carries."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed") if "deepspeed" in sys.modules else "-",
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3,
            repeats: int = 20, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on GPU, perf_counter on CPU).

    Runs at least ``repeats`` times and, if ``min_seconds`` is set, until that much time passed.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(device: torch.device | str, nbytes: int = 256 << 20) -> float:
    """Bandwidth of a device-to-device copy (bytes read + bytes written per second, in GB/s).

    The yardstick for 'fraction of copy': a memory-bound op cannot beat the copy of its floor.
    """
    device = torch.device(device)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gbps(nbytes: float, ms: float) -> float:
    """Achieved bandwidth of moving ``nbytes`` in ``ms`` milliseconds, in GB/s."""
    return nbytes / (ms * 1e-3) / 1e9


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None,
                file=sys.stdout) -> None:
    """Print rows as an aligned plain-text table."""
    if not rows:
        return
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Rows as a GitHub markdown table."""
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(topic: str, rows: Sequence[dict], device: torch.device | str,
                  notes: Iterable[str] = (), results_dir: Path | None = None) -> Path:
    """Append ``rows`` (with the environment columns) to ``<topic>.csv`` and rewrite
    ``<topic>_<device>.md`` with this run's table and ``notes`` (goals met or not)."""
    results_dir = Path(results_dir or os.environ.get("KDHPC_RESULTS", RESULTS))
    results_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    full = [{**r, **env} for r in rows]
    path = results_dir / f"{topic}.csv"
    columns = list(full[0].keys())
    existing_header: list[str] | None = None
    if path.exists() and path.stat().st_size:
        with path.open() as fh:
            existing_header = next(csv.reader(fh), None)
    if existing_header is not None and existing_header != columns:
        # Columns changed since the file was started: keep the old rows, widen the header.
        with path.open() as fh:
            old = list(csv.DictReader(fh))
        columns = existing_header + [c for c in columns if c not in existing_header]
        full = old + full
        mode, write_header = "w", True
    else:
        mode, write_header = "a", existing_header is None
    with path.open(mode, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if write_header:
            writer.writeheader()
        writer.writerows(full)
    md = results_dir / f"{topic}_{device_slug(device)}.md"
    body = [f"# {topic} on {env['device']}\n",
            f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}\n",
            markdown_table(rows)]
    notes = list(notes)
    if notes:
        body.append("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    md.write_text("\n".join(body))
    return path


def main() -> None:
    """Run every benchmark script in ``benchmarks/`` (python -m kdhpc.bench [NAME ...])."""
    names = sys.argv[1:]
    scripts = sorted((REPO / "benchmarks").glob("*.py"))
    if names:
        scripts = [s for s in scripts if s.stem in names]
    for script in scripts:
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script)], check=True)


if __name__ == "__main__":
    main()
