"""How kdhpc's cost grows: scaling curves on this machine and a fastMRI sizing model from them.

Run from the repository root::

    python benchmarks/scaling.py --quick          # every curve, CI-class CPU, < 10 minutes
    python benchmarks/scaling.py                  # more points and rounds
    python benchmarks/scaling.py --smallest       # every curve at its smallest (the test's size)
    python benchmarks/scaling.py --write-docs     # docs/scaling.md from the latest CSV run only

Curves, each measured in one run (rows: ``benchmarks/results/scaling.csv``, the latest run as
``scaling_<device>.md`` and a plot ``scaling_<device>.png``):

- ``throughput``: training slices/s of each recipe's student (DC-CNN, EDSR, MobileNetV2 U-Net;
  CPU sizes) against batch size and image size, with no KD, a cached teacher and a streamed
  teacher, through :func:`kdhpc.train.train` (``benchmarks/train_step.py``'s ``run_modes``:
  the modes interleaved in every round).
- ``ranks``: DeepSpeed on 1 and 2 ranks (gloo, ``torchrun``), same global batch (1 rank x 1
  thread; 1 rank x 2 threads and 2 ranks x 1 thread on the same two cores): throughput, the
  seconds each rank spends in
  ``torch.distributed.all_reduce`` (gradients, the engine's per-step agreement and loss means,
  waits for the other rank included) and a bare all-reduce of the gradient's size; the two
  loss curves are compared step by step.
- ``cache``: teacher-cache fill of each recipe (its real target set: output image, attention
  map per tapped layer, logits per deep-supervision level) in float16 and float32: seconds and
  bytes per record (one slice view) and per 16-slice volume, split by target kind; the read
  rate of ``CachedTeacher.targets`` on training batches against the no-KD step's own time.
- ``cache_io``: the cache's own write and read rates (no teacher forward) against the record
  size, up to a 320x320 output with 5 attention maps (the sizing model's rates).
- ``sweep``: total wall time of ``python -m kdhpc.sweep configs/recon_tiny.yaml --grid
  loss.alpha=...`` (shared teacher and cache, one trial at a time) against N independent
  ``python -m kdhpc.distill`` runs, N = 1, 2, 4, 8 (``--quick``: 1, 2, 4).
- ``unit``: per-pixel costs of the published teacher / student pairs (FLOPs counted by
  ``torch.utils.flop_counter``, CPU milliseconds, gradient bytes): the sizing model's inputs.

Timing: every value carries its best (minimum time / maximum rate) and median over interleaved
rounds and the 1-minute load average when it was taken; claims rest on the best. The sizing
model (:func:`project`) reads the latest run's rows back from the CSV and writes
``docs/scaling.md``; every number there is labelled measured or projected.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Children start from the environment as it was before this process initialised its own
# (one-rank) process group: inheriting its RANK / MASTER_PORT would point them at it.
LAUNCH_ENV = dict(os.environ)
sys.path[:0] = [str(REPO), str(HERE)]

from train_step import SyntheticViews, run_modes, train_config, train_log  # noqa: E402

from kdhpc import bench  # noqa: E402
from kdhpc import train as T  # noqa: E402
from kdhpc.losses import imitation_loss, segmentation_kd_loss  # noqa: E402
from kdhpc.models import build_model  # noqa: E402
from kdhpc.ops import attention_map  # noqa: E402
from kdhpc.teacher import CachedTeacher, StreamTeacher, fill_cache  # noqa: E402

TOPIC = "scaling"
ALPHA, TEMPERATURE = 0.5, 2.0
VOLUME_SLICES = 16  # "per volume" rows: a fastMRI brain volume's slice count
MODES = ("no_kd", "cache", "stream")
# (ranks, torch threads per rank): 1 x 2 and 2 x 1 use the same two cores; 1 x 1 is the base.
RANK_CONFIGS = ((1, 1), (1, 2), (2, 1))
DOCS = REPO / "docs" / "scaling.md"


# ---------------------------------------------------------------------------------------------
# the recipes' pairs, targets and losses

def _run(model, batch, features=False):
    if "kspace" in batch:
        return model(batch["input"], batch["kspace"], batch["mask"], return_features=features)
    return model(batch["input"])


def extract_reconstruction(model, batch):
    """KD-MRI's targets: the output image and the raw attention map of every tapped layer."""
    output, taps = _run(model, batch, features=True)
    return {"output": output, **{f"attention_{i}": attention_map(tap, 2.0, normalize=False)
                                 for i, tap in enumerate(taps)}}


def loss_reconstruction(model, batch, targets):
    teacher = None if targets is None else targets["output"]
    return imitation_loss(_run(model, batch), batch["target"], teacher, ALPHA)


def extract_output(model, batch):
    return {"output": model(batch["input"])}


def loss_enhancement(model, batch, targets):
    teacher = None if targets is None else targets["output"]
    return imitation_loss(model(batch["input"]), batch["target"], teacher, ALPHA)


def extract_logits(model, batch):
    return {f"logits_{i}": level for i, level in enumerate(model(batch["input"]))}


def loss_segmentation(model, batch, targets):
    teacher = None if targets is None else [targets[f"logits_{i}"] for i in range(len(targets))]
    return segmentation_kd_loss(model(batch["input"]), batch["labels"], teacher, ALPHA,
                                TEMPERATURE)


@dataclasses.dataclass(frozen=True)
class Recipe:
    task: str                 # SyntheticViews task
    teacher: str              # CPU-size pair the curves train
    student: str
    published_teacher: str    # the published pair the sizing model projects
    published_student: str
    extract: Callable
    loss: Callable


RECIPES = {
    "reconstruction": Recipe("reconstruct", "dccnn_teacher", "dccnn_student", "dccnn_teacher",
                             "dccnn_student", extract_reconstruction, loss_reconstruction),
    "enhancement": Recipe("enhance", "swinir_small", "edsr_small", "swinir_denoise",
                          "edsr_baseline", extract_output, loss_enhancement),
    "segmentation": Recipe("segment", "unet_teacher_small", "mobilenet_unet_student_small",
                           "unet_teacher", "mobilenet_unet_student", extract_logits,
                           loss_segmentation),
}


def target_kind(name: str) -> str:
    return name.split("_")[0]  # output, attention, logits


