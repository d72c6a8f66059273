"""The recipe protocol: what a change of config reruns (every recipe, from its declaration), a
recipe of the user's own through ``kdhpc.distill`` and ``kdhpc.sweep``, a foreign teacher cache
refused and left untouched, and no import cycle in ``kdhpc/``."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdhpc import distill
from kdhpc.config import load_config
from kdhpc.recipe import Stages, planned_digests, recipe_of, shared_stages, stages_for

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "tests" / "toy.yaml"
CONFIGS = {"reconstruction": "recon_tiny.yaml", "enhancement": "enh_tiny.yaml",
           "segmentation": "seg_tiny.yaml"}
RESULT_FREE = ["train.progress=false", "train.log_every=3", "train.keep_last=4",
               "train.checkpoint_every=2", "train.threads=2", "data.num_workers=1",
               "teacher.compression=gzip", "teacher.fill_batch_size=3"]
# What loss.alpha reaches: only KD students and what reads them.
ALPHA_RERUNS = {
    "reconstruction": ({"student_kd", "evaluate", "report"}, {"student_kd", "evaluate_val"}),
    "enhancement": ({"multitask_kd", "evaluate", "report"}, {"student_kd", "evaluate_val"}),
    "segmentation": ({"student_kd", "evaluate", "speed", "export", "report"},
                     {"student_kd", "evaluate_val"}),
}


def changed(config: str, override: str, purpose: str) -> set[str]:
    base = planned_digests(load_config(REPO / "configs" / config), purpose)
    other = planned_digests(load_config(REPO / "configs" / config, [override]), purpose)
    assert base.keys() == other.keys()
    return {name for name in base if base[name] != other[name]}


@pytest.mark.parametrize("recipe", sorted(CONFIGS))
def test_settings_that_change_no_result_rerun_no_stage(recipe):
    for purpose in ("distill", "sweep"):
        for override in RESULT_FREE:
            assert changed(CONFIGS[recipe], override, purpose) == set(), override
        repeats = changed(CONFIGS[recipe], "eval.latency_repeats=7", purpose)
        assert repeats <= {"report", "speed", "timing"}  # never a training stage


@pytest.mark.parametrize("recipe", sorted(CONFIGS))
def test_alpha_reruns_only_the_kd_students_and_what_reads_them(recipe):
    for purpose, expected in zip(("distill", "sweep"), ALPHA_RERUNS[recipe]):
        assert changed(CONFIGS[recipe], "loss.alpha=0.3", purpose) == expected
    cfg = load_config(REPO / "configs" / CONFIGS[recipe])
    shared = shared_stages(stages_for(recipe_of(cfg), cfg, "sweep"), ["loss.alpha"])
    assert {"data", "teacher", "teacher_cache"} <= set(shared)
    assert "student_kd" not in shared and "evaluate_val" not in shared


def test_segmentation_temperature_reaches_its_kd_student_only():
    assert changed("seg_tiny.yaml", "loss.temperature=3", "sweep") == {"student_kd",
                                                                       "evaluate_val"}


def _toy_psnr(run_dir: Path, stage: str, split: str) -> list[float]:
    """Per-volume PSNR recomputed from the saved weights, with numpy's formula."""
    import tests.toy_recipe as toy

    record = json.loads((run_dir / stage / "stage.json").read_text())["result"]
    model = toy.NETWORKS[record["arch"]]()
    model.load_state_dict(torch.load(run_dir / record["weights"], weights_only=True))
    views = toy.NoisySquares(split, 0)
    with torch.no_grad():
        pred = model(torch.from_numpy(views.inputs)).numpy()
    volume = [slice(v * toy.SLICES, (v + 1) * toy.SLICES) for v in range(toy.VOLUMES)]
    return [float(10 * np.log10(1.0 / np.mean((views.targets[s] - pred[s]) ** 2)))
            for s in volume]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_users_own_recipe_runs_through_distill_and_reruns_what_changed(tmp_path):
    run_dir = tmp_path / "toy"
    first = _run("kdhpc.distill", str(TOY), f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    evaluate = json.loads((run_dir / "evaluate" / "stage.json").read_text())["result"]["psnr"]
    for row, stage in (("student", "student_kd"), ("no_kd", "student"), ("teacher", "teacher")):
        np.testing.assert_allclose(evaluate[row], _toy_psnr(run_dir, stage, "test"), rtol=1e-5)
    assert f"| student | {np.mean(evaluate['student']):.2f} dB |" in first.stdout
    again = _run("kdhpc.distill", str(TOY), f"run_dir={run_dir}", "train.log_every=2")
    assert again.returncode == 0 and "running" not in again.stdout
    alpha = _run("kdhpc.distill", str(TOY), f"run_dir={run_dir}", "loss.alpha=0.25")
    ran = [line.split()[1].rstrip(":") for line in alpha.stdout.splitlines()
           if line.endswith(": running")]
    assert ran == ["student_kd", "evaluate"]


def test_a_users_own_recipe_sweeps_with_one_shared_teacher(tmp_path):
    sweep = _run("kdhpc.sweep", str(TOY), "--grid", "loss.alpha=0,0.5", "--executor", "local",
                 "--sweep-dir", str(tmp_path / "sweep"))
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    shared = json.loads((tmp_path / "sweep" / "shared" / "sweep_shared.json").read_text())
    assert shared["stages"] == ["data", "teacher", "student"]
    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep.csv").open()))
    for trial in ("alpha0", "alpha0.5"):
        trial_dir = tmp_path / "sweep" / "trials" / trial
        assert (trial_dir / "teacher").is_symlink()
        mean = float(next(r["mean"] for r in rows if r["trial"] == trial))
        assert mean == pytest.approx(np.mean(_toy_psnr(trial_dir, "student_kd", "val")))


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_cache_of_another_teacher_is_refused_and_left_untouched(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("KDHPC_DATA", str(tmp_path / "data"))
    tiny = REPO / "configs" / "recon_tiny.yaml"
    first = load_config(tiny, [f"run_dir={tmp_path / 'a'}", "train.progress=false"])
    distill.run(first, Stages(first.run_dir, log=lambda msg: None))
    cache = tmp_path / "a" / "teacher_cache"
    before = _tree_digest(cache)
    code = distill.main([str(tiny), f"run_dir={tmp_path / 'b'}", f"teacher.cache_dir={cache}",
                         "train.teacher_epochs_factor=2", "train.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(cache) in err[0] and "teacher" in err[0]
    assert _tree_digest(cache) == before


def _kdhpc_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The kdhpc modules ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_no_import_cycle_in_the_package():
    root = REPO / "kdhpc"
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {m: _kdhpc_imports(p, m, set(files)) for m, p in files.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of the code's layers.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_longer_teacher_run_decays_at_the_same_fractions_of_its_run():
    from kdhpc.recipe import teacher_training_config
    from kdhpc.train import lr_factor

    cfg = load_config(REPO / "configs" / "recon_default.yaml")
    steps_per_epoch = 60
    one = lr_factor(cfg.schedule, steps_per_epoch, cfg.train.epochs * steps_per_epoch)
    for factor in (2, 5):
        longer = teacher_training_config(load_config(REPO / "configs" / "recon_default.yaml",
                                                     [f"train.teacher_epochs_factor={factor}"]))
        assert longer.train.epochs == factor * cfg.train.epochs
        total = longer.train.epochs * steps_per_epoch
        stretched = lr_factor(longer.schedule, steps_per_epoch, total)
        for fraction in np.linspace(0, 0.99, 23):
            assert stretched(int(fraction * total)) == pytest.approx(
                one(int(fraction * cfg.train.epochs * steps_per_epoch)))
        assert stretched(total - 1) == pytest.approx(cfg.schedule.gamma)  # one decay, as 1x
