"""Distilling with target-free volumes (data.unlabelled_split): the loss, the views, the default
data's extra subjects and the reconstruction run that adds a KD-Student+U row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdhpc import distill
from kdhpc.config import ConfigError, load_config
from kdhpc.data.default import ensure_default
from kdhpc.data.views import TargetFreeViews, WithUnlabelledViews
from kdhpc.losses import imitation_loss, imitation_loss_with_unlabelled
from kdhpc.recipe import Stages
from kdhpc.recipes import reconstruction as R
from kdhpc.teacher import CachedTeacher, cache_config, teacher_fingerprint
from kdhpc.teacher.pretrained import data_identity
from kdhpc.train import load_weights

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "recon_tiny.yaml"
UNLABELLED = ["default_data.brain_unlabelled_subjects=2", "data.unlabelled_split=unlabelled"]


def test_loss_per_sample_weights_and_the_all_labelled_case():
    g = torch.Generator().manual_seed(7)
    pred, target, teacher = (torch.rand(4, 1, 6, 5, generator=g, requires_grad=i == 0)
                             for i in range(3))
    alpha = 0.3
    everyone = imitation_loss_with_unlabelled(pred, target, teacher, alpha, torch.ones(4))
    plain = imitation_loss(pred, target, teacher, alpha)
    torch.testing.assert_close(everyone["loss"], plain["loss"])
    labelled = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mixed = imitation_loss_with_unlabelled(pred, target, teacher, alpha, labelled)
    expected = np.mean([(alpha * (pred[i] - teacher[i]).abs().mean()
                         + (1 - alpha) * (pred[i] - target[i]).abs().mean()).item()
                        if labelled[i] else (pred[i] - teacher[i]).abs().mean().item()
                        for i in range(4)])
    assert mixed["loss"].item() == pytest.approx(expected, rel=1e-6)
    # An unlabelled sample's target never reaches the loss (nor its gradient).
    other = target.clone()
    other[1] = torch.rand(1, 6, 5, generator=g) * 100
    again = imitation_loss_with_unlabelled(pred, other, teacher, alpha, labelled)
    grad_a, = torch.autograd.grad(mixed["loss"], pred)
    grad_b, = torch.autograd.grad(again["loss"], pred)
    assert again["loss"].item() == mixed["loss"].item()
    torch.testing.assert_close(grad_a, grad_b)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("kdhpc_data")
        mp.setenv("KDHPC_DATA", str(root))
        yield root


def test_extra_subjects_leave_the_labelled_files_unchanged(data_dir):
    plain = load_config(TINY)
    extra = load_config(TINY, UNLABELLED)
    sets = [ensure_default(cfg.default_data, "brain") for cfg in (plain, extra)]
    manifests = [json.loads((s / "manifest.json").read_text()) for s in sets]
    hashes = [{f["path"]: f["sha256"] for f in m["files"]} for m in manifests]
    assert sets[0] != sets[1]
    for path, sha in hashes[0].items():  # every labelled file is byte-identical
        assert hashes[1][path] == sha, path
    added = sorted(set(hashes[1]) - set(hashes[0]))
    assert added and all("_unlabelled/" in p for p in added)
    assert len(list((sets[1] / "singlecoil_unlabelled").glob("*.h5"))) == 2
    # ... so a teacher trained on the labelled data applies to both.
    assert data_identity(plain) == data_identity(extra)


def test_target_free_views_take_back_what_the_target_gave(data_dir):
    cfg = load_config(TINY, UNLABELLED)
    views = R.view_dataset(cfg, "unlabelled")
    free = TargetFreeViews(views)
    for volume in range(len(views.slices.volumes)):
        indices = views.slices.volume_indices(volume)
        # Independently: the zero-filled magnitude of every slice in the file's own units.
        peak = max(float(torch.fft.ifft2(views.get_view(i, 0)["kspace"], norm="ortho").abs().max())
                   * float(views.get_view(i, 0)["scale"]) for i in indices)
        for i in indices:
            item, original = free.get_view(i, 0), views.get_view(i, 0)
            assert item["labelled"] == 0 and not item["target"].any()
            ratio = float(original["scale"]) / peak
            torch.testing.assert_close(item["input"], original["input"] * ratio)
            torch.testing.assert_close(item["kspace"], original["kspace"] * ratio)
            assert float(item["scale"]) == pytest.approx(peak)
        top = max(float(torch.fft.ifft2(free.get_view(i, 0)["kspace"], norm="ortho").abs().max())
                  for i in indices)
        assert top == pytest.approx(1.0, rel=1e-5)  # the volume's own zero-filled maximum
    labelled = R.view_dataset(cfg, "train")
    mixed = WithUnlabelledViews(labelled, free)
    assert len(mixed) == len(labelled)
    reached = {(int(mixed.get_view(i, v)["volume"]), int(mixed.get_view(i, v)["slice"]))
               for i in range(len(mixed)) for v in range(labelled.num_views, mixed.num_views)}
    assert len(reached) == len(free)  # every unlabelled slice is some item's view
    first = mixed.get_view(0, 0)
    assert first["labelled"] == 1
    torch.testing.assert_close(first["target"], labelled.get_view(0, 0)["target"])


def test_run_adds_a_student_that_learnt_from_the_teacher_alone_there(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, [f"run_dir={run_dir}", *UNLABELLED])
    stages = Stages(cfg.run_dir, log=lambda msg: None)
    distill.run(cfg, stages)
    assert {"teacher_cache_unlabelled", "student_at_unlabelled",
            "student_kd_unlabelled"} <= set(stages.ran)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["model"] for row in metrics["table"]][-1] == R.UNLABELLED_ROW
    assert f"{R.UNLABELLED_ROW} vs KD-Student psnr" in metrics["gap"]["tests"]
    # The cache of the mixed views holds the teacher's output on the target-free views.
    teacher = R.load_network(cfg, cfg.model.teacher, run_dir / "teacher" / "best_model.pt").eval()
    cache_cfg = R.cache_config_for(cfg, True)
    cached = CachedTeacher(Path(run_dir) / "teacher_cache_unlabelled",
                           teacher_sha256=teacher_fingerprint(teacher),
                           data_config=cache_config(cache_cfg))
    labelled = R.view_dataset(cfg, "train")
    mixed = WithUnlabelledViews(labelled, TargetFreeViews(R.view_dataset(cfg, "unlabelled")))
    items = [dict(mixed.get_view(i, 1), index=torch.tensor(i), view=torch.tensor(1))
             for i in range(len(mixed))]
    batch = torch.utils.data.default_collate(items)
    with torch.no_grad():
        expected = teacher(batch["input"], batch["kspace"], batch["mask"])
    torch.testing.assert_close(cached.targets(batch)["output"], expected, rtol=1e-5, atol=1e-6)
    # ... and the KD-Student+U network is what the report evaluated.
    weights = run_dir / "student_kd_unlabelled" / "best_model.pt"
    assert load_weights(weights)  # a trained state dict in its own stage folder
    assert metrics["steps"]["student_kd_unlabelled"] == metrics["steps"]["student_kd"]


def test_unlabelled_split_must_be_another_split(data_dir, tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "data.unlabelled_split=test"])
    with pytest.raises(ConfigError, match="data.unlabelled_split: expected a split other"):
        R.check_config(cfg)
    assert not (tmp_path / "run").exists()
