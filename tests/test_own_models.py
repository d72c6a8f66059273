"""Your own models in the recipes: a teacher class kdhpc has never seen (a module file written
here) distils into a registry student through ``kdhpc.distill``, with attention transfer through
named layers; a Lightning-style checkpoint loads as ``model.teacher_checkpoint``; a wrong layer
path stops the CLI before anything is written."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from kdhpc import distill
from kdhpc.config import ConfigError, load_config
from kdhpc.data.acdc import write_acdc_patient
from kdhpc.predict import load_run_model
from kdhpc.recipe import Stages
from kdhpc.recipes import reconstruction as R
from kdhpc.recipes import segmentation as S_recipe
from kdhpc.segment import main as segment_main
from kdhpc.teacher import CachedTeacher
from kdhpc.train import load_weights

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "recon_tiny.yaml"
AT_P = 2.0

LAB_MODULE = textwrap.dedent('''
    """A lab's own reconstruction network: residual CNN blocks with a k-space data step."""
    import torch
    from torch import nn

    class LabRecon(nn.Module):
        def __init__(self, width=6, blocks=2):
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(width, 1, 3, padding=1)) for _ in range(blocks))

        def forward(self, image, kspace, mask):
            x = image
            for block in self.blocks:
                x = x + block(x)
                k = torch.fft.fft2(x.to(kspace.dtype), norm="ortho")
                x = torch.fft.ifft2(mask * kspace + (1 - mask) * k, norm="ortho").real
            return x

    def lab_recon(width=6, blocks=2):
        return LabRecon(width, blocks)
