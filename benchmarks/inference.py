"""Per-slice inference latency of every teacher/student pair on the CPU.

Run from the repository root:

    python benchmarks/inference.py              # all pairs, 1 thread and all threads
    python benchmarks/inference.py --quick      # fewer repeats (smoke run)
    python benchmarks/inference.py --pairs dccnn segmentation --threads 1

Pairs (input, batch 1; random inputs, never zeros):

- ``dccnn``        DC-CNN teacher (5 x 5 convs) vs student (5 x 3) at 320 x 320 with a 4x 1-D
                   Cartesian mask; goal: student >= 2.5x faster on one thread (conv FLOPs: 2.9x).
- ``vdsr``         VDSR teacher (11 convs) vs student (7) at 256 x 256.
- ``enhancement``  SwinIR (``swinir_small``) vs EDSR (``edsr_small``) at 256 x 256.
- ``segmentation`` nnU-Net-style U-Net vs MobileNetV2 U-Net at 192 x 192; goal: student >= 10
                   images/s on one thread and >= 5x the teacher's rate.

Method: ``model.eval()`` under ``torch.inference_mode()``, ``torch.set_num_threads(n)`` for n = 1
and n = all cores; for each pair, teacher and student calls alternate (one call each per round,
after warm-up) so that both see the same background load, and the median of the rounds is
reported (``--rounds`` rounds, or at least 5 once 30 s are spent on one pair and setting).
``cpu_ms`` is the calling thread's CPU time (1-thread rows only): unlike wall time it does not
count time the process waited for a core on a shared machine.

Allocator: by default glibc hands freed blocks above its mmap/trim thresholds back to the OS,
so every fresh activation of a few MB (32 x 320 x 320 floats = 13 MB) is page-faulted in again on
each call: ~8 ms for one 13 MB ReLU output on this machine, against 0.5 ms once memory is reused,
and it inflates 1 -> 32 convs 4x and 32 -> 32 convs by half. That fixed, per-activation cost
weighs most on small students. The ``allocator=keep`` rows call ``mallopt`` (M_MMAP_THRESHOLD
32 MiB, the glibc maximum, and M_TRIM_THRESHOLD 1 GiB) so freed memory is reused, like running
under jemalloc/tcmalloc; ``allocator=default`` rows are measured first, before the switch (it
cannot be undone in-process), on one thread only. The goals use the ``keep`` rows.

Memory format: each model runs in contiguous NCHW (``nchw``) and in ``channels_last`` (with the
``keep`` allocator); the goals compare each model in its faster format (what a deployment would
pick). DC-CNN's complex k-space and SwinIR's tokens are unaffected by the choice; only their
convolutions see it.

The ``part`` rows time one DC-CNN cascade's pieces at 320 x 320 (1 -> 32 conv, 32 -> 32 conv,
32 -> 1 conv, the data-consistency op): the thin convs and DC are the same in teacher and
student, a fixed cost that keeps the measured ratio below the 2.9x conv FLOP ratio.

Rows go to ``benchmarks/results/inference.csv`` and ``inference_cpu.md`` through
:func:`kdhpc.bench.write_results`, with notes saying which goals are met.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdhpc.bench import print_table, time_ms, write_results  # noqa: E402
from kdhpc.models import build_model, count_parameters  # noqa: E402
from kdhpc.ops.data_consistency import data_consistency  # noqa: E402

MIN_ROUNDS = 5
ROUND_BUDGET_S = 30.0  # per pair, format and thread count
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def keep_freed_memory() -> str:
    """Make glibc keep freed blocks up to 32 MiB for reuse (see the module docstring).

    Returns ``"keep"`` on success, or a reason why the switch was not made."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter ids from <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(m_mmap_threshold, 32 << 20) == 1
              and libc.mallopt(m_trim_threshold, 1 << 30) == 1)
    except (OSError, AttributeError) as exc:  # not glibc (musl, macOS): keep the default
        return f"default (mallopt unavailable: {exc})"
    return "keep" if ok else "default (mallopt refused the thresholds)"


