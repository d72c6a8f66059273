"""A recipe kdhpc has never seen, in one small module: the worked example of "Adding a recipe".

Denoising 8 x 8 images: a two-layer teacher, a one-layer student, output KD
``alpha * L1(S, T) + (1 - alpha) * L1(S, Y)``. Run it as ``recipe: tests.toy_recipe``
(tests/test_recipe.py runs it through ``kdhpc.distill`` and ``kdhpc.sweep``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdhpc.config import Config, ConfigError
from kdhpc.metrics import paired_test, psnr
from kdhpc.recipe import (TRAIN_KEYS, Recipe, Run, Stage, evaluate_volumes, teacher_stage,
                          train_network)
from kdhpc.runtime import gather
from kdhpc.teacher import StreamTeacher
from kdhpc.train import load_weights

SPLITS = {"train": 0, "val": 1, "test": 2}
VOLUMES, SLICES, SIZE = 10, 2, 8


class NoisySquares:
    """Each volume: SLICES images of a bright square; the input adds fixed Gaussian noise."""

    num_views = 1

    def __init__(self, split: str, seed: int):
        rng = np.random.default_rng([seed, SPLITS[split]])
        self.targets = np.zeros((VOLUMES * SLICES, 1, SIZE, SIZE), np.float32)
        for i in range(len(self.targets)):
            y, x = rng.integers(0, SIZE - 3, 2)
            self.targets[i, 0, y:y + 3, x:x + 3] = rng.uniform(0.5, 1.0)
        self.inputs = self.targets + rng.normal(0, 0.2, self.targets.shape).astype(np.float32)

    def __len__(self) -> int:
        return len(self.targets)

    def get_view(self, index: int, view: int) -> dict:
        return {"input": torch.from_numpy(self.inputs[index]),
                "target": torch.from_numpy(self.targets[index])}

    def volume_of(self, index: int) -> int:
        return index // SLICES


NETWORKS = {"toy_teacher": lambda: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                                 nn.Conv2d(16, 1, 3, padding=1)),
            "toy_student": lambda: nn.Conv2d(1, 1, 3, padding=1)}


def check(cfg: Config) -> None:
    for key in ("teacher", "student"):
        if getattr(cfg.model, key) not in NETWORKS:
            raise ConfigError(f"model.{key}: expected one of {', '.join(NETWORKS)}, found "
                              f"{getattr(cfg.model, key)!r}")


def data(run: Run, split: str) -> NoisySquares:
    return run.memo(split, lambda: NoisySquares(split, run.cfg.default_data.seed))


def network(run: Run, stage: str) -> nn.Module:
    model = NETWORKS[run.results[stage]["arch"]]()
    model.load_state_dict(load_weights(run.path(run.results[stage]["weights"])))
    return model.eval()


def kd_loss(alpha: float):
    def loss_fn(model: nn.Module, batch: dict, targets: dict | None) -> dict:
        out = model(batch["input"])
        terms = {"l1": F.l1_loss(out, batch["target"])}
        if targets is not None and alpha > 0:
            terms["imitation"] = F.l1_loss(out, targets["output"])
            terms["loss"] = alpha * terms["imitation"] + (1 - alpha) * terms["l1"]
        else:
            terms["loss"] = terms["l1"]
        return terms
    return loss_fn


def fit(arch: str, alpha: float, with_teacher: bool):
    def run_stage(run: Run, stage_dir: Path) -> dict:
        teacher = (lambda: StreamTeacher(network(run, "teacher"),
                                         lambda m, b: {"output": m(b["input"])})
                   if with_teacher else None)
        return train_network(run.cfg, stage_dir, getattr(run.cfg.model, arch),
                             kd_loss(alpha if with_teacher else 0.0), data(run, "train"),
                             data(run, "val"), build=lambda name: NETWORKS[name](),
                             teacher=teacher)
    return run_stage


def evaluate(split: str):
    def run_stage(run: Run, stage_dir: Path) -> dict:
        nets = {row: network(run, stage) for row, stage in
                (("teacher", "teacher"), ("no_kd", "student"), ("student", "student_kd"))}
        rows = gather(evaluate_volumes(
            data(run, split), nets, 8, lambda net, batch: net(batch["input"]),
            lambda volume, items, batch, out: [
                {"volume": int(volume), "row": row,
                 "psnr": psnr(batch["target"][:, 0].numpy(), pred[:, 0].numpy(), 1.0)}
                for row, pred in out.items()]))
        return {"psnr": {row: [r["psnr"] for r in sorted(rows, key=lambda r: r["volume"])
                               if r["row"] == row] for row in nets}}
    return run_stage


def stages(cfg: Config) -> list[Stage]:
    trained = ("teacher", "student", "student_kd")
    return [Stage("data", lambda run, d: {"volumes": VOLUMES}, keys=("default_data.seed",)),
            teacher_stage(fit("teacher", 0.0, False), ("model.teacher",), cfg, None),
            Stage("student", fit("student", 0.0, False), keys=("model.student", *TRAIN_KEYS),
                  consumes=("data",)),
            Stage("student_kd", fit("student", cfg.loss.alpha, True),
                  keys=("model.student", "loss.alpha", *TRAIN_KEYS), consumes=("data", "teacher")),
            Stage("evaluate", evaluate("test"), consumes=trained, use="test"),
            Stage("evaluate_val", evaluate("val"), consumes=trained, use="validation")]


def summary(run: Run) -> str:
    values = run.results["evaluate"]["psnr"]
    test = paired_test(values["student"], values["no_kd"])
    lines = [f"| {row} | {np.mean(v):.2f} dB |" for row, v in values.items()]
    return "\n".join(["| model | PSNR |", "|---|---|", *lines,
                      f"KD - no-KD {test['mean_difference']:+.3f} dB, p = {test['p_value']:.3g}"])


def trial_result(run: Run) -> dict:
    values = run.results["evaluate_val"]["psnr"]
    return {"volumes": list(range(VOLUMES)), "metrics": ["psnr"],
            "per_volume": {row: {"psnr": v} for row, v in values.items()}}


RECIPE = Recipe("toy", stages, check, summary, trial_result)
