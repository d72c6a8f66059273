"""kdhpc.train on one process: rank discovery, seeding, samplers, schedules, configs, the loop's
logs and its non-finite-loss guard. Multi-rank runs live in test_train_distributed.py.

The toy dataset of views, models and loss defined here are shared with test_teacher.py and
test_train_distributed.py (which import this module).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdhpc.config import Config, ConfigError, sha256_file
from kdhpc import train as T

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# toy pieces shared by the training and teacher tests

class ToyViews:
    """A dataset of views: smooth random slices in volumes of ``slices``; view v is the
    dihedral transform v % 8 plus noise seeded by (index, v) (its view key)."""

    def __init__(self, n_volumes: int = 3, slices: int = 4, size: int = 8, num_views: int = 4,
                 seed: int = 0, noise: float = 0.1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n_volumes * slices, 1, size, size, generator=g)
        self.images = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="circular"), 3, 1)  # [N, 1, H, W]
        self.slices, self.num_views, self.noise = slices, num_views, noise

    def __len__(self) -> int:
        return len(self.images)

    def volume_of(self, index: int) -> int:
        return index // self.slices

    def view_key(self, index: int, view: int) -> tuple[int, int]:
        return view % 8, 1000 * index + view

    def get_view(self, index: int, view: int) -> dict[str, torch.Tensor]:
        dihedral, noise_seed = self.view_key(index, view)
        target = torch.rot90(self.images[index], dihedral % 4, (-2, -1))
        if dihedral >= 4:
            target = target.flip(-1)
        g = torch.Generator().manual_seed(noise_seed)
        noisy = target + self.noise * torch.randn(target.shape, generator=g)
        return {"input": noisy, "target": target.contiguous(),
                "view_key": torch.tensor(self.view_key(index, view))}


class ToyNet(nn.Module):
    """Residual conv net returning (image, first-layer activations, 3-class logits)."""

    def __init__(self, width: int = 4, depth: int = 1):
        super().__init__()
        self.head = nn.Conv2d(1, width, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth - 1))
        self.out = nn.Conv2d(width, 1, 3, padding=1)
        self.logits = nn.Conv2d(width, 3, 1)

    def forward(self, x):
        a = torch.relu(self.head(x))  # [B, W, H, W]
        h = a
        for conv in self.body:
            h = torch.relu(conv(h))
        return x + self.out(h), a, self.logits(h)


def attention(a: torch.Tensor) -> torch.Tensor:
    """Per-sample L2-normalised sum over channels of a^2: [B, C, H, W] -> [B, 1, H, W]."""
    q = a.pow(2).sum(1, keepdim=True)
    return q / q.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]


def toy_extract(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    out, a, logits = model(batch["input"])
    return {"output": out, "attention_0": attention(a), "logits_0": logits}


def toy_loss(model, batch, targets, alpha: float = 0.5, temperature: float = 2.0):
    """(1-alpha) L1 + alpha (MSE to the teacher image + attention L2 + T^2 KL at T)."""
    out, a, logits = model(batch["input"])
    data = (out - batch["target"]).abs().mean()
    if targets is None:
        return {"data": data, "loss": data}
    imitation = (out - targets["output"]).pow(2).mean()
    at = (attention(a) - targets["attention_0"]).pow(2).sum((1, 2, 3)).mean()
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(
        targets["logits_0"] / temperature, 1), log_target=True, reduction="batchmean")
    kd = imitation + at + temperature ** 2 * kl / logits[0, 0].numel()
    return {"data": data, "imitation": imitation, "at": at, "kl": kl,
            "loss": (1 - alpha) * data + alpha * kd}


def toy_config(stage: int = 0, precision: str = "fp32", **train) -> Config:
    """6 optimiser steps over 12 samples: global batch 4, grad_accum 2, cosine with warm-up."""
    cfg = Config()
    t = cfg.train
    t.epochs, t.batch_size, t.grad_accum, t.zero_stage, t.precision = 2, 4, 2, stage, precision
    t.eval_every, t.checkpoint_every, t.keep_last, t.log_every, t.seed, t.threads = 3, 2, 2, 1, 7, 1
    t.best_metric = "val_loss"
    for key, value in train.items():
        setattr(t, key, value)
    cfg.optim.lr = 1e-2
    cfg.schedule.kind, cfg.schedule.warmup_steps = "cosine", 1
    cfg.eval.batch_size = 2
    return cfg


def toy_teacher() -> ToyNet:
    T.seed_everything(123)
    return ToyNet(width=8, depth=3)


def toy_student(seed: int = 7) -> ToyNet:
    T.seed_everything(seed)
    return ToyNet(width=4, depth=1)


@pytest.fixture
def one_thread():
    """train.threads=1 changes the process-wide torch setting; give it back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# rank discovery