@dataclasses.dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...]   # throughput against batch size, at size0
    sizes: tuple[int, ...]     # throughput against image size, at batch0
    batch0: int
    size0: int
    steps: int
    warmup: int
    rounds: int
    samples: int
    views: int
    rank_batch: int
    rank_steps: int
    sweep_trials: tuple[int, ...]
    unit_size: int
    io_sizes: tuple[int, ...] = (32, 128, 320)
    rank_configs: tuple[tuple[int, int], ...] = RANK_CONFIGS


SIZES = {
    # smallest: the test's size; the sweep curve (about 30 s for N = 1) is left to --quick.
    "smallest": Sizes((2,), (32,), 2, 32, 3, 1, 1, 4, 2, 4, 3, (), 32, (32, 64),
                      ((1, 1), (2, 1))),
    "quick": Sizes((1, 4, 8), (32, 64), 4, 32, 6, 2, 2, 8, 2, 8, 12, (1, 2, 4), 32),
    "full": Sizes((1, 2, 4, 8, 16), (32, 64, 96), 4, 32, 10, 2, 3, 16, 4, 16, 30,
                  (1, 2, 4, 8), 64),
}


# ---------------------------------------------------------------------------------------------
# rows

def row(curve: str, quantity: str, unit: str, values, *, higher_is_better: bool = False,
        **keys) -> dict:
    """One CSV row: the best (min time / max rate) and median of ``values`` and the load."""
    values = [float(v) for v in values]
    out = {"curve": curve, "recipe": "", "mode": "", "batch": "", "size": "", "ranks": "",
           "threads": "", "trials": ""}
    out.update({k: v for k, v in keys.items()})
    out.update({"quantity": quantity, "unit": unit,
                "best": max(values) if higher_is_better else min(values),
                "median": statistics.median(values), "n": len(values),
                "load_1m": round(os.getloadavg()[0], 2)})
    return out


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# curve: throughput against batch and image size, no KD / cached / streamed

def filled_cache(work: Path, recipe: Recipe, teacher, dataset, dtype: str = "float16") -> Path:
    cache_dir = Path(tempfile.mkdtemp(prefix="cache_", dir=work))
    fill_cache(cache_dir, teacher, recipe.extract, dataset, data_config={"bench": dtype},
               dtype=dtype, batch_size=8, device="cpu")
    return cache_dir


def throughput_curves(sz: Sizes, work: Path, threads: int) -> list[dict]:
    rows = []
    points = [(b, sz.size0) for b in sz.batches] + [(sz.batch0, s) for s in sz.sizes
                                                   if (sz.batch0, s) not in
                                                   [(b, sz.size0) for b in sz.batches]]
    for name, recipe in RECIPES.items():
        for batch, size in points:
            say(f"throughput {name} batch {batch} size {size}")
            dataset = SyntheticViews(max(sz.samples, batch), size, sz.views, recipe.task)
            torch.manual_seed(0)
            teacher = build_model(recipe.teacher).eval()
            cache_dir = filled_cache(work, recipe, teacher, dataset)
            sources = {"no_kd": None, "cache": CachedTeacher(cache_dir),
                       "stream": StreamTeacher(teacher, recipe.extract)}
            rates = run_modes(lambda: build_model(recipe.student), recipe.loss, dataset, sources,
                              batch=batch, steps=sz.steps, warmup=sz.warmup, rounds=sz.rounds,
                              threads=threads, work=work)
            sources["cache"].close()
            shutil.rmtree(cache_dir)
            for mode in MODES:
                rows.append(row("throughput", "slices_per_s", "slices/s", rates[mode],
                                higher_is_better=True, recipe=name, mode=mode, batch=batch,
                                size=size, ranks=1, threads=threads))
    return rows


# ---------------------------------------------------------------------------------------------
# curve: DeepSpeed ranks 1 and 2, same global batch

def rank_worker(args) -> None:
    """One rank of the ``ranks`` curve (run under torchrun): train, time all-reduce, report."""
    import torch.distributed as dist

    spent = {"seconds": 0.0, "calls": 0}

    def timed(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            work = fn(*a, **k)
            if work is not None and hasattr(work, "wait"):
                work.wait()
            spent["seconds"] += time.perf_counter() - start
            spent["calls"] += 1
            return work
        return wrapper

    # DeepSpeed's torch backend looks the function up on torch.distributed at each call.
    dist.all_reduce = timed(dist.all_reduce)
    recipe = RECIPES["enhancement"]
    dataset = SyntheticViews(max(args.rank_batch * 2, 8), args.rank_size, 1, recipe.task)
    torch.manual_seed(1)
    model = build_model(recipe.student)
    out = Path(args.rank_worker)
    run_dir = out / "run"
    T.train(train_config(args.rank_batch, args.rank_steps, args.threads), model, recipe.loss,
            dataset, run_dir=run_dir, progress=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    bare_ms = 0.0
    if world > 1:
        grads = torch.zeros(sum(p.numel() for p in model.parameters()))
        bare_ms = bench.time_ms(lambda: dist.all_reduce(grads), "cpu", warmup=3, repeats=20)
    report = {"rank": rank, "world": world, "allreduce_s": spent["seconds"],
              "allreduce_calls": spent["calls"], "bare_allreduce_ms": bare_ms,
              "grad_bytes": 4 * sum(p.numel() for p in model.parameters())}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def ranks_curve(sz: Sizes, work: Path) -> list[dict]:
    configs = sz.rank_configs
    steps: dict[tuple, list[float]] = {c: [] for c in configs}
    reduce_ms: dict[tuple, list[float]] = {c: [] for c in configs}
    bare: list[float] = []
    losses: dict[tuple, list[float]] = {}
    grad_bytes = 0
    for r in range(sz.rounds):
        for ranks, threads in configs:
            say(f"ranks {ranks} x {threads} threads, round {r}")
            out = work / f"ranks{ranks}_{r}"
            out.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", str(Path(__file__).resolve()),
                   "--rank-worker", str(out), "--threads", str(threads),
                   "--rank-batch", str(sz.rank_batch), "--rank-steps", str(sz.rank_steps),
                   "--rank-size", str(sz.size0)]
            # Two gloo ranks on a machine shared with other DeepSpeed jobs occasionally abort
            # while connecting; a second attempt is reported, not hidden.
            run_quietly(cmd, out / "log.txt", attempts=2)
            log = train_log(out / "run")
            steps[(ranks, threads)] += [sz.rank_batch / float(x["slices_per_s"])
                                        for x in log[sz.warmup:]]
            losses[(ranks, threads)] = [float(x["loss"]) for x in log]
            reports = [json.loads((out / f"rank{k}.json").read_text()) for k in range(ranks)]
            # Per step: the busiest rank's all-reduce time (the other waits inside its own).
            reduce_ms[(ranks, threads)].append(
                1e3 * max(x["allreduce_s"] for x in reports) / sz.rank_steps)
            bare += [x["bare_allreduce_ms"] for x in reports if x["world"] > 1]
            grad_bytes = reports[0]["grad_bytes"]
            shutil.rmtree(out)
    one, two = losses[(1, 1)], losses[(2, 1)]
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one, two))
    rows = []
    for (ranks, threads) in configs:
        keys = dict(recipe="enhancement", mode="no_kd", batch=sz.rank_batch, size=sz.size0,
                    ranks=ranks, threads=threads)
        rows.append(row("ranks", "slices_per_s", "slices/s",
                        [sz.rank_batch / s for s in steps[(ranks, threads)]],
                        higher_is_better=True, **keys))
        rows.append(row("ranks", "step_ms", "ms", [1e3 * s for s in steps[(ranks, threads)]],
                        **keys))
        rows.append(row("ranks", "allreduce_ms_per_step", "ms", reduce_ms[(ranks, threads)],
                        **keys))
        rows.append(row("ranks", "loss_final", "loss", [losses[(ranks, threads)][-1]], **keys))
    keys = dict(recipe="enhancement", batch=sz.rank_batch, size=sz.size0, ranks=2, threads=1)
    rows.append(row("ranks", "bare_allreduce_ms", "ms", bare, **keys))
    rows.append(row("ranks", "grad_bytes", "B", [grad_bytes], **keys))
    rows.append(row("ranks", "loss_max_rel_diff_1_vs_2", "1", [diff], **keys))
    return rows


