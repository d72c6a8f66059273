"""The DeepSpeed training loop every recipe and sweep trains through, on one CPU or many GPUs.

Launch
------
One process (CPU laptop or one GPU): call :func:`train` from Python; with no launcher variables
the run is rank 0 of 1. Many processes on one machine::

    torchrun --nproc-per-node=2 -m kdhpc.distill CONFIG        # or: deepspeed --num_gpus 2 ...

On SLURM, one task per GPU with ``srun`` (no ssh, no hostfile); ranks come from the SLURM
variables (see :func:`discover_ranks`). DeepSpeed is the engine on every path; without a GPU
``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported and the backend is gloo.

Interfaces
----------
*Dataset of views* (map-style): ``len(ds)``, ``ds.num_views``, ``ds.get_view(index, view) ->
dict[str, Tensor]`` and ``ds.volume_of(index) -> hashable`` (evaluation groups slices by it).
View 0 must be the un-augmented view: evaluation reads ``get_view(index, 0)``. Training draws
the view of each (epoch, index) from ``range(num_views)`` deterministically from the run seed
(:func:`epoch_plan`), and every batch carries int64 ``index`` and ``view`` tensors [B] so that
a teacher source can key on them.

*Loss*: ``loss_fn(model, batch, targets) -> dict[str, Tensor]``: named scalar terms plus their
weighted total under ``"loss"`` (the one that is back-propagated). ``model`` is the DeepSpeed
engine (call it like the module); ``targets`` is the teacher source's dict, or ``None`` when
there is no teacher and during evaluation, where only the data terms can be computed.

*Teacher source*: anything with ``targets(batch) -> dict[str, Tensor]`` (``kdhpc.teacher``:
``StreamTeacher`` or ``CachedTeacher``). It stays outside the DeepSpeed engine.

*Evaluation*: ``eval_fn(model, batch) -> dict[str, Tensor[B]]`` gives per-slice values. Each
volume lives wholly on one rank (:func:`eval_batches`), which sums them per volume (keys ending
in ``_max`` take the maximum instead, e.g. a volume's data range); the per-volume sums are then
all-reduced and ``volume_metrics(sums) -> dict[str, float]`` turns one volume's sums into its
metrics (default: every key divided by ``"count"``). Reported metrics are means over volumes,
named ``val_<metric>`` (plus ``val_<metric>_std``). Without ``eval_fn`` the loss terms with
``targets=None`` are averaged over each volume's slices, so ``train.best_metric: val_loss``
selects on the data loss.

Batches, schedules and precision
--------------------------------
``train.batch_size`` is the global batch = micro batch x ranks x ``train.grad_accum``. Global
micro-step g of an epoch holds ``order[g*R*m : (g+1)*R*m]`` of that epoch's permutation, rank r
taking the r-th block of m, so a 1-rank run and an R-rank run at the same global batch see the
same samples in every optimiser step. An epoch has ``len(ds) // batch_size`` steps (the
remainder is dropped). LR factor f(step), warm-up (any kind) ``(s+1)/warmup`` for s < warmup:
constant 1; step ``gamma ** (epoch // step_size)`` with ``epoch = s // steps_per_epoch``; poly
``(1 - t/T) ** power``; cosine ``(1 + cos(pi t/T)) / 2``; t, T counted after warm-up. With
``train.precision: bf16`` DeepSpeed keeps the module in bf16 (fp32 master weights in the
optimiser) and every floating tensor of the batch is cast to bf16 before ``loss_fn``; teacher
targets are passed as the teacher source made them.

Checkpoints, resume and preemption
----------------------------------
Every ``train.checkpoint_every`` steps (0: at each epoch end) and at the end, all ranks call
``save_checkpoint`` into ``<run_dir>/checkpoints/step<NNNNNNNN>``; each rank also writes its
client state (step, epoch, data-stream position, RNG states, best metric, history, resolved
config) to ``client/rank<NNNNN>.pt``, loaded back with ``torch.load(weights_only=True)``. Only
after every rank finished does rank 0 mark the tag complete (``kdhpc_complete.json``, holding
the SHA-256 of every file of the tag) and point ``latest`` at it, so a kill during a save falls
back to the previous checkpoint. DeepSpeed unpickles its own files with ``weights_only=False``;
resume therefore first checks the tag's files against the recorded hashes and refuses a
checkpoint holding any file that was added or changed (:func:`verify_checkpoint`). DeepSpeed's
``zero_to_fp32`` converts a tag (ZeRO stage 1-3) to a plain state dict. The last
``train.keep_last`` are kept. A run resumes automatically from the newest complete checkpoint,
logs "resumed from step N (checkpoint PATH)" and ends with the same weights as an
uninterrupted run (same seed and world size; bitwise on CPU).

SIGTERM and SIGUSR1 (SLURM's warning: ``#SBATCH --signal=USR1@120``) set a flag; ranks agree
on it through an all-reduce at every micro-step, so a signal that reaches ranks at different
times still stops all of them at the same step boundary. Every rank then checkpoints and raises
:class:`Preempted`, a ``SystemExit`` with code :data:`EXIT_REQUEUE` (75, EX_TEMPFAIL), which a
SLURM script turns into ``scontrol requeue``. Test harnesses can act at step boundaries through
:data:`step_callbacks` (the preemption drills in ``tests/drills.py`` send SIGTERM there).

Guards and outputs
------------------
A micro-batch whose loss terms are not all finite (on any rank) is reported with its step and
term names and dropped on every rank (no backward; the next micro-batch fills its place). After
``train.max_bad_steps`` such micro-batches the next one raises :class:`TrainingDiverged`.
Rank 0 reports progress on stderr with every loss term and slices/s (:class:`ProgressReport`: a
bar on a terminal, a plain line per 10% or 30 s otherwise) and writes ``train_log.csv``,
``eval_log.csv``, ``log.jsonl`` (and TensorBoard scalars under ``tb/`` when tensorboard is
installed), ``config.yaml``, ``final_model.pt`` and ``best_model.pt`` (plain state dicts,
gathered across ranks under ZeRO-3; load with :func:`load_weights`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from kdhpc.config import (Config, ConfigError, ScheduleConfig, TrainConfig, describe_changes,
                          save_config, sha256_file, to_dict, write_atomic)

log = logging.getLogger("kdhpc.train")

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED_CONFIGS = REPO / "configs" / "deepspeed"

EXIT_REQUEUE = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 after checkpointing: requeue it (EX_TEMPFAIL)."""

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

