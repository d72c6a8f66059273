"""Shipped default teachers: each file matches the SHA-256 its manifest pins and loads into its
architecture; a changed file and a run on other data are refused with what to do."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from kdhpc import distill
from kdhpc.config import ConfigError, load_config
from kdhpc.models import build_model
from kdhpc.teacher import pretrained

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = {"recon_default": "recon_default.yaml", "recon_default_8x": "recon_default_8x.yaml",
            "seg_default": "seg_default.yaml", "enh_default": "enh_default.yaml"}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_each_shipped_teacher_matches_its_manifest_and_its_default_config(name):
    entry = pretrained.read_manifest()[name]
    path = pretrained.WEIGHTS_DIR / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    cfg = load_config(REPO / "configs" / DEFAULTS[name])
    assert cfg.model.teacher_checkpoint == f"pretrained:{name}"
    assert pretrained.resolve_teacher_checkpoint(cfg) == (path, entry["sha256"])
    model = build_model(entry["arch"])
    model.load_state_dict(torch.load(path, weights_only=True))  # strict: every key, every shape
    # The teacher config that trained it is the one the manifest names, on the same data.
    teacher_cfg = load_config(REPO / entry["config"])
    assert pretrained.data_identity(teacher_cfg) == entry["data"]


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch) -> Path:
    """The shipped weights and manifest, copied to a folder the test may damage."""
    folder = tmp_path / "weights"
    shutil.copytree(pretrained.WEIGHTS_DIR, folder)
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", folder)
    monkeypatch.setattr(pretrained, "MANIFEST", folder / "manifest.json")
    return folder


def test_a_changed_weights_file_is_refused_naming_the_file(shipped_copy, capsys, tmp_path):
    entry = json.loads((shipped_copy / "manifest.json").read_text())["recon_default"]
    weights = shipped_copy / entry["file"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    cfg = load_config(REPO / "configs" / "recon_default.yaml")
    with pytest.raises(ConfigError) as err:
        pretrained.resolve_teacher_checkpoint(cfg)
    message = str(err.value)
    assert message.startswith(f"{weights}: expected SHA-256 {entry['sha256']}")
    assert "python -m kdhpc.teacher.ship configs/teachers/recon_default.yaml" in message
    # Through the entry point: one line, exit 2, nothing written.
    run_dir = tmp_path / "run"
    assert distill.main([str(REPO / "configs" / "recon_default.yaml"),
                         f"run_dir={run_dir}"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not run_dir.exists()


def test_a_run_on_other_data_is_refused_saying_what_changed_and_what_to_do():
    cfg = load_config(REPO / "configs" / "recon_default.yaml",
                      ["mask.acceleration=5", "default_data.brain_subjects=20"])
    with pytest.raises(ConfigError, match=r"pretrained:recon_default was trained on other data "
                                          r"than this run's \(default_data\.brain_subjects: 50 "
                                          r"-> 20; mask\.acceleration: 4\.0 -> 5\.0\); train a "
                                          r"teacher for this data with `python -m "
                                          r"kdhpc\.teacher\.ship configs/teachers/"
                                          r"recon_default\.yaml"):
        pretrained.resolve_teacher_checkpoint(cfg)
    shipped = ", ".join(f"pretrained:{name}" for name in sorted(pretrained.read_manifest()))
    assert "pretrained:recon_default, pretrained:recon_default_8x" in shipped
    with pytest.raises(ConfigError, match=f"expected one of the shipped teachers {shipped}, "
                                          f"found 'pretrained:nope'"):
        pretrained.resolve_teacher_checkpoint(load_config(
            REPO / "configs" / "recon_default.yaml", ["model.teacher_checkpoint=pretrained:nope"]))


@pytest.mark.parametrize("task", ["denoise", "superres"])
def test_shipped_experts_resolve_for_their_own_task_and_refuse_other_data(task):
    from kdhpc.recipes import enhancement as E

    cfg = load_config(REPO / "configs" / "enh_default.yaml")
    name = f"enh_expert_{task}"
    assert cfg.model.experts[E.TASKS.index(task)] == f"pretrained:{name}"
    entry = pretrained.read_manifest()[name]
    path = pretrained.WEIGHTS_DIR / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    # Trained as a teacher of the student's architecture on the expert's own task.
    assert entry["arch"] == cfg.model.student and entry["data"]["degrade"]["task"] == task
    assert E.expert_weights(cfg, task) == str(path)
    E.load_network(cfg.model.student, path)  # strict
    other = load_config(REPO / "configs" / "enh_default.yaml", ["degrade.noise_sigma=0.1"])
    with pytest.raises(ConfigError, match=rf"pretrained:{name} was trained on other data than "
                                          rf"this run's \(degrade\.noise_sigma: 0\.05 -> 0\.1\)"):
        E.expert_weights(other, task)