# ---------------------------------------------------------------------------------------------
# curve: cache fill and read

def cache_curve(sz: Sizes, work: Path, threads: int, step_ms: dict[str, float]) -> list[dict]:
    rows = []
    for name, recipe in RECIPES.items():
        dataset = SyntheticViews(sz.samples, sz.size0, sz.views, recipe.task)
        records = len(dataset) * sz.views
        torch.manual_seed(0)
        teacher = build_model(recipe.teacher).eval()
        items = T.ViewItems(dataset)
        first = torch.utils.data.default_collate([items[(i, 0)] for i in range(sz.batch0)])
        with torch.inference_mode():
            fwd_ms = bench.time_ms(lambda: recipe.extract(teacher, first), "cpu", warmup=1,
                                   repeats=3)
        keys = dict(recipe=name, batch=sz.batch0, size=sz.size0, threads=threads)
        rows.append(row("cache", "teacher_fwd_ms_per_record", "ms", [fwd_ms / sz.batch0],
                        **keys))
        for dtype in ("float16", "float32"):
            say(f"cache {name} {dtype}")
            fills, cache_dir = [], None
            for _ in range(sz.rounds):
                if cache_dir is not None:
                    shutil.rmtree(cache_dir)
                start = time.perf_counter()
                cache_dir = filled_cache(work, recipe, teacher, dataset, dtype)
                fills.append(time.perf_counter() - start)
            index = json.loads((cache_dir / "index.json").read_text())
            disk = sum(s["size"] for s in index["shards"])
            by_kind: dict[str, int] = {}
            itemsize = 2 if dtype == "float16" else 4
            for target, schema in index["schema"].items():
                by_kind[target_kind(target)] = (by_kind.get(target_kind(target), 0)
                                                + itemsize * math.prod(schema["shape"]))
            k = dict(keys, mode=dtype)
            rows.append(row("cache", "fill_s_per_record", "s", [f / records for f in fills], **k))
            rows.append(row("cache", "fill_s_per_volume", "s",
                            [f / records * VOLUME_SLICES for f in fills], **k))
            rows.append(row("cache", "disk_bytes_per_record", "B", [disk / records], **k))
            rows.append(row("cache", "disk_bytes_per_volume", "B",
                            [disk / records * VOLUME_SLICES], **k))
            for kind, nbytes in sorted(by_kind.items()):
                rows.append(row("cache", f"target_bytes_per_record:{kind}", "B", [nbytes], **k))
                rows.append(row("cache", f"target_elements_per_pixel:{kind}", "1",
                                [nbytes / itemsize / sz.size0 ** 2], **k))
            cached = CachedTeacher(cache_dir)
            order, views = T.epoch_plan(len(dataset), sz.views, seed=0, epoch=0)
            batches = [{"index": torch.as_tensor(order[s:s + sz.batch0]),
                        "view": torch.as_tensor(views[order[s:s + sz.batch0]])}
                       for s in range(0, len(order) - sz.batch0 + 1, sz.batch0)]
            reads = []
            for _ in range(max(3, sz.rounds)):
                start = time.perf_counter()
                for b in batches:
                    cached.targets(b)
                reads.append((time.perf_counter() - start) / len(batches))
            cached.close()
            shutil.rmtree(cache_dir)
            payload = sum(by_kind.values()) * sz.batch0
            rows.append(row("cache", "read_ms_per_batch", "ms", [1e3 * r for r in reads], **k))
            rows.append(row("cache", "read_MB_per_s", "MB/s", [payload / r / 1e6 for r in reads],
                            higher_is_better=True, **k))
            if name in step_ms:
                rows.append(row("cache", "read_vs_no_kd_step", "1",
                                [1e3 * r / step_ms[name] for r in reads], **k))
    return rows


def extract_six_maps(model, batch):
    """A DC-CNN-shaped target set (output + 5 attention maps) without a teacher forward."""
    x = batch["input"]
    return {"output": x, **{f"attention_{i}": (i + 2) * x.flatten(1) for i in range(5)}}


