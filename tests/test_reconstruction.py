"""The KD-MRI recipe end to end on the tiny config: the report's numbers against independent
numpy recomputations from the data files and the saved weights, the teacher cache against the
teacher, skipped reruns, a changed alpha, a killed stage that resumes, super-resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils.data import default_collate

from kdhpc.config import ConfigError, load_config
from kdhpc.data.masks import variable_density_mask
from kdhpc import distill
from kdhpc.recipe import Stages
from kdhpc.metrics import reconstruction_metrics
from kdhpc.models import build_model
from kdhpc.recipes import reconstruction as R
from kdhpc.teacher import CachedTeacher, StreamTeacher, teacher_fingerprint
from kdhpc import train as T
from kdhpc.train import EXIT_REQUEUE, Preempted, load_weights

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "recon_tiny.yaml"
ALL_STAGES = ["data", "teacher", "teacher_cache", "student", "student_at", "student_kd",
              "evaluate", "report"]


def run_recipe(cfg):
    stages = Stages(cfg.run_dir, log=lambda msg: None)
    return distill.run(cfg, stages)["report"], stages


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDHPC_DATA", str(tmp_path_factory.mktemp("kdhpc_data")))
        yield


@pytest.fixture(scope="module")
def tiny(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("recon") / "run"
    cfg = load_config(TINY, [f"run_dir={run_dir}"])
    result, stages = run_recipe(cfg)
    assert stages.ran == ALL_STAGES
    return cfg, result, json.loads((run_dir / "metrics.json").read_text())


def read_volumes(cfg, split):
    """{volume file name: normalised target volume [S, H, W]} read straight from the h5 files."""
    root = R.dataset_root(cfg) / f"singlecoil_{split}"
    out = {}
    for path in sorted(root.glob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.name] = f["reconstruction_esc"][()] / float(f.attrs["max"])
    return out


def test_zero_filled_and_kd_student_rows_equal_independent_recomputations(tiny):
    cfg, _, metrics = tiny
    width = cfg.default_data.brain_size
    mask = variable_density_mask(width, cfg.mask.acceleration, cfg.mask.center_fraction,
                                 cfg.mask.seed)  # KD-MRI's unshifted layout: DC at index 0
    assert mask[0] == 1 and mask.sum() == width // 4
    kd = build_model(cfg.model.student)
    kd.load_state_dict(load_weights(Path(cfg.run_dir) / "student_kd" / "best_model.pt"))
    kd.eval()
    volumes = read_volumes(cfg, "test")
    assert sorted(metrics["per_volume"]["ZF"]) == sorted(volumes) and len(volumes) >= 2
    for name, gt in volumes.items():
        k0 = np.fft.fft2(gt, norm="ortho") * mask  # [S, H, W]
        zf = np.abs(np.fft.ifft2(k0, norm="ortho"))
        expected = reconstruction_metrics(gt, zf, data_range=1.0)
        found = metrics["per_volume"]["ZF"][name]
        for key in ("psnr", "ssim", "nmse", "hfen", "mse"):
            assert found[key] == pytest.approx(expected[key], rel=1e-5), (name, key)
        x = torch.from_numpy(np.fft.ifft2(k0, norm="ortho").real).float()[:, None]
        k = torch.from_numpy(k0).to(torch.complex64)[:, None]
        with torch.no_grad():
            pred = kd(x, k, torch.from_numpy(mask)[None]).numpy()[:, 0]
        expected = reconstruction_metrics(gt, pred, data_range=1.0)
        found = metrics["per_volume"]["KD-Student"][name]
        for key in ("psnr", "ssim", "nmse", "hfen"):
            assert found[key] == pytest.approx(expected[key], rel=1e-4), (name, key)


def test_report_table_gap_and_paired_test(tiny):
    cfg, result, metrics = tiny
    run_dir = Path(cfg.run_dir)
    psnr = {row: [metrics["per_volume"][row][v]["psnr"] for v in sorted(metrics["per_volume"][row])]
            for row in ("ZF", *R.TRAINED)}
    mean = {row: float(np.mean(values)) for row, values in psnr.items()}
    gap = mean["Teacher"] - mean["Student"]
    expected = (mean["KD-Student"] - mean["Student"]) / gap if gap > 0 else None
    assert metrics["gap"]["gap_fraction_closed"] == (pytest.approx(expected) if expected else None)
    test = scipy.stats.ttest_rel(psnr["KD-Student"], psnr["Student"])
    assert result["p_value"] == pytest.approx(test.pvalue)
    report = (run_dir / "report.md").read_text()
    for row in ("ZF", *R.TRAINED):
        values = psnr[row]
        cell = f"| {row} | {np.mean(values):.2f} +- {np.std(values, ddof=1):.2f} |"
        assert cell in report and cell in result["text"]
    assert metrics["parameters"] == {"Teacher": 141765, "Student": 49285, "KD-Student": 49285}
    assert (run_dir / "panel.png").stat().st_size > 10_000
    assert [r["threads"] for r in metrics["latency"]][0] == 1
    for r in metrics["latency"]:
        assert 0 < r["Teacher min ms"] <= r["Teacher median ms"]
        assert 0 < r["Student min ms"] <= r["Student median ms"]
        assert r["speed-up"] == pytest.approx(r["Teacher min ms"] / r["Student min ms"])
    assert metrics["latency"][0]["reliable"] == "yes"


def test_cached_teacher_targets_equal_the_teacher_on_the_same_views(tiny):
    cfg, _, _ = tiny
    teacher, extract, views = R.teacher_cache_parts(cfg)
    stage = json.loads((Path(cfg.run_dir) / "teacher" / "stage.json").read_text())["result"]
    assert teacher_fingerprint(teacher) == stage["sha256"]
    batch = default_collate([{**views.get_view(i, 0), "index": torch.tensor(i),
                              "view": torch.tensor(0)} for i in (3, 0)])
    cached = CachedTeacher(Path(cfg.run_dir) / "teacher_cache").targets(batch)
    streamed = StreamTeacher(teacher, extract).targets(batch)
    assert sorted(cached) == ["attention_0", "attention_1", "attention_2", "attention_3",
                              "attention_4", "output"]
    for name in cached:
        torch.testing.assert_close(cached[name], streamed[name], rtol=1e-6, atol=1e-6)
    # The maps are raw: Q = sum_c A^2 of the teacher's conv3 ReLU in cascade 0.
    with torch.no_grad():
        _, taps = teacher(batch["input"], batch["kspace"], batch["mask"], return_features=True)
    torch.testing.assert_close(cached["attention_0"], taps[0].square().sum(1).flatten(1),
                               rtol=1e-5, atol=1e-6)


def test_rerun_skips_every_stage_and_alpha_reruns_only_kd_onwards(tiny, tmp_path, monkeypatch,
                                                                   capsys):
    cfg, first, _ = tiny
    result, stages = run_recipe(cfg)
    assert stages.ran == [] and stages.skipped == ALL_STAGES
    assert result["text"] == first["text"] and first["text"] in capsys.readouterr().out
    # A copy of the run with another alpha, killed (SIGTERM) in the KD stage's first step: it
    # checkpoints at the next step boundary (step 2 of 3) and exits for a requeue.
    copy = tmp_path / "run"
    shutil.copytree(cfg.run_dir, copy)
    changed = load_config(TINY, [f"run_dir={copy}", "loss.alpha=0.25"])
    from drills import sigterm_at_step
    monkeypatch.setattr(T, "step_callbacks", [sigterm_at_step(1)])
    with pytest.raises(Preempted) as stop:
        run_recipe(changed)
    assert stop.value.code == EXIT_REQUEUE and stop.value.step == 2
    # A preempted process exits; this one goes on, so it forgets the signal (as a requeue would).
    monkeypatch.setattr(T, "step_callbacks", [])
    T._preempt_requested = False  # not monkeypatch: its undo would restore the signal
    _, stages = run_recipe(changed)
    assert stages.ran == ["student_kd", "evaluate", "report"]
    kd = json.loads((copy / "student_kd" / "stage.json").read_text())["result"]
    assert kd["resumed_from"] == 2 and kd["steps"] == 3
    logged = [int(line.split(",")[0]) for line in
              (copy / "student_kd" / "train_log.csv").read_text().splitlines()[1:]]
    assert logged == [1, 2, 3]


def test_superres_streams_the_teacher_end_to_end(data_dir, tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'sr'}", "recipe=superres",
                             "degrade.task=superres", "degrade.sr_scale=4",
                             "model.teacher=vdsr_teacher", "model.student=vdsr_student",
                             "teacher.mode=stream", "train.max_steps=1"])
    result, stages = run_recipe(cfg)
    assert "teacher_cache" not in stages.ran and stages.ran[-1] == "report"
    metrics = json.loads((tmp_path / "sr" / "metrics.json").read_text())
    assert metrics["parameters"]["Teacher"] == 333569
    # The ZF row is the low-resolution input: |IFFT| of the central 8 x 8 of 32 x 32 k-space.
    for name, gt in read_volumes(cfg, "test").items():
        k = np.fft.fftshift(np.fft.fft2(gt, norm="ortho"), axes=(-2, -1))
        block = np.zeros_like(k)
        block[:, 12:20, 12:20] = k[:, 12:20, 12:20]
        lowres = np.abs(np.fft.ifft2(np.fft.ifftshift(block, axes=(-2, -1)), norm="ortho"))
        expected = reconstruction_metrics(gt, lowres, data_range=1.0)
        assert metrics["per_volume"]["ZF"][name]["psnr"] == pytest.approx(expected["psnr"],
                                                                          rel=1e-5)
    assert "ZF" in result["text"]


def test_bad_configs_are_named(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="degrade.task"):
        R.check_config(load_config(TINY, ["degrade.task=denoise"]))
    with pytest.raises(ConfigError, match="data.patch_size"):
        R.check_config(load_config(TINY, ["data.patch_size=16"]))
    with pytest.raises(ConfigError, match="VDSR"):
        R.build_network(load_config(TINY, ["recipe=superres"]), "dccnn_student")
    cfg = load_config(TINY, [f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="expected teacher weights or a finished teacher stage"):
        R.teacher_cache_parts(cfg)
    with pytest.raises(ConfigError, match="model.teacher_checkpoint"):
        R.teacher_weights(load_config(TINY, ["model.teacher_checkpoint=/no/such.pt"]))