def test_launcher_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
           "MASTER_PORT": "29400", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}
    info = T.discover_ranks(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port,
            info.source) == (3, 4, 1, "n1", 29400, "env")
    assert info.environ() == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                              "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}


def test_slurm_variables_map_to_ranks_and_first_host():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08,11],login2"}
    seen = []

    def fake_scontrol(nodelist):
        seen.append(nodelist)
        return ["gpu07", "gpu08", "gpu11", "login2"]

    info = T.discover_ranks(env, hostnames=fake_scontrol)
    assert seen == ["gpu[07-08,11],login2"]
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.source) == (
        5, 8, 1, "gpu07", "slurm")
    assert info.master_port == 15000 + 123456 % 15000
    # Our own parser gives the same hosts as the (fake) scontrol, zero padding included.
    assert T.expand_nodelist("gpu[07-08,11],login2") == fake_scontrol("")
    assert T.expand_nodelist("r[1-2]-n[09-10]") == ["r1-n09", "r1-n10", "r2-n09", "r2-n10"]
    assert T.discover_ranks(env).master_addr == "gpu07"
    # Different jobs on a shared node get different ports; an explicit MASTER_PORT wins.
    assert T.discover_ranks({**env, "SLURM_JOB_ID": "123457"}).master_port != info.master_port
    assert T.discover_ranks({**env, "MASTER_PORT": "4000"}).master_port == 4000