def cache_io_curve(sz: Sizes, work: Path, threads: int) -> list[dict]:
    """Write and read rates of the cache alone (no teacher forward) against the record size:
    the per-call costs dominate small records, the bytes large ones."""
    rows = []
    for size in sz.io_sizes:
        say(f"cache i/o at {size}x{size}")
        dataset = SyntheticViews(sz.samples, size, sz.views, "enhance")
        records = len(dataset) * sz.views
        writes, reads = [], []
        for _ in range(max(2, sz.rounds)):
            cache_dir = Path(tempfile.mkdtemp(prefix="io_", dir=work))
            start = time.perf_counter()
            fill_cache(cache_dir, torch.nn.Identity(), extract_six_maps, dataset,
                       data_config={"io": size}, dtype="float16", batch_size=8, device="cpu")
            writes.append(time.perf_counter() - start)
            cached = CachedTeacher(cache_dir)
            order, views = T.epoch_plan(len(dataset), sz.views, seed=0, epoch=0)
            batches = [{"index": torch.as_tensor(order[s:s + sz.batch0]),
                        "view": torch.as_tensor(views[order[s:s + sz.batch0]])}
                       for s in range(0, len(order) - sz.batch0 + 1, sz.batch0)]
            start = time.perf_counter()
            for b in batches:
                cached.targets(b)
            reads.append((time.perf_counter() - start) / (len(batches) * sz.batch0))
            cached.close()
            shutil.rmtree(cache_dir)
        nbytes = 2 * 6 * size ** 2
        keys = dict(recipe="reconstruction", mode="float16", batch=sz.batch0, size=size,
                    threads=threads)
        rows.append(row("cache_io", "record_bytes", "B", [nbytes], **keys))
        rows.append(row("cache_io", "write_MB_per_s", "MB/s",
                        [records * nbytes / w / 1e6 for w in writes], higher_is_better=True,
                        **keys))
        rows.append(row("cache_io", "read_MB_per_s", "MB/s", [nbytes / r / 1e6 for r in reads],
                        higher_is_better=True, **keys))
    return rows


# ---------------------------------------------------------------------------------------------
# curve: a sweep of N trials against N independent runs

def child_env() -> dict:
    env = dict(LAUNCH_ENV, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), LAUNCH_ENV.get("PYTHONPATH", "")) if p))
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def run_quietly(cmd: list[str], log: Path, attempts: int = 1) -> None:
    """Run ``cmd`` from the repository root with its output in ``log``, up to ``attempts``
    times; when every attempt failed, raise with the log's tail."""
    for attempt in range(1, attempts + 1):
        with log.open("w") as fh:
            done = subprocess.run(cmd, env=child_env(), stdout=fh, stderr=subprocess.STDOUT,
                                  cwd=REPO)
        if not done.returncode:
            return
        lines = [x for x in log.read_text().splitlines() if "WARNING" not in x]
        causes = [x for x in lines if "Error" in x or "what()" in x or "terminate" in x]
        say(f"attempt {attempt} of {attempts} failed (exit status {done.returncode}): "
            + (causes[-1] if causes else "no error line"))
    tail = "\n".join(lines[-25:])
    raise SystemExit(f"{' '.join(cmd)}: exit status {done.returncode}; last lines:\n{tail}")


def sweep_curve(sz: Sizes, work: Path) -> list[dict]:
    config = str(REPO / "configs" / "recon_tiny.yaml")
    rows = []
    for n in sz.sweep_trials:
        alphas = [0.5] if n == 1 else [round(i / (n - 1), 4) for i in range(n)]
        say(f"sweep of {n} trial(s) against {n} independent run(s)")
        start = time.perf_counter()
        run_quietly([sys.executable, "-m", "kdhpc.sweep", config, "train.threads=1",
                     "--grid", "loss.alpha=" + ",".join(map(str, alphas)), "--executor",
                     "local", "--array-parallelism", "1", "--sweep-dir", str(work / f"sweep{n}")],
                    work / "log.txt")
        swept = time.perf_counter() - start
        start = time.perf_counter()
        for a in alphas:
            run_quietly([sys.executable, "-m", "kdhpc.distill", config, "train.threads=1",
                         f"loss.alpha={a}", f"run_dir={work / f'runs{n}' / str(a)}"],
                        work / "log.txt")
        alone = time.perf_counter() - start
        shutil.rmtree(work / f"sweep{n}")
        shutil.rmtree(work / f"runs{n}")
        keys = dict(recipe="reconstruction", trials=n, threads=1)
        rows.append(row("sweep", "total_s", "s", [swept], mode="sweep_shared", **keys))
        rows.append(row("sweep", "total_s", "s", [alone], mode="independent", **keys))
        rows.append(row("sweep", "independent_vs_sweep", "1", [alone / swept], **keys))
    return rows


# ---------------------------------------------------------------------------------------------
# curve: per-pixel unit costs of the published pairs

