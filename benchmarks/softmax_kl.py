"""Benchmark kdhpc.ops.softmax_kl: eager reference vs torch.compile(reference) vs Triton.

Run: ``python benchmarks/softmax_kl.py [--quick] [--dtypes float32,bfloat16] [--no-compile]``
(or ``python -m kdhpc.bench softmax_kl``). Forward and forward+backward on segmentation logits
16x4x192x192 and 64x4x256x256 (classes at dim 1) and vocabulary logits 8192x32000 and
4096x128256 (classes last), reduction "batchmean", T = 4. The forms (eager, compile, triton)
are timed interleaved (:func:`kdhpc.bench.interleaved`: one call of each per round, CUDA
events, after a warm-up); each row reports the minimum and median, GB/s against the op's
bytes-moved floor (forward 2 x logit bytes, fused forward+backward 3 x) from the minimum, that
bandwidth as a fraction of a device-to-device copy of the same number of bytes measured in the
same run, and the minimum-based speed-ups over eager and over torch.compile. Rows are appended
to ``benchmarks/results/softmax_kl.csv`` and the run is written to
``benchmarks/results/softmax_kl_<device>.md`` (``KDHPC_RESULTS=DIR``: under DIR).
``--smallest`` runs one tiny shape for two rounds: a check that the script runs.

On a machine without CUDA the Triton rows are skipped (Triton's CPU interpreter is a
correctness tool, not a performance path) and ``--quick`` is implied: the batch / row counts
are scaled down so that the eager and compiled references finish in minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout

from kdhpc import bench  # noqa: E402
from kdhpc.ops.softmax_kl import softmax_kl, softmax_kl_reference  # noqa: E402

TEMPERATURE = 4.0
# (name, shape, class dim, quick shape)
SHAPES = [
    ("seg 16x4x192x192", (16, 4, 192, 192), 1, (4, 4, 192, 192)),
    ("seg 64x4x256x256", (64, 4, 256, 256), 1, (4, 4, 256, 256)),
    ("vocab 8192x32000", (8192, 32000), -1, (256, 32000)),
    ("vocab 4096x128256", (4096, 128256), -1, (64, 128256)),
]
GOALS = ("GPU goals (fwd+bwd, large segmentation shape 64x4x256x256): >= 85% of copy "
         "bandwidth, >= 2x eager, >= 1.2x torch.compile; Triton never slower than eager")
GOAL_CASE = "seg 64x4x256x256"


def _implementations(dim: int, compile_reference: bool, on_cuda: bool):
    """name -> loss function of (student, teacher), or the reason it is skipped."""
    def eager(student, teacher):
        return softmax_kl_reference(student, teacher, TEMPERATURE, dim)

    impls = {"eager": eager}
    if compile_reference:
        impls["compile"] = torch.compile(eager, dynamic=False)
    else:
        impls["compile"] = "skipped: --no-compile"
    if on_cuda:
        impls["triton"] = lambda student, teacher: softmax_kl(student, teacher, TEMPERATURE,
                                                              dim, impl="fast")
    else:
        impls["triton"] = "skipped: no CUDA (the interpreter is not a performance path)"
    return impls


def _step(loss_fn, student, teacher, passes: str):
    if passes == "fwd":
        def step():
            with torch.no_grad():
                return loss_fn(student, teacher)
    else:
        def step():
            loss = loss_fn(student, teacher)
            return torch.autograd.grad(loss, student)
    return step


def goal_notes(rows: list[dict]) -> list[str]:
    """One line per goal, met or not, from the Triton rows of a CUDA run."""
    timed = {(r["case"], r["dtype"], r["pass"], r["impl"]): r for r in rows if r["ms"] != ""}
    notes = []
    for (case, dtype, passes, impl), row in timed.items():
        if impl != "triton":
            continue
        eager = timed[(case, dtype, passes, "eager")]["ms"]
        if row["ms"] > eager:
            notes.append(f"GOAL MISSED: Triton slower than eager on {case} {dtype} {passes} "
                         f"(minima {row['ms']:.3f} vs {eager:.3f} ms)")
        if case == GOAL_CASE and passes == "fwd+bwd":
            checks = [(row["frac_copy"] >= 0.85, f"{row['frac_copy']:.0%} of copy (goal 85%)"),
                      (row["vs_eager"] >= 2.0, f"{row['vs_eager']:.2f}x eager (goal 2x)")]
            if row["vs_compile"] != "":
                checks.append((row["vs_compile"] >= 1.2,
                               f"{row['vs_compile']:.2f}x torch.compile (goal 1.2x)"))
            for met, text in checks:
                notes.append(f"goal {'met' if met else 'MISSED'}: {case} {dtype} fwd+bwd {text}")
    return notes


def run(args) -> tuple[list[dict], list[str]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    quick = args.quick or not on_cuda
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    shapes = [c for c in SHAPES if not args.case or any(o in c[0] for o in args.case)]
    shapes = shapes[:1] if args.smallest else shapes
    notes = ["copy: a device-to-device copy of the row's floor bytes, timed in this run; "
             "frac_copy = GB/s / copy GB/s",
             "floor: forward reads student and teacher (2 x logit bytes); fused forward + "
             "backward also writes the student gradient once (3 x logit bytes)",
             f"reduction 'batchmean', T = {TEMPERATURE}, fresh randn logits (x3); forms "
             f"interleaved, {args.repeats} rounds after 3 warm-ups; ms = minimum, ms_median the "
             f"median; speed-ups from minima; load average {bench.load_average()} at the start"]
    if args.smallest:
        notes.append("--smallest: one tiny shape, 2 rounds; a check that the script runs, "
                     "not a measurement")
    if not on_cuda:
        notes.append(f"CPU run: Triton rows skipped (the interpreter is a correctness tool, not "
                     f"a performance path); shapes scaled down automatically (--quick), the "
                     f"'shape' column gives what was timed; {os.cpu_count()} cores (other jobs "
                     f"add noise). The GPU goals below are measured only by a CUDA run.")
    elif quick:
        notes.append("--quick: shapes scaled down; the 'shape' column gives what was timed")
    notes.append(GOALS)
    rows = []
    for name, full_shape, dim, quick_shape in shapes:
        shape = (4, 4, 8, 8) if args.smallest else quick_shape if quick else full_shape
        for dtype in dtypes:
            impls = _implementations(dim, not args.no_compile, on_cuda)
            generator = torch.Generator(device=device).manual_seed(0)
            student = (torch.randn(shape, generator=generator, device=device, dtype=dtype) * 3
                       ).requires_grad_(True)
            teacher = torch.randn(shape, generator=generator, device=device, dtype=dtype) * 3
            logit_bytes = student.numel() * student.element_size()
            for passes, floor in (("fwd", 2 * logit_bytes), ("fwd+bwd", 3 * logit_bytes)):
                copy = bench.copy_gbps(device, floor // 2)   # reads + writes = floor bytes
                timed = {impl: _step(fn, student, teacher, passes)
                         for impl, fn in impls.items() if not isinstance(fn, str)}
                for impl in [i for i in timed if i != "eager"]:
                    why = bench.failure(timed[impl])   # e.g. no compiler for torch.compile
                    if why:
                        impls[impl] = why
                        del timed[impl]
                timing = bench.interleaved(timed, device, rounds=args.repeats)
                for impl, loss_fn in impls.items():
                    row = {"case": name, "shape": "x".join(map(str, shape)),
                           "dtype": str(dtype).replace("torch.", ""), "pass": passes,
                           "impl": impl}
                    if isinstance(loss_fn, str):
                        rows.append({**row, "ms": "", "ms_median": "", "GB/s": "",
                                     "frac_copy": "", "vs_eager": "", "vs_compile": "",
                                     "note": loss_fn})
                        continue
                    ms = timing[impl].min
                    achieved = bench.gbps(floor, ms)
                    rows.append({**row, "ms": ms, "ms_median": timing[impl].median,
                                 "GB/s": achieved, "frac_copy": achieved / copy,
                                 "vs_eager": timing["eager"].min / ms,
                                 "vs_compile": (timing["compile"].min / ms
                                                if "compile" in timing else ""),
                                 "note": ""})
                    print(f"{name} {dtype} {passes} {impl}: min {ms:.3f} ms, median "
                          f"{timing[impl].median:.3f} ms", file=sys.stderr, flush=True)
            del student, teacher
    if on_cuda:
        notes += goal_notes(rows)
    return rows, notes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="scale the batch / row counts down (implied without CUDA)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated torch dtypes (default: float32,bfloat16 on CUDA, "
                             "float32 on CPU)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile rows")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds per row (default 50 on CUDA, 10 on CPU)")
    parser.add_argument("--smallest", action="store_true",
                        help="one tiny shape, 2 rounds, no torch.compile: checks that it runs")
    parser.add_argument("--case", action="append", default=[],
                        help="run only shapes whose name contains this (repeatable), e.g. "
                             "'seg 64' or vocab")
    parser.add_argument("--note", action="append", default=[],
                        help="a line to add to the results notes (repeatable)")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; do not append to benchmarks/results")
    args = parser.parse_args(argv)
    on_cuda = torch.cuda.is_available()
    args.dtypes = args.dtypes or ("float32,bfloat16" if on_cuda else "float32")
    args.repeats = 2 if args.smallest else args.repeats or (50 if on_cuda else 10)
    args.no_compile = args.no_compile or args.smallest
    rows, notes = run(args)
    notes += args.note
    bench.print_table(rows)
    print("\n".join(f"- {n}" for n in notes))
    if not args.no_write:
        device = "cuda" if on_cuda else "cpu"
        print(f"appended to {bench.write_results('softmax_kl', rows, device, notes)}")


if __name__ == "__main__":
    main()