def kspace_inputs(size: int, acceleration: float = 4.0, seed: int = 0):
    """Zero-filled image [1, 1, H, W], k0 [1, 1, H, W] complex and a 1-D line mask [H, 1]."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 1, size, size, generator=g)
    mask = (torch.rand(size, 1, generator=g) < 1.0 / acceleration).float()
    mask[:size // 25 + 1] = 1.0  # low frequencies, unshifted layout: DC at index 0
    mask[-(size // 25):] = 1.0
    k0 = torch.fft.fft2(image, norm="ortho") * mask
    return torch.fft.ifft2(k0, norm="ortho").real.contiguous(), k0, mask


PAIRS = {
    # name: (teacher, student, input size, make inputs)
    "dccnn": ("dccnn_teacher", "dccnn_student", 320, lambda s: kspace_inputs(s)),
    "vdsr": ("vdsr_teacher", "vdsr_student", 256, lambda s: (torch.rand(1, 1, s, s),)),
    "enhancement": ("swinir_small", "edsr_small", 256, lambda s: (torch.rand(1, 1, s, s),)),
    "segmentation": ("unet_teacher", "mobilenet_unet_student", 192,
                     lambda s: (torch.rand(1, 1, s, s),)),
}


def in_format(inputs: tuple, fmt: str) -> tuple:
    """Real 4-D image inputs in the memory format (k-space and masks untouched)."""
    return tuple(t.contiguous(memory_format=FORMATS[fmt])
                 if t.dim() == 4 and not t.is_complex() else t for t in inputs)


def time_interleaved(calls: dict, rounds: int, warmup: int) -> dict:
    """Alternate one call of each callable per round; median wall and thread-CPU ms of each.

    Runs ``rounds`` rounds, or fewer (at least ``MIN_ROUNDS``) once ``ROUND_BUDGET_S`` is spent.
    """
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            for _ in range(warmup):
                fn()
        start = time.perf_counter()
        for done in range(rounds):
            # A slow pair (SwinIR: seconds per call) stops after min_rounds once the time budget
            # is spent; the median of 5+ alternating rounds is still robust.
            if done >= min(rounds, MIN_ROUNDS) and time.perf_counter() - start > ROUND_BUDGET_S:
                break
            for name, fn in calls.items():
                c0 = time.thread_time()
                wall[name].append(time_ms(fn, "cpu", warmup=0, repeats=1))
                cpu[name].append((time.thread_time() - c0) * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in calls}


def result_row(pair: str, role: str, model: str, size: int, threads: int, allocator: str,
               fmt: str, timing: tuple[float, float], params: int, speedup: float) -> dict:
    ms, cpu_ms = timing
    return {"pair": pair, "role": role, "model": model, "input": f"{size}x{size}",
            "threads": threads, "allocator": allocator, "format": fmt, "ms": ms,
            "cpu_ms": cpu_ms if threads == 1 else float("nan"), "images_per_s": 1e3 / ms,
            "params": params, "speedup": speedup}


def bench_pair(pair: str, threads: int, rounds: int, warmup: int, allocator: str,
               formats: list[str]) -> list[dict]:
    """Teacher and student of ``pair`` in each memory format; speedup = teacher ms / ms."""
    teacher, student, size, make = PAIRS[pair]
    torch.manual_seed(0)
    names = {"teacher": teacher, "student": student}
    base = {role: build_model(name).eval() for role, name in names.items()}
    raw_inputs = make(size)
    rows = []
    for fmt in formats:
        models = {role: m.to(memory_format=FORMATS[fmt]) for role, m in base.items()}
        inputs = in_format(raw_inputs, fmt)
        timings = time_interleaved({role: (lambda m=m: m(*inputs)) for role, m in models.items()},
                                   rounds, warmup)
        for role, name in names.items():
            rows.append(result_row(pair, role, name, size, threads, allocator, fmt,
                                   timings[role], count_parameters(models[role]),
                                   timings["teacher"][0] / timings[role][0]))
    return rows


def bench_dccnn_parts(threads: int, rounds: int, warmup: int, allocator: str) -> list[dict]:
    """One cascade's parts at 320 x 320 (role ``part``): where the teacher/student ratio goes.

    ``conv_in`` 1 -> 32 (+ its ReLU), ``conv_mid`` 32 -> 32 (+ ReLU), ``conv_out`` 32 -> 1 as
    the model runs it (GEMM), ``conv_out_onednn`` the same conv through ``F.conv2d``, and
    ``dc_step`` the data-consistency op (impl="auto"). Teacher cascade = in + 3 mid + out + DC,
    student = in + mid + out + DC.
    """
    torch.manual_seed(0)
    cascade = build_model("dccnn_student").eval().cascades[0]
    conv_in, conv_mid, conv_out = cascade.convs
    x_zf, k0, mask = kspace_inputs(320)
    with torch.inference_mode():
        h = torch.relu(conv_mid(torch.relu(conv_in(x_zf))))  # [1, 32, 320, 320], realistic
    calls = {"conv_in": lambda: torch.relu_(conv_in(x_zf)),
             "conv_mid": lambda: torch.relu_(conv_mid(h)),
             "conv_out": lambda: conv_out(h),
             "conv_out_onednn": lambda: F.conv2d(h, conv_out.weight, conv_out.bias, padding=1),
             "dc_step": lambda: data_consistency(x_zf, k0, mask)}
    timings = time_interleaved(calls, rounds, warmup)
    return [result_row("dccnn", "part", name, 320, threads, allocator, "nchw", timing, 0,
                       float("nan")) for name, timing in timings.items()]


def best(rows: list[dict], pair: str, role: str, threads: int, allocator: str) -> dict:
    """The row of ``role`` in ``pair`` at ``threads`` in its faster memory format."""
    return min((r for r in rows if r["pair"] == pair and r["role"] == role
                and r["threads"] == threads and r["allocator"] == allocator),
               key=lambda r: r["ms"])


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def goal_notes(rows: list[dict], allocator: str) -> list[str]:
    """One line per pair and thread count: best-format times, ratio, goals met or missed.

    On one thread each goal is judged on wall time and on thread CPU time: on a shared, loaded
    machine the wall time also counts waiting for a core, the CPU time does not.
    """
    notes = []
    pairs = sorted({r["pair"] for r in rows if r["role"] != "part"})
    for threads in sorted({r["threads"] for r in rows if r["allocator"] == allocator}):
        for pair in pairs:
            t = best(rows, pair, "teacher", threads, allocator)
            s = best(rows, pair, "student", threads, allocator)
            ratio = t["ms"] / s["ms"]
            line = (f"{pair}, {threads} thread(s), allocator {allocator}: teacher {t['model']} "
                    f"{t['ms']:.1f} ms ({t['format']}), student {s['model']} {s['ms']:.1f} ms "
                    f"({s['format']}): student {ratio:.2f}x faster")
            if threads != 1:
                notes.append(line)
                continue
            cpu_ratio = t["cpu_ms"] / s["cpu_ms"]
            line += (f" (thread CPU time: {t['cpu_ms']:.1f} / {s['cpu_ms']:.1f} ms, "
                     f"{cpu_ratio:.2f}x)")
            if pair == "dccnn":
                line += (f"; goal >= 2.5x: wall {verdict(ratio >= 2.5)}, CPU time "
                         f"{verdict(cpu_ratio >= 2.5)}")
                line += dccnn_breakdown(rows, threads, allocator)
            if pair == "segmentation":
                rate, cpu_rate = 1e3 / s["ms"], 1e3 / s["cpu_ms"]
                line += (f"; goal student >= 10 images/s: wall {rate:.1f}/s "
                         f"{verdict(rate >= 10)}, CPU time {cpu_rate:.1f}/s "
                         f"{verdict(cpu_rate >= 10)}; goal >= 5x teacher: wall "
                         f"{verdict(ratio >= 5)}, CPU time {verdict(cpu_ratio >= 5)}")
            notes.append(line)
    return notes


def dccnn_breakdown(rows: list[dict], threads: int, allocator: str) -> str:
    """The ratio one cascade's parts predict, and the share of the fixed (shared) cost, in
    thread CPU time on one thread (robust to a loaded machine), else in wall time."""
    key = "cpu_ms" if threads == 1 else "ms"
    part = {r["model"]: r[key] for r in rows if r["role"] == "part" and r["threads"] == threads
            and r["allocator"] == allocator}
    student = [r[key] for r in rows if r["model"] == "dccnn_student" and r["threads"] == threads
               and r["allocator"] == allocator]
    if not part or not student:
        return ""
    fixed = part["conv_in"] + part["conv_out"] + part["dc_step"]
    teacher_cascade, student_cascade = fixed + 3 * part["conv_mid"], fixed + part["conv_mid"]
    return (f"; one cascade ({'thread CPU' if key == 'cpu_ms' else 'wall'} ms): conv_in "
            f"{part['conv_in']:.2f} + conv_out {part['conv_out']:.2f} (F.conv2d would take "
            f"{part['conv_out_onednn']:.2f}) + DC {part['dc_step']:.2f} = {fixed:.2f} ms shared "
            f"by both nets against {part['conv_mid']:.2f} ms per 32->32 conv: predicted ratio "
            f"{teacher_cascade / student_cascade:.2f}x; DC alone is "
            f"{5 * part['dc_step'] / min(student):.1%} of the student")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="thread counts (default: 1 and all cores)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up call")
    parser.add_argument("--skip-default-allocator", action="store_true",
                        help="measure only with the keep allocator")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rounds, warmup = (3, 1) if args.quick else (args.rounds, args.warmup)
    cores = os.cpu_count() or 1
    threads_list = args.threads or sorted({1, cores})
    # (allocator, formats, threads): the default allocator first, it cannot be restored after
    # mallopt; it is measured on one thread only, the setting of the goals.
    configs = [] if args.skip_default_allocator else [("default", ["nchw"], threads_list[:1])]
    configs.append(("keep", list(FORMATS), threads_list))
    rows = []
    allocator = "default"
    for wanted, formats, config_threads in configs:
        if wanted == "keep":
            allocator = keep_freed_memory()
        for threads in config_threads:
            torch.set_num_threads(threads)
            if "dccnn" in args.pairs:
                rows.extend(bench_dccnn_parts(threads, rounds, warmup, allocator))
            for pair in args.pairs:
                print(f"[inference] {pair}, {threads} thread(s), allocator {allocator}",
                      flush=True)
                rows.extend(bench_pair(pair, threads, rounds, warmup, allocator, formats))
    print_table(rows)
    notes = []
    for label in dict.fromkeys(r["allocator"] for r in rows):
        notes += goal_notes(rows, label)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes.append(f"{rounds} rounds after {warmup} warm-up calls, median, teacher and student "
                 f"alternating; 1-minute load average at the end {load:.2f} on {cores} cores "
                 f"(other processes share this machine: compare cpu_ms when wall ms > cpu_ms)")
    for n in notes:
        print("-", n)
    if not args.no_write:
        torch.set_num_threads(threads_list[0])
        print("wrote", write_results("inference", rows, "cpu", notes=notes))


if __name__ == "__main__":
    main()
