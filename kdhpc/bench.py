"""Shared benchmark harness: timing, the copy-bandwidth yardstick, result rows and tables.

Entry point: ``python -m kdhpc.bench [NAME ...]`` runs the scripts in ``benchmarks/`` (all, or
those named) in turn, the same as ``python benchmarks/<NAME>.py`` for each; ``--help`` lists the
names. Each script times its forms with :func:`interleaved`, reports GB/s against the op's
bytes-moved floor and against :func:`copy_gbps` measured in the same run, prints a table with
:func:`print_table` and appends rows with :func:`write_results` to
``benchmarks/results/<topic>.csv`` (plus ``<topic>_<device>.md``, the latest run as markdown;
``KDHPC_RESULTS=DIR`` writes both under DIR instead).

One timing method everywhere: the forms being compared run in the same process, interleaved
round by round (each form once per round, so that a burst of load from other jobs hits all of
them alike), after a warm-up; every row reports the minimum and the median of its rounds, and
speed claims rest on the minimum (the median on a shared machine mostly measures the other
jobs). Rows carry the thread count and the load average. This module imports torch and the
standard library only, so kernel benchmarks run where the training stack is not installed.
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
from typing import Callable, Iterable, NamedTuple, Sequence

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


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): other jobs on the machine."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return float("nan")


def environment(device: torch.device | str) -> dict:
    """The columns every result row carries."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed") if "deepspeed" in sys.modules else "-",
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "threads": torch.get_num_threads(),
        "load": load_average(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3,
            repeats: int = 20, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on GPU, perf_counter on CPU).

    For one form alone (a whole training step); forms that are compared with each other go
    through :func:`interleaved`. Runs at least ``repeats`` times and, if ``min_seconds`` is set, until that much time passed.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        times.append(_call_ms(fn, device))
    return statistics.median(times)


class Timing(NamedTuple):
    """Milliseconds of one form over the rounds of :func:`interleaved`."""
    min: float
    median: float
    samples: list


def _call_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(forms: dict[str, Callable[[], object]], device: torch.device | str, *,
                rounds: int = 20, warmup: int = 3) -> dict[str, Timing]:
    """Time each form once per round, ``rounds`` rounds, after ``warmup`` calls of each.

    CUDA forms are timed with CUDA events around each call (the device is idle at each start),
    CPU forms with perf_counter. Returns name -> :class:`Timing` (minimum, median, samples).
    """
    device = torch.device(device)
    for fn in forms.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list] = {name: [] for name in forms}
    for _ in range(rounds):
        for name, fn in forms.items():
            samples[name].append(_call_ms(fn, device))
    return {name: Timing(min(v), statistics.median(v), v) for name, v in samples.items()}


def failure(fn: Callable[[], object]) -> str | None:
    """Call ``fn`` once: None if it works, else ``"skipped: <error>"`` (one line). Lets a
    benchmark drop a form that cannot run on this machine (a torch.compile backend without a
    compiler, a kernel the device lacks) and still time the others."""
    try:
        fn()
    except Exception as exc:  # any failure of an optional form: report it in its row
        return f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def copy_gbps(device: torch.device | str, nbytes: int = 256 << 20) -> float:
    """Bandwidth of a device-to-device copy (bytes read + bytes written per second, in GB/s).

    The yardstick for 'fraction of copy': a memory-bound op cannot beat the copy of its floor.
    The fastest of 20 copies of ``nbytes`` (an op's own floor bytes where it passes them).
    """
    device = torch.device(device)
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = interleaved({"copy": lambda: dst.copy_(src)}, device, rounds=20)["copy"].min
    return 2 * n * 4 / (ms * 1e-3) / 1e9


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
    full = [{**r, **{k: v for k, v in env.items() if k not in r}} for r in rows]  # a row's own
    # columns win (a benchmark that sweeps thread counts records each row's threads)
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


def benchmark_names() -> list[str]:
    """The benchmarks ``python -m kdhpc.bench`` knows: the scripts in ``benchmarks/``."""
    return sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark scripts in ``benchmarks/`` (all, or those named); exit status 2 and one
    line on stderr for an unknown name."""
    import argparse

    names = benchmark_names()
    parser = argparse.ArgumentParser(
        prog="python -m kdhpc.bench",
        description="Run kdhpc's benchmark scripts (benchmarks/NAME.py) in turn; each prints its "
                    "table and appends its rows to benchmarks/results/NAME.csv "
                    "(KDHPC_RESULTS=DIR writes under DIR).",
        epilog="benchmarks: " + ", ".join(names))
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run (default: all): " + ", ".join(names))
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        print(f"python -m kdhpc.bench: unknown benchmark {', '.join(map(repr, unknown))}; "
              f"expected one of: {', '.join(names)}", file=sys.stderr)
        return 2
    for name in args.names or names:
        print(f"== {name}", flush=True)
        status = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py")]).returncode
        if status:
            print(f"python -m kdhpc.bench: benchmarks/{name}.py exited with status {status}",
                  file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