step_callbacks: list[Callable[[int, int], None]] = []
"""Called as ``callback(step, rank)`` after every optimiser step, once the step's logging,
evaluation and checkpoint are done. kdhpc itself never fills this list; it is for test
harnesses and instrumentation (``tests/drills.py`` sends SIGTERM at a chosen step here)."""

# Streams of the run seed (np.random.SeedSequence entropy), so that each use draws independently.
_ORDER_STREAM, _VIEW_STREAM, _RANK_STREAM, _LOADER_STREAM = 0, 1, 2, 3


class Preempted(SystemExit):
    """Raised on every rank after a SIGTERM/SIGUSR1 checkpoint; exits with :data:`EXIT_REQUEUE`."""

    def __init__(self, step: int | None, checkpoint: Path | None, stage: str | None = None):
        super().__init__(EXIT_REQUEUE)
        self.step = step
        self.checkpoint = checkpoint
        self.stage = stage

    def __str__(self) -> str:
        if self.stage is not None:
            return (f"preempted at a stage boundary ({self.stage}); finished stages are "
                    f"recorded; exit code {EXIT_REQUEUE} asks for a requeue")
        return (f"preempted: checkpointed step {self.step} to {self.checkpoint}; exit code "
                f"{EXIT_REQUEUE} asks for a requeue")


_preempt_requested = False


def _on_preempt_signal(signum, frame) -> None:
    global _preempt_requested
    _preempt_requested = True
    log.warning("received %s; checkpointing at the next step or stage boundary",
                signal.Signals(signum).name)


def install_preemption_handlers() -> None:
    """Make SIGTERM / SIGUSR1 set a process-wide flag instead of killing the process.

    Installed once for the whole run (training, evaluation, cache fills and reports alike), so
    a signal that arrives between two training loops is not lost: the engine honours it at its
    next step, :class:`kdhpc.recipe.Stages` at the next stage boundary.
    """
    if threading_is_main():
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, _on_preempt_signal)


def ignore_preemption_signals() -> None:
    """For a process that only exits from here on: ignore SIGTERM / SIGUSR1. Python resets its
    own handlers to the default action (terminate) during interpreter shutdown, so a late SLURM
    warning would otherwise turn a clean exit (0, or 75 after a checkpoint) into a signal death."""
    if threading_is_main():
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def preemption_requested() -> bool:
    """Whether this process received SIGTERM / SIGUSR1 (see :func:`agree_any`)."""
    return _preempt_requested


def preempt(step: int | None, checkpoint: Path | None, stage: str | None = None) -> Preempted:
    """The :class:`Preempted` to raise for the pending request, which it consumes (a library
    caller that catches it can train again in the same process)."""
    global _preempt_requested
    _preempt_requested = False
    return Preempted(step, checkpoint, stage)


def agree_any(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (one all-reduce; no-op alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class TrainingDiverged(RuntimeError):
    """More non-finite loss steps than ``train.max_bad_steps`` allows."""


# ---------------------------------------------------------------------------------------------
# rank discovery

@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job and how to reach rank 0."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "env" (torchrun / deepspeed launcher), "slurm" or "single"

    def environ(self) -> dict[str, str]:
        """The variables DeepSpeed and torch.distributed read (DeepSpeed ignores SLURM_*)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


_RANGE = re.compile(r"\[([^\[\]]*)\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist (``gpu[01-03,07],login1``) into host names, in order.

    Handles comma-separated hosts, any number of bracket groups per host, ranges keeping their
    zero padding (``[08-10]`` -> 08, 09, 10) and single numbers. Raises ValueError on anything
    else (then :func:`discover_ranks` asks ``scontrol show hostnames``).
    """
    hosts: list[str] = []
    depth, start = 0, 0
    parts = []
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0 or depth > 1:
            raise ValueError(f"SLURM nodelist {nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    if depth != 0:
        raise ValueError(f"SLURM nodelist {nodelist!r}: unbalanced brackets")
    for part in parts:
        part = part.strip()
        if not part or not re.fullmatch(r"[A-Za-z0-9._\-\[\],]+", part):
            raise ValueError(f"SLURM nodelist {nodelist!r}: cannot parse host {part!r}")
        hosts += _expand_host(part, nodelist)
    return hosts


def _expand_host(pattern: str, nodelist: str) -> list[str]:
    match = _RANGE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    out = []
    for item in match.group(1).split(","):
        bounds = item.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            numbers = [str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise ValueError(f"SLURM nodelist {nodelist!r}: cannot parse range [{item}]")
        for number in numbers:
            out += _expand_host(head + number + tail, nodelist)
    return out


def scontrol_hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames NODELIST`` (the authority when the list is too exotic to parse)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot expand it myself and "
                           f"`scontrol show hostnames` failed: {err}") from None
    return out.stdout.split()


def slurm_master_port(job_id: str | int) -> int:
    """A port in [15000, 30000) derived from the job id, so jobs sharing a node do not collide
    (below Linux's default ephemeral range, which starts at 32768)."""
    return 15000 + int(job_id) % 15000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}: expected an integer, found "
                           f"{value!r}") from None


def discover_ranks(env: Mapping[str, str] | None = None,
                   hostnames: Callable[[str], list[str]] | None = None) -> RankInfo:
    """This process's rank, from a launcher's variables, else from SLURM, else rank 0 of 1.

    1. ``RANK`` and ``WORLD_SIZE`` set (torchrun, the deepspeed launcher): those, with
       ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (required when WORLD_SIZE > 1).
    2. Inside an srun step (``SLURM_PROCID`` and ``SLURM_STEP_ID`` set; a batch script's own
       shell is no step and counts as a single process): rank ``SLURM_PROCID``, world
       ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``, master = first host of
       ``SLURM_JOB_NODELIST`` (``hostnames(nodelist)``: default :func:`expand_nodelist`,
       falling back to ``scontrol show hostnames``), port :func:`slurm_master_port` of
       ``SLURM_JOB_ID``; an explicit MASTER_ADDR / MASTER_PORT wins.
    3. Otherwise a single process on 127.0.0.1 and a free port.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local = _int_var(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        if world > 1:
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
            if missing:
                raise RuntimeError(f"environment: WORLD_SIZE={world} but {', '.join(missing)} "
                                   f"not set; launch with torchrun / deepspeed / srun")
        addr = env.get("MASTER_ADDR") or "127.0.0.1"
        port = _int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else _free_port()
        info = RankInfo(rank, world, local, addr, port, "env")
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        rank = _int_var(env, "SLURM_PROCID")
        world = _int_var(env, "SLURM_NTASKS")
        local = _int_var(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if env.get("MASTER_ADDR"):
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise RuntimeError("SLURM: SLURM_JOB_NODELIST is not set; cannot find rank 0's host")
            if hostnames is None:
                try:
                    hosts = expand_nodelist(nodelist)
                except ValueError:
                    hosts = scontrol_hostnames(nodelist)
            else:
                hosts = hostnames(nodelist)
            if not hosts:
                raise RuntimeError(f"SLURM_JOB_NODELIST={nodelist!r}: expands to no host")
            addr = hosts[0]
        if env.get("MASTER_PORT"):
            port = _int_var(env, "MASTER_PORT")
        elif env.get("SLURM_JOB_ID"):
            port = slurm_master_port(_int_var(env, "SLURM_JOB_ID"))
        else:
            raise RuntimeError("SLURM: neither MASTER_PORT nor SLURM_JOB_ID is set")
        info = RankInfo(rank, world, local, addr, port, "slurm")
    else:
        info = RankInfo(0, 1, 0, "127.0.0.1", _free_port(), "single")
    if not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise RuntimeError(f"rank discovery ({info.source}): expected 0 <= rank < world_size and "
                           f"local_rank >= 0, found rank={info.rank} world_size="
                           f"{info.world_size} local_rank={info.local_rank}")
    return info


def init_distributed(info: RankInfo | None = None) -> RankInfo:
    """Set DS_ACCELERATOR (cpu without a GPU), export the rank variables, initialise
    ``deepspeed.comm`` (gloo on CPU, nccl on GPU) once per process and return the ranks."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        info = RankInfo(dist.get_rank(), dist.get_world_size(), local,
                        os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", 0)),
                        "initialised")
    else:
        info = info or discover_ranks()
        os.environ.update(info.environ())
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator().device_name()
    if not torch.cuda.is_available() and accel != "cpu":
        raise RuntimeError(f"DeepSpeed picked accelerator {accel!r} on a machine without a GPU: "
                           "it was imported before DS_ACCELERATOR=cpu could be set; set it in "
                           "the environment or call kdhpc.train.init_distributed first")
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    return info