def unit_costs(sz: Sizes, threads: int) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    repeats = 3 if sz.rounds > 1 else 1
    for name, recipe in RECIPES.items():
        # The published U-Net teacher halves the image 5 times and instance-normalises the
        # bottleneck: 64 is its smallest size.
        size = max(sz.unit_size, 64 if name == "segmentation" else 0)
        pixels = size ** 2
        say(f"unit costs {name} at {size}x{size}")
        dataset = SyntheticViews(2, size, 1, recipe.task)
        items = T.ViewItems(dataset)
        batch = torch.utils.data.default_collate([items[(i, 0)] for i in range(2)])
        torch.manual_seed(0)
        teacher = build_model(recipe.published_teacher).eval()
        student = build_model(recipe.published_student)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as counter:
                recipe.extract(teacher, batch)
            teacher_flops = counter.get_total_flops()
            fwd = bench.time_ms(lambda: recipe.extract(teacher, batch), "cpu",
                                warmup=repeats // 2, repeats=repeats)
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            recipe.loss(student, batch, None)["loss"].backward()
            optimizer.step()

        with FlopCounterMode(display=False) as counter:
            recipe.loss(student, batch, None)["loss"].backward()
        student_flops = counter.get_total_flops()
        train_ms = bench.time_ms(step, "cpu", warmup=repeats // 2, repeats=repeats)
        keys = dict(recipe=name, batch=2, size=size, threads=threads)
        per = 2 * pixels
        rows += [
            row("unit", "teacher_fwd_flops_per_pixel", "FLOP", [teacher_flops / per],
                mode=recipe.published_teacher, **keys),
            row("unit", "teacher_fwd_ms_per_mpixel", "ms", [fwd / per * 1e6],
                mode=recipe.published_teacher, **keys),
            row("unit", "student_train_flops_per_pixel", "FLOP", [student_flops / per],
                mode=recipe.published_student, **keys),
            row("unit", "student_train_ms_per_mpixel", "ms", [train_ms / per * 1e6],
                mode=recipe.published_student, **keys),
            row("unit", "student_grad_bytes", "B",
                [4 * sum(p.numel() for p in student.parameters())],
                mode=recipe.published_student, **keys),
        ]
    return rows


# ---------------------------------------------------------------------------------------------
# plot

def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    colours = {"no_kd": "tab:green", "cache": "tab:blue", "stream": "tab:red"}
    styles = {"reconstruction": "-", "enhancement": "--", "segmentation": ":"}
    tp = [r for r in rows if r["curve"] == "throughput"]
    batch0 = statistics.mode([r["batch"] for r in tp]) if tp else 0
    size0 = statistics.mode([r["size"] for r in tp]) if tp else 0
    for ax, axis, fixed, fixed_value in ((axes[0, 0], "batch", "size", size0),
                                         (axes[0, 1], "size", "batch", batch0)):
        for recipe in RECIPES:
            for mode in MODES:
                pts = sorted((r[axis], r["best"]) for r in tp if r["recipe"] == recipe
                             and r["mode"] == mode and r[fixed] == fixed_value)
                if pts:
                    ax.plot(*zip(*pts), styles[recipe], marker="o", color=colours[mode],
                            label=f"{recipe} {mode}")
        ax.set_xlabel(f"{axis} ({fixed} {fixed_value})")
        ax.set_ylabel("training slices/s (best)")
        ax.set_yscale("log")
        ax.set_title(f"throughput vs {axis}, measured")
    axes[0, 0].legend(fontsize=6, ncol=1)
    def bars(ax, groups, series, height, ylabel, title):
        """Grouped bars: ``height(group, series) -> value or None`` for each pair."""
        for i, name in enumerate(series):
            ax.bar([j + 0.4 * i for j in range(len(groups))],
                   [height(g, name) or 0 for g in groups], 0.4, label=name)
        ax.set_xticks([j + 0.2 for j in range(len(groups))], groups)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)

    def best(curve, quantity, scale=1.0, **keys):
        return next((scale * r["best"] for r in rows if r["curve"] == curve
                     and r["quantity"] == quantity
                     and all(str(r[k]) == str(v) for k, v in keys.items())), None)

    configs = sorted({(r["ranks"], r["threads"]) for r in rows if r["curve"] == "ranks"
                      and r["quantity"] == "step_ms"})
    bars(axes[0, 2], [f"{n} rank x {t} thr" for n, t in configs],
         ("step_ms", "allreduce_ms_per_step"),
         lambda g, q: best("ranks", q, ranks=g.split()[0], threads=g.split()[3]),
         "ms per step (best)", "DeepSpeed ranks, same global batch, measured")
    names = list(RECIPES)
    bars(axes[1, 0], names, ("float16", "float32"),
         lambda n, d: best("cache", "disk_bytes_per_record", 1e-3, recipe=n, mode=d),
         "kB on disk per record", "teacher cache size, measured")
    bars(axes[1, 1], names, ("float16", "float32"),
         lambda n, d: best("cache", "read_vs_no_kd_step", 100, recipe=n, mode=d),
         "% of a no-KD step", "cache read time per batch, measured")
    sweep = [r for r in rows if r["curve"] == "sweep" and r["quantity"] == "total_s"]
    for mode, colour in (("sweep_shared", "tab:blue"), ("independent", "tab:red")):
        pts = sorted((r["trials"], r["best"]) for r in sweep if r["mode"] == mode)
        if pts:
            axes[1, 2].plot(*zip(*pts), marker="o", color=colour, label=mode)
    axes[1, 2].set_xlabel("trials N")
    axes[1, 2].set_ylabel("total wall seconds")
    axes[1, 2].set_title("sweep (shared teacher + cache) vs N runs, measured")
    if sweep:
        axes[1, 2].legend(fontsize=7)
    fig.suptitle(f"kdhpc scaling on {bench.device_name('cpu')} (load 1m: "
                 f"{min(r['load_1m'] for r in rows):.1f}-{max(r['load_1m'] for r in rows):.1f})")
    fig.tight_layout()
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# the sizing model

@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    volumes: int
    slices: int
    recon_size: tuple[int, int]   # DC-CNN: the full k-space grid (data consistency acts on it)
    image_size: tuple[int, int]   # enhancement / segmentation: the cropped image


DATASETS = (Dataset("fastMRI brain (multi-coil train)", 4500, 16, (640, 320), (320, 320)),
            Dataset("fastMRI knee (multi-coil train)", 1000, 35, (640, 368), (320, 320)))

# Assumptions of the projection (no GPU row was measured in this project).
GPU_TFLOPS = 20.0          # effective fp32/TF32 FLOP/s of one A100/H100-class GPU on these nets
GPU_WHY = ("A100 peaks at 19.5 TFLOP/s fp32 and 156 TF32; 32-64-channel convolutions at "
           "these sizes reach a small fraction of the TF32 peak, so 20 TFLOP/s effective "
           "(about 13% of TF32 peak) is taken; the FLOPs themselves are counted, not assumed")
NODE_READ_GBPS = 2.0       # node-local NVMe / parallel-FS share per node, GB/s
INTRA_GBPS, INTER_GBPS = 100.0, 12.5   # NVLink all-reduce bus bandwidth; 100 Gb/s per node
LATENCY_US = 10.0          # per all-reduce tree stage
BATCH_PER_GPU = 8
VIEWS = 1                  # records per slice in the cache (views_per_sample)
EPOCHS_SHOWN = 50


def latest_run(csv_path: Path) -> list[dict]:
    """Rows of the most recent run (its date) in ``csv_path``, numbers parsed."""
    with csv_path.open() as fh:
        rows = [r for r in csv.DictReader(fh)]
    if not rows:
        raise SystemExit(f"{csv_path}: no rows; run python benchmarks/scaling.py --quick first")
    last = max(r["date"] for r in rows)
    out = []
    for r in rows:
        if r["date"] == last:
            for k in ("best", "median", "load_1m"):
                r[k] = float(r[k])
            out.append(r)
    return out


def lookup(rows: list[dict], curve: str, quantity: str, **keys) -> float:
    for r in rows:
        if r["curve"] == curve and r["quantity"] == quantity and all(
                str(r[k]) == str(v) for k, v in keys.items()):
            return r["best"]
    raise KeyError(f"no measured row {curve}/{quantity} {keys}")


def allreduce_ms(grad_bytes: float, nodes: int, gpus: int) -> float:
    """Projected ring all-reduce of the gradients: bandwidth term on the slowest link plus a
    tree latency term."""
    world = nodes * gpus
    if world == 1:
        return 0.0
    bandwidth = (INTER_GBPS if nodes > 1 else INTRA_GBPS) * 1e9
    return 1e3 * (2 * (world - 1) / world * grad_bytes / bandwidth
                  + 2 * math.log2(world) * LATENCY_US * 1e-6)


def project(rows: list[dict]) -> str:
    """docs/scaling.md from the measured per-unit costs in ``rows`` (one run's rows)."""
    missing = {"throughput", "cache", "cache_io", "unit"} - {r["curve"] for r in rows}
    if missing:
        raise SystemExit(f"sizing model: the latest run in the CSV lacks the curve(s) "
                         f"{', '.join(sorted(missing))}; run python benchmarks/scaling.py "
                         f"--quick (or without --quick) first")
    lines = []
    env = rows[0]
    m = "**measured**"
    p = "*projected*"
    lines += [
        "# Scaling: measured curves and a fastMRI sizing model",
        "",
        "Generated by `python benchmarks/scaling.py --write-docs` from the latest run in "
        "`benchmarks/results/scaling.csv`; do not edit by hand. Labels: "
        f"{m} = a value from that run on `{env['device']}` (commit {env['commit']}, "
        f"{env['date']}, 1-minute load {min(r['load_1m'] for r in rows):.1f}-"
        f"{max(r['load_1m'] for r in rows):.1f} on a shared machine); {p} = computed by "
        "`benchmarks/scaling.py:project` from measured values and the assumptions below.",
        "", "## Measured on this machine", "",
        "![scaling curves](../benchmarks/results/scaling_cpu.png)", "",
    ]
    tp = [r for r in rows if r["curve"] == "throughput"]
    lines += ["Training throughput, best of interleaved rounds (slices/s, " + m + "):", "",
              "| recipe (CPU-size student) | batch | size | no KD | cached teacher | "
              "streamed teacher |", "|---|---|---|---|---|---|"]
    for key in sorted({(r["recipe"], int(r["batch"]), int(r["size"])) for r in tp}):
        vals = [lookup(tp, "throughput", "slices_per_s", recipe=key[0], batch=key[1],
                       size=key[2], mode=mode) for mode in MODES]
        lines.append(f"| {key[0]} ({RECIPES[key[0]].student}) | {key[1]} | {key[2]} | "
                     + " | ".join(f"{v:.3g}" for v in vals) + " |")
    rk = [r for r in rows if r["curve"] == "ranks"]
    if rk:
        lines += ["", "DeepSpeed ranks, same global batch and cores (" + m + "):", "",
                  "| ranks x threads | slices/s | ms/step | all-reduce ms/step |",
                  "|---|---|---|---|"]
        for ranks, threads in sorted({(int(r["ranks"]), int(r["threads"])) for r in rk
                                      if r["quantity"] == "step_ms"}):
            k = dict(ranks=ranks, threads=threads)
            lines.append(f"| {ranks} x {threads} | "
                         f"{lookup(rk, 'ranks', 'slices_per_s', **k):.3g} | "
                         f"{lookup(rk, 'ranks', 'step_ms', **k):.4g} | "
                         f"{lookup(rk, 'ranks', 'allreduce_ms_per_step', **k):.3g} |")
        lines += ["", f"Loss curves of 1 and 2 ranks: largest relative difference per step "
                  f"{lookup(rk, 'ranks', 'loss_max_rel_diff_1_vs_2'):.2g} ({m}); bare gloo "
                  f"all-reduce of the {lookup(rk, 'ranks', 'grad_bytes') / 1e3:.0f} kB of "
                  f"gradients: {lookup(rk, 'ranks', 'bare_allreduce_ms'):.3g} ms ({m})."]
    sw = [r for r in rows if r["curve"] == "sweep"]
    if sw:
        lines += ["", "Sweep of N trials (configs/recon_tiny.yaml, one at a time) against N "
                  "independent `kdhpc.distill` runs, total wall seconds (" + m + "):", "",
                  "| N | sweep (shared teacher + cache) | N independent runs | saved | ratio |",
                  "|---|---|---|---|---|"]
        for n in sorted({int(r["trials"]) for r in sw}):
            swept = lookup(sw, "sweep", "total_s", trials=n, mode="sweep_shared")
            alone = lookup(sw, "sweep", "total_s", trials=n, mode="independent")
            lines.append(f"| {n} | {swept:.1f} | {alone:.1f} | {alone - swept:.1f} | "
                         f"{alone / swept:.2f}x |")

    lines += ["", "## Assumptions of the projection", "",
              f"- GPU: no GPU row was measured in this project. One GPU runs {GPU_TFLOPS:g} "
              f"TFLOP/s effective on these networks: {GPU_WHY}. Model FLOPs per pixel are "
              f"{m} (counted by torch's FlopCounterMode at {rows_unit_size(rows)} pixels "
              "square; the DC-CNN's FFTs are not counted) and scale with the pixel count. "
              "Against this "
              "CPU's measured rate on the same work the assumed GPU is "
              + "; ".join(f"{cpu_factor(rows, n):.0f}x on the {n} teacher's forward"
                          for n in RECIPES) + ".",
              "- The CPU-side cache read (HDF5 read, CRC-32, float conversion) runs in the "
              "training loop before each step and does not overlap it; its rate per process is "
              f"{m} here and taken as is on a cluster node's core. Storage delivers "
              f"{NODE_READ_GBPS:g} GB/s per node (node-local NVMe or a parallel-FS share), "
              "shared by the node's GPUs.",
              "- Cache fill: teacher forward on the GPU plus the CPU-side write at the "
              f"{m} per-process write rate, every rank filling its own shard.",
              f"- All-reduce of fp32 gradients, ring bandwidth term at {INTRA_GBPS:g} GB/s "
              f"within a node (NVLink) or {INTER_GBPS:g} GB/s across nodes (100 Gb/s "
              f"network), plus {LATENCY_US:g} us per tree stage; not overlapped with backward.",
              f"- {BATCH_PER_GPU} slices per GPU per step, {VIEWS} cached view per slice "
              "(the published reconstruction config caches one view per slice; configs with "
              "more views multiply the cache size and fill time), weak scaling (global batch "
              "grows with the GPUs).",
              "- Images: DC-CNN runs on the full k-space grid (640x320 brain, 640x368 knee); "
              "the enhancement and segmentation pairs on the 320x320 crop. Input reading "
              "(multi-coil k-space, tens of MB per slice) is not modelled: convert to "
              "coil-combined single-coil files first (kdhpc.data.kdmri.convert_fastmri).",
              ""]

    io = [r for r in rows if r["curve"] == "cache_io"]
    io_size = max(int(r["size"]) for r in io)
    read_rate = lookup(io, "cache_io", "read_MB_per_s", size=io_size)
    write_rate = lookup(io, "cache_io", "write_MB_per_s", size=io_size)
    lines += ["## Projection for fastMRI on GPU nodes", "",
              f"Per-process cache rates used: read {read_rate:.0f} MB/s, write "
              f"{write_rate:.0f} MB/s ({m}, fp16 records of "
              f"{lookup(io, 'cache_io', 'record_bytes', size=io_size) / 1e6:.2g} MB: a "
              f"{io_size}x{io_size} output and 5 attention maps, the `cache_io` rows).", ""]
    bottlenecks: dict[str, dict[str, str]] = {n: {} for n in RECIPES}
    for ds in DATASETS:
        slices = ds.volumes * ds.slices
        lines += [f"### {ds.name}: {ds.volumes} volumes x {ds.slices} slices = {slices} "
                  "slices", "",
                  "| pair | image | cache (fp16) | nodes x GPUs | fill | epoch, cached | "
                  "epoch, streamed | step ms: student / cache read / teacher fwd / "
                  "all-reduce | bottleneck (cached) | streaming beats caching below |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, recipe in RECIPES.items():
            h, w = ds.recon_size if name == "reconstruction" else ds.image_size
            pixels = h * w
            per_pixel = {r["quantity"].split(":")[1]: r["best"] for r in rows
                         if r["curve"] == "cache" and r["recipe"] == name
                         and r["mode"] == "float16"
                         and r["quantity"].startswith("target_elements_per_pixel:")}
            raw = 2 * pixels * sum(per_pixel.values())
            measured_raw = sum(r["best"] for r in rows if r["curve"] == "cache"
                               and r["recipe"] == name and r["mode"] == "float16"
                               and r["quantity"].startswith("target_bytes_per_record:"))
            overhead = lookup(rows, "cache", "disk_bytes_per_record", recipe=name,
                              mode="float16") / measured_raw
            record_bytes = raw * overhead
            cache_bytes = slices * VIEWS * record_bytes
            t_fwd = (lookup(rows, "unit", "teacher_fwd_flops_per_pixel", recipe=name)
                     * pixels / (GPU_TFLOPS * 1e12))                       # s per slice
            t_student = (lookup(rows, "unit", "student_train_flops_per_pixel", recipe=name)
                         * pixels / (GPU_TFLOPS * 1e12))
            t_write = record_bytes / (write_rate * 1e6)
            grad = lookup(rows, "unit", "student_grad_bytes", recipe=name)
            for nodes in (1, 2, 4, 8):
                for gpus in (4, 8):
                    world = nodes * gpus
                    t_read = max(record_bytes / (read_rate * 1e6),
                                 record_bytes * gpus / (NODE_READ_GBPS * 1e9))
                    step = {"student": BATCH_PER_GPU * t_student * 1e3,
                            "cache read": BATCH_PER_GPU * t_read * 1e3,
                            "teacher fwd": BATCH_PER_GPU * t_fwd * 1e3,
                            "all-reduce": allreduce_ms(grad, nodes, gpus)}
                    steps_per_epoch = math.ceil(slices / (world * BATCH_PER_GPU))
                    cached_ms = step["student"] + step["cache read"] + step["all-reduce"]
                    streamed_ms = step["student"] + step["teacher fwd"] + step["all-reduce"]
                    fill_s = math.ceil(slices * VIEWS / world) * (t_fwd + t_write)
                    cached_terms = {k: v for k, v in step.items() if k != "teacher fwd"}
                    neck = max(cached_terms, key=cached_terms.get)
                    if ds is DATASETS[0] and (nodes, gpus) in ((1, 4), (8, 8)):
                        bottlenecks[name][f"{nodes} x {gpus}"] = neck
                    # Caching pays back when E epochs of teacher forwards exceed the fill plus
                    # E epochs of reads: E > V (t_fwd + t_write) / (t_fwd - t_read).
                    gain = t_fwd - t_read
                    crossover = (f"{VIEWS * (t_fwd + t_write) / gain:.2g} epoch(s)" if gain > 0
                                 else "always (a read costs more than a forward)")
                    lines.append(
                        f"| {recipe.published_teacher} -> {recipe.published_student} | "
                        f"{h}x{w} | {cache_bytes / 1e9:.3g} GB {p} | {nodes} x {gpus} | "
                        f"{_duration(fill_s)} {p} | "
                        f"{_duration(steps_per_epoch * cached_ms / 1e3)} {p} | "
                        f"{_duration(steps_per_epoch * streamed_ms / 1e3)} {p} | "
                        + " / ".join(f"{step[k]:.3g}" for k in ("student", "cache read",
                                                                "teacher fwd", "all-reduce"))
                        + f" {p} | {neck} | {crossover} {p} |")
        lines.append("")
    lines += ["Where the bottleneck is (the largest term of a cached step):", ""]
    for name, recipe in RECIPES.items():
        batch, size = cache_point(rows)
        tp_keys = dict(recipe=name, batch=batch, size=size)
        no_kd = lookup(rows, "throughput", "slices_per_s", mode="no_kd", **tp_keys)
        cached = lookup(rows, "throughput", "slices_per_s", mode="cache", **tp_keys)
        read = lookup(rows, "cache", "read_vs_no_kd_step", recipe=name, mode="float16")
        necks = ", ".join(f"{k} at {g}" for g, k in bottlenecks[name].items())
        cpu_neck = "the student step" if read < 1 else "the cache read"
        lines.append(f"- {recipe.published_teacher} -> {recipe.published_student}: on this CPU "
                     f"{cpu_neck} ({m}: a cached step runs at {cached / no_kd:.2f}x the "
                     f"no-KD rate and reading its targets takes {100 * read:.2g}% of a no-KD "
                     f"step, CPU-size pair at batch {tp_keys['batch']}, {tp_keys['size']}^2); on "
                     f"GPUs ({p}): {necks}.")
    lines += [
        "",
        "Per GPU the work of a step does not change with the number of GPUs (weak scaling): "
        "an epoch shrinks with nodes x GPUs while the all-reduce term grows across nodes and "
        "a node's storage share is divided among more GPUs. Streaming beats caching when "
        "fewer epochs than the crossover column are run, or always when a cached read costs "
        "more than the teacher forward it replaces. A sweep of N trials shares one fill: the "
        "crossover divides by N.",
        "",
        "## What breaks at scale, and what kdhpc does about it",
        "",
        "- **A cache larger than one node's disk.** `fill_cache` writes one shard per rank "
        "(`shard-RRRRR-of-WWWWW.h5`, rank r holding record ids [N r / W, N (r+1) / W)) plus "
        "`index.json` listing every shard with its size and SHA-256. Training draws records "
        "in a global random order, so every rank reads from every shard: the cache folder "
        "must be on a file system all nodes mount (Lustre, GPFS, NFS), or be copied whole "
        "to each node's local disk. A job on other nodes, with any number of ranks, opens "
        "`index.json` and reads the shards it needs; the filler's world size does not have "
        "to match. Each rank keeps the keys, CRC-32s and lookup of every record in memory "
        "(about 40 bytes per record) and memory-maps the (uncompressed) shards it touches. "
        "The fill itself needs the shared folder too: rank 0 writes `index.json` once every "
        "rank's shard and sidecar are there.",
        "- **Thousands of HDF5 files.** `FastMRISliceDataset` and `KDMRISliceDataset` open "
        "files lazily in `__getitem__` through `H5Handles`, a per-process LRU of at most "
        "`max_open_files` (32) read handles; memory per file is its name, slice count and "
        "parsed header. tests/test_fastmri.py reads 2,000 files with at most 8 handles open "
        "and checks that memory does not grow while reading. Building the index still opens "
        "every file once per rank (a metadata storm on a parallel file system at thousands "
        "of ranks x files); a shared file list is not implemented.",
        "- **Sweeps of hundreds of trials.** `kdhpc.sweep` runs stage A once (teacher and one "
        "teacher cache in `<sweep>/shared`) and submits the trials as one job array only "
        "after it succeeded, with `--array-parallelism K` (default 8) capping how many run at "
        "once, so the cache is filled once and never by a trial (a trial whose inputs reach a shared "
        "stage is refused). The readers are at most K trials x their ranks: with K trials "
        "reading a whole cache per epoch the storage must deliver K x (cache size / epoch "
        "time); choose K from the projected cache read rate above rather than from the "
        "number of GPUs free. At start every rank of every running trial opens every shard "
        "once to load its keys (K x ranks x shards opens), then reads only the records its "
        "batches need.",
        ""]
    return "\n".join(lines)


def cpu_factor(rows: list[dict], recipe: str) -> float:
    """The assumed GPU FLOP rate over this CPU's measured rate on the teacher's forward."""
    flops = lookup(rows, "unit", "teacher_fwd_flops_per_pixel", recipe=recipe)
    ms = lookup(rows, "unit", "teacher_fwd_ms_per_mpixel", recipe=recipe)
    return GPU_TFLOPS * 1e12 / (flops * 1e6 / (ms * 1e-3))


def cache_point(rows: list[dict]) -> tuple[int, int]:
    """(batch, size) at which the cache rows compared reads with the no-KD step."""
    first = next(r for r in rows if r["curve"] == "cache")
    return int(first["batch"]), int(first["size"])


def rows_unit_size(rows: list[dict]) -> str:
    return "/".join(sorted({str(r["size"]) for r in rows if r["curve"] == "unit"}))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def write_docs(csv_path: Path, out: Path = DOCS) -> Path:
    text = project(latest_run(csv_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp{os.getpid()}.{out.name}")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-class CPU, < 10 minutes")
    size.add_argument("--smallest", action="store_true", help="every curve at its smallest")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--write-docs", action="store_true",
                        help="only write docs/scaling.md from the latest run in the CSV")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where --write-docs writes")
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    parser.add_argument("--rank-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rank-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rank-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    results = Path(os.environ.get("KDHPC_RESULTS", bench.RESULTS))
    if args.rank_worker:
        torch.set_num_threads(args.threads)
        rank_worker(args)
        return
    if args.write_docs:
        print(write_docs(results / f"{TOPIC}.csv", args.docs))
        return
    sz = SIZES["smallest" if args.smallest else "quick" if args.quick else "full"]
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="kdhpc_scaling_"))
    start = time.perf_counter()
    try:
        rows = throughput_curves(sz, work, args.threads)
        no_kd_ms = {r["recipe"]: 1e3 * r["batch"] / r["best"] for r in rows
                    if r["mode"] == "no_kd" and r["batch"] == sz.batch0 and r["size"] == sz.size0}
        rows += cache_curve(sz, work, args.threads, no_kd_ms)
        rows += cache_io_curve(sz, work, args.threads)
        rows += ranks_curve(sz, work)
        rows += sweep_curve(sz, work)
        rows += unit_costs(sz, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - start
    notes = [f"{'smallest' if args.smallest else 'quick' if args.quick else 'full'} size, "
             f"{total:.0f} s in all; best = min time / max rate over interleaved rounds; "
             "load_1m = the 1-minute load average when the row was taken (shared 2-core "
             "machine)",
             f"ranks: loss curves of 1 and 2 ranks differ by at most "
             f"{next(r['best'] for r in rows if r['quantity'] == 'loss_max_rel_diff_1_vs_2'):.2g}"
             " relative per step",
             "CPU only: no GPU in this session; the fastMRI projection is in docs/scaling.md"]
    bench.print_table(rows)
    print("\n".join(notes))
    bench.write_results(TOPIC, rows, "cpu", notes, results_dir=results)
    plot(rows, results / f"{TOPIC}_{bench.device_slug('cpu')}.png")
    if not args.smallest:
        print(write_docs(results / f"{TOPIC}.csv", args.docs))


if __name__ == "__main__":
    main()