''')
TEACHER = "own_models_lab:lab_recon"
TEACHER_LAYERS = ["blocks.0.1", "blocks.1.1"]  # the ReLU of each block
STUDENT_LAYERS = ["cascades.0.acts.1", "cascades.4.acts.1"]
OVERRIDES = [f"model.teacher={TEACHER}", "model.teacher_kwargs={width: 6, blocks: 2}",
             f"model.teacher_layers=[{','.join(TEACHER_LAYERS)}]",
             f"model.student_layers=[{','.join(STUDENT_LAYERS)}]", f"loss.at_p={AT_P}"]


# An in-process run exports these (its port stays bound): a subprocess must pick its own.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def lab_folder(tmp_path_factory, module: str, text: str):
    """KDHPC_DATA in a fresh folder and ``module`` (source ``text``) importable, as a user's
    PYTHONPATH would make it; yields the folder (a module-scoped fixture's body)."""
    folder = tmp_path_factory.mktemp("lab")
    (folder / f"{module}.py").write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDHPC_DATA", str(tmp_path_factory.mktemp("kdhpc_data")))
        mp.syspath_prepend(str(folder))
        yield folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from lab_folder(tmp_path_factory, "own_models_lab", LAB_MODULE)


def _run(cfg) -> tuple[dict, Stages]:
    stages = Stages(cfg.run_dir, log=lambda msg: None)
    return distill.run(cfg, stages), stages


def _own_attention(teacher: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
    """sum_c |A_c|^p of each named teacher layer, caught with this test's own hooks."""
    caught = {}
    handles = [teacher.get_submodule(path).register_forward_hook(
        lambda module, args, out, path=path: caught.__setitem__(path, out.detach()))
        for path in TEACHER_LAYERS]
    with torch.no_grad():
        teacher(batch["input"], batch["kspace"], batch["mask"])
    for handle in handles:
        handle.remove()
    return [caught[p].abs().pow(AT_P).sum(1).flatten(1) for p in TEACHER_LAYERS]


def test_user_teacher_distils_into_registry_student_with_named_layer_attention(lab, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, [f"run_dir={run_dir}", *OVERRIDES])
    results, stages = _run(cfg)
    assert stages.ran[:6] == ["data", "teacher", "teacher_cache", "student", "student_at",
                              "student_kd"]
    import own_models_lab

    teacher = own_models_lab.LabRecon(width=6, blocks=2)
    teacher.load_state_dict(load_weights(run_dir / results["teacher"]["weights"]))
    teacher.eval()
    views = R.view_dataset(cfg, cfg.data.train_split)
    batch = default_collate([{**views.get_view(i, 0), "index": torch.tensor(i),
                              "view": torch.tensor(0)} for i in range(len(views))])
    cached = CachedTeacher(run_dir / "teacher_cache").targets(batch)
    own = _own_attention(teacher, batch)
    for i, expected in enumerate(own):
        assert expected.abs().sum() > 0  # a tap of zeros would compare equal to anything
        torch.testing.assert_close(cached[f"attention_{i}"], expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        output = teacher(batch["input"], batch["kspace"], batch["mask"])
    torch.testing.assert_close(cached["output"], output, rtol=1e-5, atol=1e-6)
    # kdhpc.predict / kdhpc.export rebuild the user's teacher from the run (its kwargs).
    rebuilt, _ = load_run_model(run_dir, "teacher")
    assert isinstance(rebuilt, own_models_lab.LabRecon) and len(rebuilt.blocks) == 2
    for key, value in teacher.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    # The AT stage trained the registry student on those maps: its weights moved.
    at_weights = load_weights(run_dir / results["student_at"]["weights"])
    assert results["student_at"]["steps"] > 0 and results["student_at"]["arch"] == "dccnn_student"
    assert any(not torch.equal(at_weights[k], v)
               for k, v in load_weights(run_dir / results["student"]["weights"]).items())
    # Changing only the student's layers reruns the AT stage and what follows, not the teacher.
    moved = load_config(TINY, [f"run_dir={run_dir}", *OVERRIDES,
                               "model.student_layers=[cascades.1.acts.1,cascades.3.acts.1]"])
    _, again = _run(moved)
    assert again.ran[:2] == ["student_at", "student_kd"] and "teacher" not in again.ran


def test_lightning_checkpoint_loads_as_teacher_checkpoint(lab, tmp_path):
    import own_models_lab

    torch.manual_seed(3)
    source = own_models_lab.LabRecon(width=6, blocks=2)
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    checkpoint = tmp_path / "lab.ckpt"
    torch.save({"state_dict": state, "epoch": 7, "global_step": 70}, checkpoint)
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", *OVERRIDES,
                             f"model.teacher_checkpoint={checkpoint}"])
    R.check_config(cfg)
    loaded = R.load_network(cfg, cfg.model.teacher, checkpoint)
    assert loaded.state_dict().keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # strict loading names what is missing; checkpoint_prefix="" keeps the prefix and fails.
    with pytest.raises(ConfigError, match=r"model\.teacher_checkpoint: .*missing keys blocks"):
        R.load_network(load_config(TINY, [*OVERRIDES, f"model.teacher_checkpoint={checkpoint}",
                                          "model.checkpoint_prefix=''"]),
                       TEACHER, checkpoint)
    # The teacher stage loads it, records its SHA-256 and the loaded weights' fingerprint.
    result = R._load_teacher(type("RunLike", (), {"cfg": cfg})(), tmp_path)
    assert result["trained"] is False and result["weights"] == str(checkpoint.resolve())


def test_wrong_layer_path_exits_2_with_the_real_layers_and_writes_nothing(lab, tmp_path):
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k not in RANK_VARIABLES},
           "PYTHONPATH": os.pathsep.join([str(lab), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-m", "kdhpc.distill", str(TINY), f"run_dir={run_dir}", *OVERRIDES,
         "model.teacher_layers=[blocks.0.1,blocks.7.1]"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model.teacher_layers: "), proc.stderr
    real = [name for name, _ in __import__("own_models_lab").LabRecon().named_modules() if name]
    assert "'blocks.7.1'" in lines[0] and all(name in lines[0] for name in real)
    assert not run_dir.exists()


def test_user_network_with_another_call_is_refused_naming_the_call(lab, tmp_path):
    (lab / "own_models_single.py").write_text(textwrap.dedent('''
        from torch import nn
        def image_only():
            return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, 1, 3, padding=1))
    '''))
    cfg = load_config(TINY, [*OVERRIDES, "model.teacher=own_models_single:image_only",
                             "model.teacher_kwargs={}", "model.teacher_layers=['1','1']"])
    with pytest.raises(ConfigError, match=r"model\.teacher: 'own_models_single:image_only' failed on a "
                                          r"probe batch \(this recipe calls model\(input, kspace"):
        R.check_config(cfg)


# ---------------------------------------------------------------- ACDC as downloaded

SEG_TINY = REPO / "configs" / "seg_tiny.yaml"


def _heart(shape, radius: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A short-axis stack: LV disk (3), myocardial ring (2), RV crescent (1), noisy intensities."""
    height, width, slices = shape
    yy, xx = np.mgrid[:height, :width] - np.array([height / 2, width / 2])[:, None, None]
    r = np.hypot(yy, xx)
    label2d = np.where(r < radius, 3, np.where(r < radius + 4, 2, 0))
    label2d[(np.hypot(yy, xx + radius + 6) < radius) & (label2d == 0)] = 1
    label = np.repeat(label2d[:, :, None], slices, axis=2).astype(np.uint8)
    image = np.array([0.1, 0.5, 0.3, 0.9])[label] + 0.05 * rng.standard_normal(shape)
    return image.astype(np.float32), label


def _write_download(root: Path, rng: np.random.Generator) -> Path:
    """training/ with 4 patients (patient004 a symlink to a folder elsewhere), testing/ with 2
    (patient102 on a finer in-plane grid, so data.spacing resamples it)."""
    shape = (64, 64, 2)

    def patient(folder: Path, number: int, spacing=(1.5, 1.5, 10.0)) -> Path:
        radius = 8 + number % 5
        frames = {1: _heart(shape, radius, rng), 2: _heart(shape, radius - 3, rng)}
        return write_acdc_patient(folder, number, frames, {"ED": 1, "ES": 2, "Group": "NOR"},
                                  spacing=spacing)

    for number in (1, 2, 3):
        patient(root / "download" / "training", number)
    elsewhere = patient(root / "other_disk", 4)
    (root / "download" / "training" / "patient004").symlink_to(elsewhere,
                                                               target_is_directory=True)
    patient(root / "download" / "testing", 101)
    patient(root / "download" / "testing", 102, spacing=(1.25, 1.25, 10.0))
    return root / "download"


def test_acdc_download_trains_without_resplitting_and_predictions_keep_geometry(tmp_path):
    download = _write_download(tmp_path, np.random.default_rng(11))
    before = sorted(str(p.relative_to(download)) for p in download.rglob("*"))
    run_dir = tmp_path / "run"
    cfg = load_config(SEG_TINY, [f"run_dir={run_dir}", "data.dataset=acdc",
                                 f"data.root={download}", "data.val_fraction=0.25",
                                 "data.split_seed=3", "data.spacing=[1.5,1.5]"])
    results, stages = _run(cfg)
    assert "report" in stages.ran and sorted(str(p.relative_to(download))
                                             for p in download.rglob("*")) == before
    # The split, computed here by hand: one of the 4 name-sorted training patients, drawn by
    # random.Random(split_seed), validates; testing/ is the test split.
    names = ["patient001", "patient002", "patient003", "patient004"]
    val = [names[i] for i in random.Random(3).sample(range(4), 1)]
    assert results["data"]["val_patients"] == 1 and results["data"]["train_patients"] == 3
    assert results["data"]["test_patients"] == 2
    data = S_recipe.CardiacData(cfg, download)
    assert sorted({v.split("_frame")[0] for v, _ in data.slices("val").volumes}) == val
    assert sorted({v.split("_frame")[0] for v, _ in data.slices("train").volumes}) == sorted(
        set(names) - set(val))
    rows = json.loads((run_dir / "evaluate" / "volumes.json").read_text())
    assert sorted({r["volume"] for r in rows}) == [f"patient10{p}_frame0{f}"
                                                   for p in (1, 2) for f in (1, 2)]
    # patient102 (1.25 mm) is read on the 1.5 mm grid: its LV spans 1.25 / 1.5 of the pixels.
    sample = data.slices("test")
    lv = {sample[i]["volume"]: int((sample[i]["label"] == 3).sum()) for i in range(len(sample))}
    raw = int((nib.load(download / "testing" / "patient102" / "patient102_frame01_gt.nii.gz")
               .get_fdata()[:, :, 0] == 3).sum())
    assert lv["patient102_frame01"] == pytest.approx(raw * (1.25 / 1.5) ** 2, rel=0.15)
    # kdhpc.segment on a test image: labels in the input's shape and affine, from the export.
    image_file = download / "testing" / "patient101" / "patient101_frame01.nii.gz"
    out = tmp_path / "seg.nii.gz"
    assert segment_main([str(image_file), "--model", str(run_dir), "--out", str(out)]) == 0
    image, labels = nib.load(image_file), nib.load(out)
    assert labels.shape == image.shape and np.array_equal(labels.affine, image.affine)
    student = S_recipe.load_network(cfg.model.student, run_dir / "student_kd" / "best_model.pt")
    volume = image.get_fdata()
    with torch.no_grad():
        for s in range(volume.shape[2]):
            x = volume[:, :, s]
            x = (x - x.mean()) / x.std()  # the slice is already 64 x 64: no crop
            logits = student(torch.from_numpy(x[None, None]).float())[0]
            assert np.array_equal(np.asarray(labels.dataobj[:, :, s]),
                                  logits.argmax(1)[0].numpy().astype(np.uint8))


# ---------------------------------------------------------------- a teacher that is only run

def _program_file(tmp_path: Path, kind: str, views) -> tuple[Path, torch.nn.Module]:
    """The lab's teacher (seeded weights) scripted or exported to a file, and its eager self.
    The export is traced at batch 1 on a view: a .pt2 fixes its example's shapes."""
    import own_models_lab

    torch.manual_seed(5)
    eager = own_models_lab.LabRecon(width=6, blocks=2).eval()
    if kind == "torchscript":
        path = tmp_path / "teacher.ts.pt"
        torch.jit.save(torch.jit.script(eager), str(path))
    else:
        one = default_collate([views.get_view(0, 0)])
        path = tmp_path / "teacher.pt2"
        torch.export.save(torch.export.export(eager, (one["input"], one["kspace"], one["mask"])),
                          str(path))
    return path, eager


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_program_teacher_is_run_for_output_imitation(lab, tmp_path, kind):
    run_dir = tmp_path / "run"
    base = load_config(TINY, [f"run_dir={run_dir}"])
    views = R.view_dataset(base, base.data.train_split)
    path, eager = _program_file(tmp_path, kind, views)
    cfg = load_config(TINY, [f"run_dir={run_dir}", f"model.teacher_checkpoint={path}",
                             "loss.attention_transfer=false"])
    results, stages = _run(cfg)
    assert stages.ran[:5] == ["data", "teacher", "teacher_cache", "student", "student_kd"]
    assert "student_at" not in stages.ran and results["teacher"]["trained"] is False
    batch = default_collate([{**views.get_view(i, 0), "index": torch.tensor(i),
                              "view": torch.tensor(0)} for i in range(len(views))])
    cached = CachedTeacher(run_dir / "teacher_cache").targets(batch)
    assert sorted(cached) == ["output"]  # no attention maps: the program's layers are not tapped
    with torch.no_grad():
        expected = eager(batch["input"], batch["kspace"], batch["mask"])
    assert expected.abs().sum() > 0
    torch.testing.assert_close(cached["output"], expected, rtol=1e-5, atol=1e-6)
    # The report's teacher row is the program, evaluated like any teacher.
    own = json.loads((run_dir / "evaluate" / "per_volume.json").read_text())
    assert own["Teacher"] and own["Teacher"] != own["ZF"]
    # kdhpc.predict loads the run's teacher as the program.
    loaded, _ = load_run_model(run_dir, "teacher")
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["input"], batch["kspace"], batch["mask"]),
                                   expected, rtol=1e-5, atol=1e-6)


def test_program_teacher_with_attention_transfer_fails_before_anything_is_written(lab, tmp_path):
    run_dir = tmp_path / "run"
    base = load_config(TINY, [f"run_dir={run_dir}"])
    path, _ = _program_file(tmp_path, "torchscript", R.view_dataset(base, base.data.train_split))
    cfg = load_config(TINY, [f"run_dir={run_dir}", f"model.teacher_checkpoint={path}"])
    with pytest.raises(ConfigError) as caught:
        distill.run(cfg)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"model.teacher_checkpoint: {path} ")
    assert "forward hooks, which need the eager module" in message
    assert "set loss.attention_transfer: false" in message
    assert not run_dir.exists()