# ---------------------------------------------------------------------------------------------
# seeding

def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for (run seed, keys...), independent across keys (SeedSequence)."""
    return int(np.random.SeedSequence([seed % 2**63, *keys]).generate_state(1)[0])


def seed_everything(seed: int, *keys: int) -> int:
    """Seed torch, numpy and ``random`` from (seed, keys...); returns the derived seed.

    Build the student after ``seed_everything(cfg.train.seed)`` with no keys so that every rank
    starts from the same weights (train() also broadcasts rank 0's); the loop itself seeds each
    rank with ``(seed, 2, rank)`` so that dropout and the like differ between ranks.
    """
    derived = derive_seed(seed, *keys)
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)
    return derived


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed
    (itself derived from (run seed, rank, epoch) and the worker id) and leave the preemption
    signals to the main process, which checkpoints and then shuts the workers down."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# data: views, training order, evaluation sharding

class ViewDataset(Protocol):
    """What :func:`train` and the teacher cache read (see the module docstring)."""

    num_views: int

    def __len__(self) -> int: ...

    def get_view(self, index: int, view: int) -> dict[str, torch.Tensor]: ...

    def volume_of(self, index: int) -> Hashable: ...


def check_view_dataset(dataset: Any, name: str) -> None:
    """Raise a TypeError naming ``name`` and the missing part of the view-dataset interface."""
    missing = [a for a in ("__len__", "get_view", "num_views") if not hasattr(dataset, a)]
    if missing:
        raise TypeError(f"{name}: expected a dataset of views (len, num_views, get_view(index, "
                        f"view), volume_of(index)); {type(dataset).__name__} lacks "
                        f"{', '.join(missing)}")
    if not isinstance(dataset.num_views, int) or dataset.num_views < 1:
        raise ValueError(f"{name}.num_views: expected a positive int, found {dataset.num_views!r}")
    if len(dataset) == 0:
        raise ValueError(f"{name}: expected a non-empty dataset, found 0 items")


class ViewItems(Dataset):
    """Indexed by ``(index, view)``: ``get_view(index, view)`` plus int64 ``index`` and ``view``."""

    def __init__(self, dataset: ViewDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, view = key
        item = self.dataset.get_view(index, view)
        if not isinstance(item, dict):
            raise TypeError(f"get_view({index}, {view}): expected a dict of tensors, found "
                            f"{type(item).__name__}")
        for name, value in (("index", index), ("view", view)):
            if name in item and int(item[name]) != value:
                raise ValueError(f"get_view({index}, {view}): item['{name}'] is "
                                 f"{int(item[name])}, expected {value}")
        return {**item, "index": torch.tensor(index, dtype=torch.int64),
                "view": torch.tensor(view, dtype=torch.int64)}


def epoch_plan(n: int, num_views: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, views) of one epoch: a permutation of range(n) and each index's view id.

    Both depend only on (seed, epoch), never on the number of ranks, so a resumed or rescaled
    run replays the same data; ``views[i]`` is the view sample i is shown in this epoch.
    """
    order = np.random.default_rng([seed % 2**63, epoch, _ORDER_STREAM]).permutation(n)
    views = np.random.default_rng([seed % 2**63, epoch, _VIEW_STREAM]).integers(0, num_views, n)
    return order, views


class RankMicroBatches:
    """Batch sampler of one rank's micro-batches of ``(index, view)`` for one epoch.

    Global micro-step g holds ``order[g*R*m : (g+1)*R*m]``; rank r takes block r of size m.
    ``start`` skips the first global micro-steps (resuming mid-epoch).
    """

    def __init__(self, order: np.ndarray, views: np.ndarray, micro: int, rank: int, world: int,
                 micro_steps: int, start: int = 0):
        self.order, self.views = order, views
        self.micro, self.rank, self.world = micro, rank, world
        self.micro_steps, self.start = micro_steps, start

    def __len__(self) -> int:
        return max(0, self.micro_steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        span = self.micro * self.world
        for g in range(self.start, self.micro_steps):
            lo = g * span + self.rank * self.micro
            idx = self.order[lo:lo + self.micro]
            yield [(int(i), int(self.views[i])) for i in idx]


def volume_ids(dataset: ViewDataset) -> list[int]:
    """Each item's volume as an integer id in order of first appearance (same on every rank)."""
    if not hasattr(dataset, "volume_of"):
        raise TypeError(f"evaluation: {type(dataset).__name__} has no volume_of(index); the "
                        "evaluation sampler keeps each volume on one rank")
    ids: dict[Hashable, int] = {}
    return [ids.setdefault(dataset.volume_of(i), len(ids)) for i in range(len(dataset))]


def rank_volume_indices(volumes: Sequence[int], rank: int, world: int) -> list[int]:
    """Item indices of the volumes assigned to ``rank``, by the data layer's rule
    (``VolumeSliceDataset.rank_indices``: whole volumes, largest first to the least-loaded
    rank), so evaluation here and in the recipes partitions identically."""
    from kdhpc.data.fastmri import VolumeSliceDataset

    class _Volumes(VolumeSliceDataset):
        def __init__(self):
            self._index = [(v, 0) for v in volumes]

    return _Volumes().rank_indices(rank, world)


def eval_batches(volumes: Sequence[int], rank: int, world: int,
                 batch_size: int) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches as (indices, real); a batch never spans two volumes.

    Every rank gets the same number of batches (padding with ``real=False`` repeats of its
    first batch, or of item 0 when it holds no volume): under ZeRO-3 each forward gathers
    parameters collectively, so all ranks must run the same number of forwards.
    """
    def batches_of(r: int) -> list[list[int]]:
        out, current = [], []
        for i in rank_volume_indices(volumes, r, world):
            if current and (len(current) == batch_size or volumes[current[-1]] != volumes[i]):
                out.append(current)
                current = []
            current.append(i)
        return out + ([current] if current else [])

    counts = [len(batches_of(r)) for r in range(world)]
    mine = [(b, True) for b in batches_of(rank)]
    filler = mine[0][0] if mine else [0]
    return mine + [(filler, False)] * (max(counts) - len(mine))


# ---------------------------------------------------------------------------------------------
# optimiser, schedule, DeepSpeed config

def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """torch.optim optimiser from ``cfg.optim`` (Adam/AdamW/SGD)."""
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    raise ConfigError(f"optim.name: expected one of 'adam', 'adamw', 'sgd', found {o.name!r}")


def lr_factor(schedule: ScheduleConfig, steps_per_epoch: int,
              total_steps: int) -> Callable[[int], float]:
    """The multiplier of ``optim.lr`` at optimiser step s (formulas in the module docstring)."""
    warmup = schedule.warmup_steps

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        t, span = s - warmup, max(1, total_steps - warmup)
        if schedule.kind == "constant":
            return 1.0
        if schedule.kind == "step":
            return schedule.gamma ** ((s // steps_per_epoch) // schedule.step_size)
        if schedule.kind == "poly":
            return max(0.0, 1.0 - t / span) ** schedule.power
        if schedule.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
        raise ConfigError(f"schedule.kind: expected constant, step, poly or cosine, found "
                          f"{schedule.kind!r}")

    return factor


def deepspeed_config(train_cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config dict: the JSON template, then batch, accumulation and clipping
    from ``train`` (the config tree is authoritative; a template disagreeing is reported)."""
    path = Path(train_cfg.deepspeed_config) if train_cfg.deepspeed_config else (
        DEEPSPEED_CONFIGS / f"zero{train_cfg.zero_stage}_{train_cfg.precision}.json")
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: file {path} not found")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    per_step = world_size * train_cfg.grad_accum
    if train_cfg.batch_size % per_step:
        raise ConfigError(f"train.batch_size: expected a multiple of ranks x grad_accum = "
                          f"{world_size} x {train_cfg.grad_accum} = {per_step}, found "
                          f"{train_cfg.batch_size}")
    wanted = {"train_batch_size": train_cfg.batch_size,
              "train_micro_batch_size_per_gpu": train_cfg.batch_size // per_step,
              "gradient_accumulation_steps": train_cfg.grad_accum,
              "gradient_clipping": train_cfg.grad_clip}
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            log.warning("%s: %s=%s replaced by %s from the kdhpc config", path, key, ds[key], value)
    ds.update(wanted)
    zero = ds.setdefault("zero_optimization", {})
    if train_cfg.deepspeed_config and zero.get("stage", 0) != train_cfg.zero_stage:
        log.warning("%s: zero_optimization.stage=%s replaced by train.zero_stage=%s", path,
                    zero.get("stage", 0), train_cfg.zero_stage)
    zero["stage"] = train_cfg.zero_stage
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": train_cfg.precision == "bf16"}
    return ds


# ---------------------------------------------------------------------------------------------
# checkpoints

_TAG = re.compile(r"step(\d{8})$")
_COMPLETE = "kdhpc_complete.json"


def complete_checkpoints(ckpt_dir: Path) -> list[str]:
    """Tags of checkpoints every rank finished writing, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / _COMPLETE).is_file()]
    return sorted(tags)


class CheckpointRefused(RuntimeError):
    """A checkpoint whose files differ from those recorded when it was saved; nothing in it
    was unpickled."""


def checkpoint_file_hashes(tag_dir: Path) -> dict[str, str]:
    """SHA-256 of every file under a checkpoint tag folder (but its completion record), keyed
    by the path relative to the folder."""
    return {p.relative_to(tag_dir).as_posix(): sha256_file(p)
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != _COMPLETE}


def verify_checkpoint(tag_dir: str | os.PathLike) -> None:
    """Raise :class:`CheckpointRefused` unless the files under ``tag_dir`` are exactly those its
    completion record lists, with the same SHA-256.

    DeepSpeed's loader unpickles its ``*.pt`` files with ``weights_only=False`` (and ZeRO reads
    every optimiser-state file it finds by name), so a file planted or altered after the save
    could run code on resume; this check runs first and reads no pickle.
    """
    tag_dir = Path(tag_dir)
    record = tag_dir / _COMPLETE
    try:
        wanted = json.loads(record.read_text())["files"]
        if not isinstance(wanted, dict):
            raise TypeError(f"'files' is a {type(wanted).__name__}")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointRefused(
            f"{record}: expected the SHA-256 of each checkpoint file, found none ({err}); "
            f"refusing to load {tag_dir} (saved by an older kdhpc or altered); delete that "
            f"folder to resume from an earlier checkpoint or start over") from None
    found = {p.relative_to(tag_dir).as_posix(): p for p in sorted(tag_dir.rglob("*"))
             if (p.is_file() or p.is_symlink()) and p.name != _COMPLETE}
    problems = [f"{name}: not written by the save" for name in found if name not in wanted]
    problems += [f"{name}: missing" for name in wanted if name not in found]
    problems += [f"{name}: SHA-256 differs from the one recorded at save time"
                 for name, path in found.items()
                 if name in wanted and (path.is_symlink() or sha256_file(path) != wanted[name])]
    if problems:
        raise CheckpointRefused(
            f"{tag_dir}: refusing to load this checkpoint (its files would be unpickled, which "
            f"can run code): {'; '.join(problems)}; remove what does not belong there or "
            f"delete the folder to resume from an earlier checkpoint")


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def rng_states() -> dict:
    """torch (CPU and CUDA), numpy and ``random`` states as tensors and lists (weights_only-safe)."""
    version, state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_rng_state(),
            "python": {"version": version, "state": list(state), "gauss_next": gauss_next}}


def set_rng_states(states: dict) -> None:
    """Inverse of :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` through a temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict written by :func:`train` (``final_model.pt`` / ``best_model.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise RuntimeError(f"{path}: cannot load as a weights-only state dict: {err}") from None


def gathered_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full fp32 state dict on rank 0 (None elsewhere). Collective under ZeRO-3."""
    import deepspeed

    def cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()}

    module = engine.module
    rank0 = dist.get_rank() == 0
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return cpu_copy(module) if rank0 else None
    return cpu_copy(module) if rank0 else None


# ---------------------------------------------------------------------------------------------
# logging

def ensure_stderr_logging() -> None:
    """Show kdhpc's INFO messages (resumes, cache repairs) on stderr, unless the application
    configured logging itself (a handler on the ``kdhpc`` logger or on the root logger)."""
    package = logging.getLogger("kdhpc")
    if not package.hasHandlers():
        handler = logging.StreamHandler()  # sys.stderr as it is when a record is emitted
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        package.addHandler(handler)
        if package.level == logging.NOTSET:
            package.setLevel(logging.INFO)


class ProgressReport:
    """Progress of one stage on stderr: a tqdm bar when stderr is a terminal; otherwise (a SLURM
    log, a redirected file) plain lines, one each time another ``every_fraction`` of ``total``
    is done or ``every_seconds`` have passed, and one at the end; no carriage returns.

    A line reads ``DESC: 120/400 steps (30%), loss=0.1 kd=0.05, 38.2 slices/s``: the terms of
    the latest :meth:`set_terms` and the throughput since the previous line (``scale`` items
    of ``rate_unit`` per unit of progress, e.g. slices per step).
    """

    def __init__(self, desc: str, total: int, *, initial: int = 0, unit: str = "steps",
                 scale: float = 1.0, rate_unit: str | None = None, enabled: bool = True,
                 every_fraction: float = 0.1, every_seconds: float = 30.0, stream=None):
        self.desc, self.total, self.done, self.unit = desc, total, initial, unit
        self.scale, self.rate_unit = scale, rate_unit or f"{unit}/s"
        self.enabled = enabled and initial < total
        self.stream = stream if stream is not None else sys.stderr
        self.step_done = max(1, math.ceil(total * every_fraction))
        self.every_seconds = every_seconds
        self.terms: dict[str, float] = {}
        self.bar = None
        self.last_done, self.last_time = initial, time.perf_counter()
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit.rstrip("s"),
                            dynamic_ncols=True, file=self.stream)

    def set_terms(self, terms: Mapping[str, float]) -> None:
        self.terms = dict(terms)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.terms.items()}, refresh=False)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if (self.done - self.last_done >= self.step_done or self.done >= self.total
                or time.perf_counter() - self.last_time >= self.every_seconds):
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        rate = (self.done - self.last_done) * self.scale / max(now - self.last_time, 1e-9)
        terms = " ".join(f"{k}={v:.4g}" for k, v in self.terms.items())
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} "
              f"({100 * self.done / max(self.total, 1):.0f}%)" + (f", {terms}" if terms else "")
              + f", {rate:.3g} {self.rate_unit}", file=self.stream, flush=True)
        self.last_done, self.last_time = self.done, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done != self.last_done:
            self._line()
        self.enabled = False


class RunLog:
    """Rank 0's records: train_log.csv, eval_log.csv, log.jsonl and TensorBoard when installed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.headers: dict[str, list[str]] = {}
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by a run that died before its next checkpoint)."""
        if not self.enabled:
            return
        for name in ("train_log.csv", "eval_log.csv"):
            path = self.run_dir / name
            if path.is_file():
                with path.open(newline="") as fh:
                    rows = list(csv.reader(fh))
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows(
                    rows[:1] + [r for r in rows[1:] if int(r[0]) <= step])
                write_atomic(path, buf.getvalue())
        path = self.run_dir / "log.jsonl"
        if path.is_file():
            lines = [line for line in path.read_text().splitlines()
                     if line.strip() and json.loads(line).get("step", 0) <= step]
            write_atomic(path, "".join(line + "\n" for line in lines))

    def record(self, kind: str, row: dict) -> None:
        if not self.enabled:
            return
        with (self.run_dir / "log.jsonl").open("a") as fh:
            fh.write(json.dumps({"kind": kind, **row}) + "\n")
        if kind in ("train", "eval"):
            path = self.run_dir / f"{kind}_log.csv"
            new = not path.is_file() or path.stat().st_size == 0
            if not new:
                if kind not in self.headers:
                    with path.open(newline="") as fh:
                        self.headers[kind] = next(csv.reader(fh))
                header = self.headers[kind]
                if header != list(row):
                    raise RuntimeError(f"{path}: columns {header} differ from this run's "
                                       f"{list(row)}; move the old log away")
            with path.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(row), lineterminator="\n")
                if new:
                    writer.writeheader()
                writer.writerow(row)
            if self.tb is not None:
                for key, value in row.items():
                    if key not in ("step", "epoch") and isinstance(value, (int, float)):
                        self.tb.add_scalar(f"{kind}/{key}", value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------
# the loop

LossFn = Callable[[nn.Module, dict, "dict | None"], dict]
EvalFn = Callable[[nn.Module, dict], dict]


@dataclass
class TrainResult:
    """What a finished :func:`train` call leaves behind."""

    run_dir: Path
    steps: int
    best_metric: str | None
    best_value: float | None
    best_step: int | None
    best_weights: Path
    final_weights: Path
    checkpoint_dir: Path
    resumed_from: int | None
    bad_steps: int
    history: list[dict] = field(default_factory=list)


def _to_device(batch: dict, device: torch.device, float_dtype: torch.dtype | None) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if float_dtype is not None and value.is_floating_point():
                value = value.to(float_dtype)
        out[key] = value
    return out


def _check_terms(terms: Any, where: str) -> list[str]:
    if not isinstance(terms, dict) or "loss" not in terms:
        found = sorted(terms) if isinstance(terms, dict) else type(terms).__name__
        raise TypeError(f"{where}: expected a dict of scalar tensors with the total under "
                        f"'loss', found {found}")
    for name, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{where}: term '{name}': expected a scalar tensor, found {shape}")
    return list(terms)


def default_volume_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Each summed key divided by the volume's ``count`` (a mean over its slices)."""
    if "count" not in sums:
        return {k: v for k, v in sums.items()}
    return {k: v / sums["count"] for k, v in sums.items() if k != "count"}


class _Trainer:
    """State of one :func:`train` call (kept in one object so checkpoints can capture it)."""

    def __init__(self, cfg: Config, model: nn.Module, loss_fn: LossFn, train_set: ViewDataset,
                 val_set: ViewDataset | None, teacher: Any, eval_fn: EvalFn | None,
                 volume_metrics: Callable[[dict], dict] | None, run_dir: Path, progress: bool | None):
        self.cfg, self.loss_fn, self.teacher = cfg, loss_fn, teacher
        self.train_set, self.val_set = train_set, val_set
        self.eval_fn, self.run_dir = eval_fn, run_dir
        self.volume_metrics = volume_metrics or default_volume_metrics
        check_view_dataset(train_set, "train_set")
        if val_set is not None:
            check_view_dataset(val_set, "val_set")

        self.info = init_distributed()
        import deepspeed

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.rank0 = self.rank == 0
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if torch.cuda.is_available() else torch.device("cpu"))
        ds_config = deepspeed_config(t, self.world)
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.accum = t.grad_accum
        self.steps_per_epoch = len(train_set) // t.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size: expected at most the training set size "
                              f"{len(train_set)}, found {t.batch_size}")
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.float_dtype = torch.bfloat16 if t.precision == "bf16" else None

        model.to(self.device)
        if self.world > 1:
            # One starting point for all ranks even if a recipe seeded them differently.
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, 0)
        optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        factor = lr_factor(cfg.schedule, self.steps_per_epoch, self.total_steps)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))

        self.ckpt_dir = run_dir / "checkpoints"
        self.step = 0
        self.stream = (0, 0)  # (epoch, global micro-steps consumed in it)
        self.bad_steps = 0
        self.best: dict | None = None  # {"step", "value", "metrics"}
        self.history: list[dict] = []
        self.last_saved = -1
        self.resumed_from: int | None = None
        self.log = RunLog(run_dir, self.rank0)
        self.progress = self.rank0 and (cfg.train.progress if progress is None else progress)

    # -- checkpoints ------------------------------------------------------------------------

    def _client_state(self) -> dict:
        return {"step": self.step, "epoch": self.step // self.steps_per_epoch,
                "stream_epoch": self.stream[0], "stream_pos": self.stream[1],
                "bad_steps": self.bad_steps, "best": self.best, "history": self.history,
                "world_size": self.world, "rng": rng_states(), "config": to_dict(self.cfg)}

    def save_checkpoint(self) -> Path:
        tag = f"step{self.step:08d}"
        tag_dir = self.ckpt_dir / tag
        save_atomic(self._client_state(), tag_dir / "client" / f"rank{self.rank:05d}.pt")
        # save_latest=False: DeepSpeed's rank 0 would point 'latest' at the tag before the
        # other ranks finish; we do it after the barrier that closes save_checkpoint.
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False)
        if self.rank0:
            write_atomic(tag_dir / _COMPLETE, json.dumps({
                "step": self.step, "world_size": self.world,
                "files": checkpoint_file_hashes(tag_dir)}, indent=1))
            write_atomic(self.ckpt_dir / "latest", tag)
            self._prune()
        dist.barrier()
        self.last_saved = self.step
        return tag_dir

    def _prune(self) -> None:
        keep = set(complete_checkpoints(self.ckpt_dir)[-self.cfg.train.keep_last:])
        for path in self.ckpt_dir.iterdir():
            match = _TAG.match(path.name)
            if match and path.name not in keep and int(match.group(1)) <= self.step:
                shutil.rmtree(path, ignore_errors=True)

    def resume(self) -> None:
        tags = complete_checkpoints(self.ckpt_dir)
        if not tags:
            return
        tag = tags[-1]
        verify_checkpoint(self.ckpt_dir / tag)  # before DeepSpeed unpickles anything in it
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if load_path is None:
            raise RuntimeError(f"{self.ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
        client_dir = self.ckpt_dir / tag / "client"
        path = client_dir / f"rank{self.rank:05d}.pt"
        own = path.is_file()
        if not own:
            path = client_dir / "rank00000.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated file or foreign content
            raise RuntimeError(f"{path}: cannot load client state (weights_only=True): "
                               f"{err}") from None
        self.step = state["step"]
        self.stream = (state["stream_epoch"], state["stream_pos"])
        self.bad_steps, self.best, self.history = state["bad_steps"], state["best"], state["history"]
        if own and state["world_size"] == self.world:
            set_rng_states(state["rng"])
        else:
            seed_everything(self.cfg.train.seed, _RANK_STREAM, self.rank, self.step)
            log.warning("%s: saved by %d ranks, resuming on %d: RNG states re-seeded, the data "
                        "order is unchanged", self.ckpt_dir / tag, state["world_size"], self.world)
        changes = describe_changes(state["config"], to_dict(self.cfg))
        if changes and self.rank0:
            log.warning("resuming %s with a changed config: %s", self.ckpt_dir / tag,
                        "; ".join(changes))
        self.resumed_from = self.step
        self.last_saved = self.step
        self.log.truncate_after(self.step)
        if self.rank0:
            ensure_stderr_logging()
            log.info("resumed from step %d (checkpoint %s)", self.step, self.ckpt_dir / tag)

    # -- data --------------------------------------------------------------------------------

    def _loader(self, epoch: int, start: int) -> DataLoader:
        order, views = epoch_plan(len(self.train_set), self.train_set.num_views,
                                  self.cfg.train.seed, epoch)
        sampler = RankMicroBatches(order, views, self.micro, self.rank, self.world,
                                   self.steps_per_epoch * self.accum, start)
        generator = torch.Generator().manual_seed(
            derive_seed(self.cfg.train.seed, _LOADER_STREAM, self.rank, epoch))
        workers = self.cfg.data.num_workers
        return DataLoader(ViewItems(self.train_set), batch_sampler=sampler, num_workers=workers,
                          collate_fn=default_collate, worker_init_fn=seed_worker,
                          generator=generator, pin_memory=self.device.type == "cuda",
                          multiprocessing_context="fork" if workers else None)

    def micro_batches(self) -> Iterator[dict]:
        """Endless micro-batches from the saved stream position on, advancing ``self.stream``."""
        epoch, pos = self.stream
        while True:
            for batch in self._loader(epoch, pos):
                pos += 1
                self.stream = (epoch, pos)
                yield batch
            epoch, pos = epoch + 1, 0
            self.stream = (epoch, pos)

    # -- one step ----------------------------------------------------------------------------

    def _agree(self, *flags: bool) -> list[bool]:
        if self.world == 1:
            return list(flags)
        tensor = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]

    def train_step(self, batches: Iterator[dict], sums: dict[str, float]) -> bool:
        """One optimiser step; adds each term to ``sums``; returns whether a stop was agreed."""
        good, stop = 0, False
        while good < self.accum:
            batch = _to_device(next(batches), self.device, None)
            targets = self.teacher.targets(batch) if self.teacher is not None else None
            if self.float_dtype is not None:
                batch = _to_device(batch, self.device, self.float_dtype)
            terms = self.loss_fn(self.engine, batch, targets)
            names = _check_terms(terms, "loss_fn")
            values = torch.stack([terms[n].detach().float().reshape(()) for n in names]).cpu()
            finite = torch.isfinite(values)
            bad, stop = self._agree(not bool(finite.all()), preemption_requested())
            if bad:
                self._bad_step(sorted(n for n, ok in zip(names, finite.tolist()) if not ok), batch)
                continue
            self.engine.backward(terms["loss"])
            self.engine.step()
            good += 1
            for name, value in zip(names, values.tolist()):
                sums[name] = sums.get(name, 0.0) + value
        return stop

    def _bad_step(self, bad_terms: list[str], batch: dict) -> None:
        self.bad_steps += 1
        where = (f"step {self.step + 1}: non-finite loss term(s) "
                 f"{', '.join(bad_terms) or '(on another rank)'} on rank {self.rank} "
                 f"(samples {batch['index'].tolist()}, views {batch['view'].tolist()})")
        log.warning("%s; micro-batch dropped (%d of %d tolerated)", where, self.bad_steps,
                    self.cfg.train.max_bad_steps)
        self.log.record("bad_step", {"step": self.step + 1, "terms": bad_terms, "rank": self.rank,
                                     "index": batch["index"].tolist()})
        if self.bad_steps > self.cfg.train.max_bad_steps:
            raise TrainingDiverged(f"{where}; {self.bad_steps} non-finite steps exceed "
                                   f"train.max_bad_steps={self.cfg.train.max_bad_steps}")

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Metrics of the current weights on ``val_set`` (volume means over all ranks)."""
        volumes = volume_ids(self.val_set)
        batches = eval_batches(volumes, self.rank, self.world, self.cfg.eval.batch_size)
        items = ViewItems(self.val_set)
        loader = DataLoader(items, batch_sampler=[[(i, 0) for i in b] for b, _ in batches],
                            num_workers=self.cfg.data.num_workers, collate_fn=default_collate,
                            worker_init_fn=seed_worker,
                            multiprocessing_context="fork" if self.cfg.data.num_workers else None)
        n_vol = max(volumes) + 1
        sums: dict[str, torch.Tensor] = {}
        names: set[str] = set()

        def empty(key: str) -> torch.Tensor:  # [V]
            return torch.full((n_vol,), -math.inf if key.endswith("_max") else 0.0,
                              dtype=torch.float64)

        self.engine.eval()
        try:
            with torch.no_grad():
                for (indices, real), batch in zip(batches, loader):
                    batch = _to_device(batch, self.device, self.float_dtype)
                    values = self._eval_values(batch)
                    names.update(values)  # padding batches too: a rank may hold no volume
                    if not real:
                        continue
                    vol = volumes[indices[0]]
                    for key, value in values.items():
                        acc = sums.setdefault(key, empty(key))
                        if key.endswith("_max"):
                            acc[vol] = max(acc[vol].item(), value.max().item())
                        else:
                            acc[vol] += value.sum().item()
        finally:
            self.engine.train()
        keys = sorted(names)
        if not keys:
            raise TypeError("eval_fn: returned no values; expected a dict of per-slice tensors")
        table = torch.stack([sums.get(k, empty(k)) for k in keys])  # [K, V]
        is_max = torch.tensor([k.endswith("_max") for k in keys])[:, None]  # [K, 1]
        if self.world > 1:
            # A volume's sums are non-zero on its one owner: a SUM (MAX) all-reduce gathers them.
            summed = table.where(~is_max, 0.0).to(self.device)
            maxed = table.where(is_max, -math.inf).to(self.device)
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
            table = torch.where(is_max, maxed.cpu(), summed.cpu())
        per_volume = [self.volume_metrics({k: float(table[j, v]) for j, k in enumerate(keys)})
                      for v in range(n_vol)]
        metrics: dict[str, float] = {}
        for name in per_volume[0] if per_volume else []:
            values = np.array([m[name] for m in per_volume], dtype=np.float64)
            metrics[f"val_{name}"] = float(values.mean())
            metrics[f"val_{name}_std"] = float(values.std())
        return metrics

    def _eval_values(self, batch: dict) -> dict[str, torch.Tensor]:
        size = batch["index"].shape[0]
        if self.eval_fn is None:
            terms = self.loss_fn(self.engine, batch, None)
            names = _check_terms(terms, "loss_fn (evaluation, targets=None)")
            values = {n: terms[n].detach().double().reshape(1).expand(size) for n in names}
            values["count"] = torch.ones(size, dtype=torch.float64)
            return values
        values = self.eval_fn(self.engine, batch)
        if not isinstance(values, dict):
            raise TypeError(f"eval_fn: expected a dict of per-slice tensors [B], found "
                            f"{type(values).__name__}")
        out = {}
        for key, value in values.items():
            if not isinstance(value, torch.Tensor) or value.shape != (size,):
                shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise TypeError(f"eval_fn: '{key}': expected a tensor of shape [{size}] (one "
                                f"value per slice), found {shape}")
            out[key] = value.detach().double().cpu()
        return out

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.cfg.train.best_mode == "min":
            return value < self.best["value"]
        return value > self.best["value"]

    def run_eval(self) -> None:
        metrics = self.evaluate()
        name = self.cfg.train.best_metric
        if name not in metrics:
            raise ConfigError(f"train.best_metric: expected one of {sorted(metrics)}, found "
                              f"{name!r}")
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **metrics}
        self.history.append(row)
        self.log.record("eval", row)
        improved = self._is_better(metrics[name])
        if improved:
            self.best = {"step": self.step, "value": metrics[name], "metrics": metrics}
        state = gathered_state_dict(self.engine) if improved else None
        if improved and self.rank0:
            save_atomic(state, self.run_dir / "best_model.pt")
            write_atomic(self.run_dir / "best.json", json.dumps(self.best, indent=1))

    # -- main loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir)
        seed_everything(self.cfg.train.seed, _RANK_STREAM, self.rank)
        self.resume()
        install_preemption_handlers()
        try:
            self._loop()
        finally:
            self.log.close()
        return self._result()

    def _loop(self) -> None:
        t = self.cfg.train
        batches = self.micro_batches()
        sums: dict[str, float] = {}
        interval_steps, interval_start = 0, time.perf_counter()
        report = ProgressReport(self.run_dir.name, self.total_steps, initial=self.step,
                                scale=t.batch_size, rate_unit="slices/s", enabled=self.progress)
        try:
            while self.step < self.total_steps:
                stop = self.train_step(batches, sums)
                self.step += 1
                interval_steps += 1
                at_epoch_end = self.step % self.steps_per_epoch == 0
                last = self.step == self.total_steps
                if self.step % t.log_every == 0 or last or stop:
                    row = self._log_row(sums, interval_steps, time.perf_counter() - interval_start)
                    report.set_terms({k: v for k, v in row.items()
                                      if k not in ("step", "epoch", "lr", "slices_per_s",
                                                   "bad_steps")})
                    sums, interval_steps, interval_start = {}, 0, time.perf_counter()
                report.update(1)
                if self.val_set is not None and (
                        (t.eval_every and self.step % t.eval_every == 0)
                        or (not t.eval_every and at_epoch_end) or last):
                    self.run_eval()
                    interval_start = time.perf_counter()
                if ((t.checkpoint_every and self.step % t.checkpoint_every == 0)
                        or (not t.checkpoint_every and at_epoch_end) or last or stop):
                    path = self.save_checkpoint()
                    interval_start = time.perf_counter()
                    if stop and not last:
                        raise preempt(self.step, path)
                for callback in step_callbacks:
                    callback(self.step, self.rank)
        finally:
            report.close()
        if self.last_saved != self.step:
            self.save_checkpoint()

    def _log_row(self, sums: dict[str, float], steps: int, seconds: float) -> dict:
        names = sorted(sums)
        means = torch.tensor([sums[n] / (steps * self.accum) for n in names], dtype=torch.float64)
        if self.world > 1:
            means = means.to(self.device)  # nccl reduces device tensors only
            dist.all_reduce(means, op=dist.ReduceOp.SUM)
            means = means.cpu() / self.world
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
               "lr": self.engine.get_lr()[0],
               **{n: float(v) for n, v in zip(names, means.tolist())},
               "slices_per_s": steps * self.cfg.train.batch_size / max(seconds, 1e-9),
               "bad_steps": self.bad_steps}
        self.log.record("train", row)
        return row

    def _result(self) -> TrainResult:
        state = gathered_state_dict(self.engine)
        final = self.run_dir / "final_model.pt"
        if self.rank0:
            save_atomic(state, final)
        dist.barrier()
        best = self.best
        return TrainResult(
            run_dir=self.run_dir, steps=self.step,
            best_metric=self.cfg.train.best_metric if best else None,
            best_value=best["value"] if best else None, best_step=best["step"] if best else None,
            best_weights=self.run_dir / ("best_model.pt" if best else "final_model.pt"),
            final_weights=final, checkpoint_dir=self.ckpt_dir, resumed_from=self.resumed_from,
            bad_steps=self.bad_steps, history=list(self.history))


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    import threading
    return threading.current_thread() is threading.main_thread()


def train(cfg: Config, model: nn.Module, loss_fn: LossFn, train_set: ViewDataset, *,
          val_set: ViewDataset | None = None, teacher: Any = None, eval_fn: EvalFn | None = None,
          volume_metrics: Callable[[dict], dict] | None = None,
          run_dir: str | os.PathLike | None = None, progress: bool | None = None) -> TrainResult:
    """Train ``model`` with DeepSpeed on ``train_set``; resume from ``run_dir`` if it holds a
    checkpoint. Returns a :class:`TrainResult` (best metric, weights paths).

    ``run_dir`` defaults to ``cfg.run_dir``. Raises :class:`Preempted` (exit code 75) after a
    SIGTERM/SIGUSR1 checkpoint and :class:`TrainingDiverged` after too many non-finite losses.
    See the module docstring for every interface and file.
    """
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir)
    trainer = _Trainer(cfg, model, loss_fn, train_set, val_set, teacher, eval_fn,
                       volume_metrics, run_dir, progress)
    return trainer.run()