def test_batch_script_shell_and_bad_values():
    # sbatch's own shell has SLURM_PROCID but is no srun step: a single process, not rank 0 of 8.
    info = T.discover_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "9"})
    assert (info.rank, info.world_size, info.source) == (0, 1, "single")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        T.discover_ranks({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="RANK: expected an integer"):
        T.discover_ranks({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="0 <= rank < world_size"):
        T.discover_ranks({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="unbalanced"):
        T.expand_nodelist("gpu[01-02")


# ---------------------------------------------------------------------------------------------
# seeding, data order, views, evaluation sharding

def test_seeds_differ_per_rank_and_worker_but_repeat_per_run():
    assert T.derive_seed(7, 2, 0) == T.derive_seed(7, 2, 0)
    seeds = {T.derive_seed(7, 2, r) for r in range(8)} | {T.derive_seed(8, 2, 0)}
    assert len(seeds) == 9
    T.seed_everything(7, 2, 1)
    a = (torch.rand(3), np.random.rand(3))
    T.seed_everything(7, 2, 1)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_epoch_plan_is_deterministic_and_independent_of_ranks():
    order, views = T.epoch_plan(12, 4, seed=7, epoch=1)
    again = T.epoch_plan(12, 4, seed=7, epoch=1)
    assert np.array_equal(order, again[0]) and np.array_equal(views, again[1])
    assert sorted(order.tolist()) == list(range(12)) and set(views.tolist()) <= set(range(4))
    assert not np.array_equal(order, T.epoch_plan(12, 4, seed=7, epoch=2)[0])
    # Global micro-step g on R ranks covers the same samples as on one rank with R x micro.
    one = list(T.RankMicroBatches(order, views, micro=4, rank=0, world=1, micro_steps=3))
    two = [list(T.RankMicroBatches(order, views, micro=2, rank=r, world=2, micro_steps=3))
           for r in range(2)]
    for g in range(3):
        assert two[0][g] + two[1][g] == one[g]
        assert one[g] == [(int(i), int(views[i])) for i in order[4 * g:4 * g + 4]]
    resumed = list(T.RankMicroBatches(order, views, micro=4, rank=0, world=1, micro_steps=3,
                                      start=1))
    assert resumed == one[1:]


def test_view_items_carry_index_and_view():
    ds = ToyViews()
    item = T.ViewItems(ds)[(5, 3)]
    expected = ds.get_view(5, 3)
    assert int(item["index"]) == 5 and int(item["view"]) == 3
    assert torch.equal(item["input"], expected["input"])
    with pytest.raises(TypeError, match="lacks get_view"):
        T.check_view_dataset(list(range(3)), "train_set")


def test_eval_batches_keep_volumes_whole_and_counts_equal():
    volumes = [0] * 3 + [1] * 5 + [2] * 2 + [3] * 1
    for world in (1, 2, 3, 5):
        per_rank = [T.eval_batches(volumes, r, world, batch_size=2) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # same number of forwards everywhere
        seen = []
        for batches in per_rank:
            for indices, real in batches:
                assert len(indices) <= 2 and len({volumes[i] for i in indices}) == 1
                if real:
                    seen += indices
        assert sorted(seen) == list(range(len(volumes)))  # every slice exactly once
        owner = {}
        for r, batches in enumerate(per_rank):
            for indices, real in batches:
                if real:
                    assert owner.setdefault(volumes[indices[0]], r) == r


# ---------------------------------------------------------------------------------------------
# schedules and DeepSpeed configs

def test_lr_factors_match_their_formulas():
    cfg = Config().schedule
    cfg.kind, cfg.warmup_steps = "cosine", 2
    f = T.lr_factor(cfg, steps_per_epoch=5, total_steps=12)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(7) == pytest.approx(0.5) and f(12) == pytest.approx(0)
    cfg.kind, cfg.power = "poly", 0.9
    assert f(2) == 1.0 and T.lr_factor(cfg, 5, 12)(7) == pytest.approx(0.5 ** 0.9)
    cfg.kind, cfg.warmup_steps, cfg.step_size, cfg.gamma = "step", 0, 2, 0.1
    g = T.lr_factor(cfg, steps_per_epoch=5, total_steps=100)
    assert [g(9), g(10), g(19), g(20)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_every_shipped_deepspeed_config_resolves():
    for stage in range(4):
        for precision in ("fp32", "bf16"):
            train_cfg = Config().train
            train_cfg.zero_stage, train_cfg.precision = stage, precision
            train_cfg.batch_size, train_cfg.grad_accum, train_cfg.grad_clip = 16, 2, 1.5
            ds = T.deepspeed_config(train_cfg, world_size=4)
            assert ds["zero_optimization"]["stage"] == stage
            assert ds["bf16"]["enabled"] == (precision == "bf16")
            assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
                    ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (16, 2, 2, 1.5)
    with pytest.raises(ConfigError, match="train.batch_size: expected a multiple of ranks"):
        T.deepspeed_config(train_cfg, world_size=3)


def test_rng_states_round_trip_through_weights_only(tmp_path):
    T.seed_everything(3)
    states = T.rng_states()
    T.save_atomic(states, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(4), [__import__("random").random() for _ in range(4)])
    T.seed_everything(99)
    T.set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(4), np.random.rand(4), [__import__("random").random() for _ in range(4)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


# ---------------------------------------------------------------------------------------------
# the loop on one process

def test_logs_hold_every_term_and_match_an_independent_forward(tmp_path, one_thread):
    cfg = toy_config(epochs=1, grad_accum=1)  # 3 steps of batch 4
    student = toy_student()
    reference = toy_student()
    teacher = toy_teacher()
    from kdhpc.teacher import StreamTeacher

    result = T.train(cfg, student, toy_loss, ToyViews(), val_set=ToyViews(3, 3, seed=1),
                     teacher=StreamTeacher(teacher, toy_extract), run_dir=tmp_path / "run",
                     progress=True)
    with (tmp_path / "run" / "train_log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert {"data", "imitation", "at", "kl", "loss", "slices_per_s", "lr"} <= set(rows[0])
    # Step 1's logged terms equal a plain forward of the initial weights on epoch 0's batch.
    order, views = T.epoch_plan(12, 4, seed=cfg.train.seed, epoch=0)
    items = [T.ViewItems(ToyViews())[(int(i), int(views[i]))] for i in order[:4]]
    batch = torch.utils.data.default_collate(items)
    with torch.no_grad():
        expected = toy_loss(reference, batch, toy_extract(teacher, batch))
    for name, value in expected.items():
        assert float(rows[0][name]) == pytest.approx(value.item(), rel=1e-5), name
    # Warm-up of 1 step then cosine: logged lr is the factor after each step.
    f = T.lr_factor(cfg.schedule, 3, 3)
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-2 * f(s) for s in (1, 2, 3)])
    # Evaluation at step 3 (eval_every=3): the data loss of the final weights, volume-averaged.
    final = toy_student()
    final.load_state_dict(T.load_weights(result.final_weights))
    val = ToyViews(3, 3, seed=1)
    per_volume = []
    for v in range(3):
        batch = torch.utils.data.default_collate([T.ViewItems(val)[(i, 0)]
                                                  for i in range(3 * v, 3 * v + 3)])
        with torch.no_grad():
            # eval batches of 2 then 1 slice: the default metric averages batch means per slice
            a = toy_loss(final, {k: x[:2] for k, x in batch.items()}, None)["loss"] * 2
            b = toy_loss(final, {k: x[2:] for k, x in batch.items()}, None)["loss"]
        per_volume.append((a + b).item() / 3)
    assert result.best_value == pytest.approx(np.mean(per_volume), rel=1e-5)
    assert result.best_step == 3 and result.steps == 3
    assert torch.equal(T.load_weights(result.best_weights)["head.weight"],
                       T.load_weights(result.final_weights)["head.weight"])
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("eval") == 1
    # A finished run called again resumes at its end and returns the same result.
    again = T.train(cfg, toy_student(), toy_loss, ToyViews(), val_set=ToyViews(3, 3, seed=1),
                    teacher=StreamTeacher(teacher, toy_extract), run_dir=tmp_path / "run",
                    progress=False)
    assert again.resumed_from == 3 and again.best_value == result.best_value
    assert torch.equal(T.load_weights(again.final_weights)["out.weight"],
                       T.load_weights(result.final_weights)["out.weight"])


def test_non_finite_loss_is_reported_with_step_and_term_then_stops(tmp_path, one_thread):
    poisoned = {5}  # sample 5 gives a NaN "kd" term whenever it is drawn

    def loss(model, batch, targets):
        terms = toy_loss(model, batch, None)
        bad = torch.isin(batch["index"], torch.tensor(sorted(poisoned)))
        terms["kd"] = torch.where(bad.any(), torch.tensor(math.nan), torch.tensor(0.0))
        terms["loss"] = terms["loss"] + terms["kd"]
        return terms

    cfg = toy_config(epochs=2, grad_accum=1, batch_size=2, max_bad_steps=1, eval_every=0,
                     checkpoint_every=0)
    # Sample 5 appears once per epoch; with 1 tolerated, the second appearance stops the run.
    with pytest.raises(T.TrainingDiverged, match=r"step \d+: non-finite loss term\(s\) kd") as err:
        T.train(cfg, toy_student(), loss, ToyViews(), run_dir=tmp_path / "bad", progress=False)
    order0, _ = T.epoch_plan(12, 4, seed=cfg.train.seed, epoch=0)
    order1, _ = T.epoch_plan(12, 4, seed=cfg.train.seed, epoch=1)
    # Each poisoned micro-batch is dropped, so the optimiser step count lags the data by one.
    first = int(np.flatnonzero(order0 == 5)[0]) // 2 + 1
    second = 6 + int(np.flatnonzero(order1 == 5)[0]) // 2
    assert f"step {second}:" in str(err.value)
    records = [json.loads(line) for line in (tmp_path / "bad" / "log.jsonl").read_text().splitlines()]
    bad = [r for r in records if r["kind"] == "bad_step"]
    assert [(r["step"], r["terms"]) for r in bad] == [(first, ["kd", "loss"]),
                                                       (second, ["kd", "loss"])]
    trained = [r for r in records if r["kind"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in trained) and trained[-1]["step"] == second - 1


def test_accumulated_step_equals_plain_sgd_on_the_global_batch_and_clipping(tmp_path, one_thread):
    cfg = toy_config(epochs=1, max_steps=1, grad_accum=2, batch_size=4, eval_every=0)
    cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov = "sgd", 0.1, 0.0, False
    cfg.schedule.kind, cfg.schedule.warmup_steps = "constant", 0
    order, views = T.epoch_plan(12, 4, seed=cfg.train.seed, epoch=0)
    batch = torch.utils.data.default_collate(
        [T.ViewItems(ToyViews())[(int(i), int(views[i]))] for i in order[:4]])
    model = toy_student()
    toy_loss(model, batch, None)["loss"].backward()  # mean over the global batch of 4
    # (the logits head gets no gradient from the data loss and must not move)
    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p)
             for k, p in model.named_parameters()}
    expected = {k: p.detach() - 0.1 * grads[k] for k, p in model.named_parameters()}
    grad_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    assert grad_norm > 0

    result = T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir=tmp_path / "plain",
                     progress=False)
    got = T.load_weights(result.final_weights)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7)

    cfg.train.grad_clip = float(grad_norm) / 4  # the clipped step is a quarter as long
    clipped = T.load_weights(T.train(cfg, toy_student(), toy_loss, ToyViews(),
                                     run_dir=tmp_path / "clip", progress=False).final_weights)
    start = toy_student().state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(clipped[key] - start[key], (value - start[key]) / 4,
                                   rtol=1e-4, atol=1e-7)


def test_sigusr1_checkpoints_and_a_rerun_resumes_to_the_same_weights(tmp_path, one_thread):
    cfg = toy_config(epochs=2, grad_accum=1, batch_size=4, checkpoint_every=4)
    calls = []

    def preempted_loss(model, batch, targets):
        calls.append(1)
        if len(calls) == 2 and model.training:  # during step 2 (grad_accum=1)
            os.kill(os.getpid(), signal.SIGUSR1)
        return toy_loss(model, batch, targets)

    val = ToyViews(3, 3, seed=1)
    with pytest.raises(T.Preempted) as stop:
        T.train(cfg, toy_student(), preempted_loss, ToyViews(), val_set=val,
                run_dir=tmp_path / "cut", progress=False)
    assert stop.value.code == T.EXIT_REQUEUE == 75 and stop.value.step == 2
    assert T.complete_checkpoints(tmp_path / "cut" / "checkpoints") == ["step00000002"]
    assert not T.preemption_requested()  # the request was consumed by the Preempted raised
    resumed = T.train(cfg, toy_student(), toy_loss, ToyViews(), val_set=val,
                      run_dir=tmp_path / "cut", progress=False)
    whole = T.train(cfg, toy_student(), toy_loss, ToyViews(), val_set=val,
                    run_dir=tmp_path / "whole", progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == whole.steps == 6
    a, b = T.load_weights(resumed.final_weights), T.load_weights(whole.final_weights)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert resumed.history == whole.history and resumed.best_step == whole.best_step


# ---------------------------------------------------------------------------------------------
# checkpoint integrity, resume message, progress lines

class _Planted:
    """Unpickling this creates ``path`` (what a planted checkpoint file could do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_planted_pickle_in_a_checkpoint_is_refused_before_it_runs(tmp_path, one_thread, caplog):
    cfg = toy_config(epochs=1, grad_accum=1, batch_size=4, checkpoint_every=2, max_steps=2)
    run_dir = tmp_path / "run"
    T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir=run_dir, progress=False)
    tag = run_dir / "checkpoints" / "step00000002"
    record = json.loads((tag / "kdhpc_complete.json").read_text())["files"]
    assert record == {p.relative_to(tag).as_posix(): sha256_file(p)
                      for p in tag.rglob("*") if p.is_file() and p.name != "kdhpc_complete.json"}
    assert "mp_rank_00_model_states.pt" in record and "client/rank00000.pt" in record
    cfg.train.max_steps = 3
    marker = tmp_path / "pwned"
    # 1. An extra optimiser-state file: ZeRO's loader reads every file matching its pattern.
    planted = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Planted(marker)}, planted)
    with pytest.raises(T.CheckpointRefused, match=r"refusing to load this checkpoint .*"
                       r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: not written by the save"):
        T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir=run_dir, progress=False)
    planted.unlink()
    # 2. DeepSpeed's own model file replaced.
    model_file = tag / "mp_rank_00_model_states.pt"
    original = model_file.read_bytes()
    torch.save({"module": _Planted(marker)}, model_file)
    with pytest.raises(T.CheckpointRefused, match=r"mp_rank_00_model_states\.pt: SHA-256 "
                                                  r"differs from the one recorded"):
        T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir=run_dir, progress=False)
    assert not marker.exists()
    # The planted file is live: loading it the way DeepSpeed does runs it.
    torch.load(model_file, weights_only=False)
    assert marker.exists()
    # Restored, the checkpoint resumes and says from where.
    model_file.write_bytes(original)
    with caplog.at_level("INFO", logger="kdhpc.train"):
        result = T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir=run_dir,
                         progress=False)
    assert result.resumed_from == 2 and result.steps == 3
    assert f"resumed from step 2 (checkpoint {tag})" in caplog.messages


def test_checkpoint_without_file_hashes_is_refused(tmp_path, one_thread):
    cfg = toy_config(epochs=1, grad_accum=1, batch_size=4, checkpoint_every=2, max_steps=2)
    T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir=tmp_path, progress=False)
    record = tmp_path / "checkpoints" / "step00000002" / "kdhpc_complete.json"
    record.write_text(json.dumps({"step": 2, "world_size": 1}))  # an older kdhpc's record
    cfg.train.max_steps = 3
    with pytest.raises(T.CheckpointRefused, match=r"expected the SHA-256 of each checkpoint "
                                                  r"file, found none"):
        T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir=tmp_path, progress=False)


def test_zero_to_fp32_converts_a_kdhpc_checkpoint(tmp_path, one_thread):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = toy_config(stage=2, epochs=1, grad_accum=1, batch_size=4, max_steps=3)
    result = T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir=tmp_path, progress=False)
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "zero_to_fp32.py").is_file() and (ckpt / "latest").read_text() == "step00000003"
    converted = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step00000003")
    final = T.load_weights(result.final_weights)
    assert converted.keys() == final.keys()
    assert all(torch.equal(converted[k].float(), final[k]) for k in final)


_PROGRESS_CHILD = """
import sys
sys.path.insert(0, {here!r})
from test_train import ToyViews, toy_config, toy_loss, toy_student
from kdhpc import train as T
cfg = toy_config(epochs=10, grad_accum=1, batch_size=2, log_every=3, checkpoint_every=0,
                 eval_every=0)
T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir={run!r}, progress=True)
cfg.train.epochs = 11  # a second call resumes the finished run for one more epoch
T.train(cfg, toy_student(), toy_loss, ToyViews(), run_dir={run!r}, progress=True)
"""


def test_progress_to_a_file_is_plain_bounded_lines(tmp_path):
    run_dir = tmp_path / "progress_run"
    err = tmp_path / "stderr.txt"
    # A process of its own: not the rank variables this process exported for its own runs.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with err.open("w") as fh:
        subprocess.run([sys.executable, "-c", _PROGRESS_CHILD.format(
            here=str(REPO / "tests"), run=str(run_dir))], stderr=fh, env=env, check=True,
            timeout=300)
    text = err.read_text()
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("progress_run: ")]
    # 60 steps: a line per 10% (every 6 steps); none of the bar's per-step redraws. The resumed
    # call (steps 61-66 of 66) says where it resumed from and reports its end.
    assert [line.split()[1] for line in lines] == [f"{s}/60" for s in range(6, 61, 6)] + ["66/66"]
    assert (f"kdhpc.train: resumed from step 60 (checkpoint {run_dir / 'checkpoints'}"
            f"/step00000060)\n") in text
    with (run_dir / "train_log.csv").open() as fh:
        rows = {int(r["step"]): r for r in csv.DictReader(fh)}
    # Each line shows the terms of the latest logged row (log_every=3) and a throughput.
    for line in lines:
        step = int(line.split()[1].split("/")[0])
        logged = rows[step - step % 3]
        shown = dict(item.split("=") for item in line.split(", ")[1].split())
        assert shown.keys() == {"data", "loss"}
        assert float(shown["loss"]) == pytest.approx(float(logged["loss"]), rel=1e-3)
        assert line.endswith(" slices/s")


def test_progress_on_a_terminal_is_a_bar(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    report = T.ProgressReport("stage", 5, stream=out)
    for _ in range(5):
        report.update(1)
    report.close()
    assert "\r" in out.getvalue() and "5/5" in out.getvalue()
    plain = io.StringIO()
    report = T.ProgressReport("stage", 5, stream=plain, unit="records")
    report.set_terms({"loss": 0.5})
    for _ in range(5):
        report.update(1)
    report.close()
    assert [line.split(",")[0] for line in plain.getvalue().splitlines()] == [
        f"stage: {k}/5 records ({20 * k}%)" for k in range(1, 6)]
