"""The segmentation recipe (Cui et al.): its loss against an independent computation, the
enumerable views, and the tiny config end to end (preempted and resumed, then rerun), with the
report's numbers recomputed from the saved predictions and the data files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.stats
import torch

from kdhpc.config import ConfigError, load_config, result_values
from kdhpc.data.acdc import IDENTITY, ViewParams, center_patch, make_view, view_params
from kdhpc.export import LOGIT_PARITY_TOLERANCE
from kdhpc.losses import deep_supervision_weights, segmentation_kd_loss
from kdhpc.recipe import read_predictions
from kdhpc.recipes import segmentation as seg

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "seg_tiny.yaml"


# ---------------------------------------------------------------------------------------------
# loss

def independent_kd_loss(student, labels, teacher, weight, temperature, level_weights,
                        t2=True):
    """Cui et al.'s loss written out term by term (one-hot Dice, gathered CE, explicit KL)."""
    total = 0.0
    for wi, s, t in zip(level_weights, student, teacher if teacher else [None] * len(student)):
        if wi == 0:
            continue
        h, w = s.shape[-2:]
        step = labels.shape[-1] // w
        y = labels[:, ::step, ::step]                                # nearest = top-left pixel
        logp = s.double().log_softmax(1)
        ce = -logp.gather(1, y[:, None]).mean()
        probs = logp.exp()[:, 1:]
        onehot = torch.stack([(y == k).double() for k in range(1, s.shape[1])], 1)
        dice = ((2 * (probs * onehot).sum((0, 2, 3)) + 1e-5)
                / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1e-5)).mean()
        hard = ce - dice
        if t is None:
            total = total + wi * hard
            continue
        p = (t.double() / temperature).softmax(1)
        logq = (s.double() / temperature).log_softmax(1)
        kl = (p * (p.log() - logq)).sum(1).mean() * (temperature ** 2 if t2 else 1.0)
        total = total + wi * ((1 - weight) * hard + weight * kl)
    return total


@pytest.mark.parametrize("weight,temperature,ds,t2", [
    (0.5, 2.0, (), True), (0.3, 0.7, (1.0, 2.0, 0.0, 1.0), False), (1.0, 4.0, (), True),
    (0.0, 1.0, (), True)])
def test_segmentation_kd_loss_matches_independent_computation(weight, temperature, ds, t2):
    g = torch.Generator().manual_seed(int(weight * 10 + temperature * 100))
    sizes = [16, 8, 4, 2]
    student = [torch.randn(3, 4, n, n, generator=g, requires_grad=True) for n in sizes]
    teacher = [3 * torch.randn(3, 4, n, n, generator=g) for n in sizes]
    labels = torch.randint(0, 4, (3, 16, 16), generator=g)
    levels = deep_supervision_weights(4, ds)
    expected_weights = ([x / sum(ds) for x in ds] if ds
                        else [w / 1.75 for w in (1.0, 0.5, 0.25, 0.0)])
    assert levels == pytest.approx(expected_weights)
    terms = segmentation_kd_loss(student, labels, teacher, weight, temperature, ds, t2)
    expected = independent_kd_loss(student, labels, teacher, weight, temperature, levels, t2)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    grads = torch.autograd.grad(terms["loss"], student, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, student, allow_unused=True)
    for got, want, wi in zip(grads, expected_grads, levels):
        if wi == 0:  # a level of weight 0 takes no part
            assert got is None or float(got.abs().max()) == 0
            continue
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-7)
    no_teacher = segmentation_kd_loss(student, labels, None, weight, temperature, ds, t2)
    hard = independent_kd_loss(student, labels, None, 0.0, temperature, levels)
    assert no_teacher["loss"].item() == pytest.approx(hard.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# views

def smooth_slice(size=32, seed=0):
    rng = np.random.default_rng(seed)
    image = np.abs(rng.standard_normal((size, size))).astype(np.float32) + 0.5
    label = np.zeros((size, size), np.int64)
    label[8:20, 10:24] = 1
    label[12:16, 14:18] = 3
    label[20:24, 6:12] = 2
    return image, label


def zscore(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / x.std()


def test_view_zero_is_the_normalised_slice_and_a_shift_moves_pixels():
    image, label = smooth_slice()
    x0, y0 = make_view(image, label, IDENTITY)
    np.testing.assert_allclose(x0.numpy(), zscore(image), atol=1e-5)
    assert np.array_equal(y0.numpy(), label)

    x, y = make_view(image, label, ViewParams(0, 0, 3, -2, 1000))
    shifted = np.zeros_like(image)
    shifted[3:, :-2] = image[:-3, 2:]                  # out[r, c] = in[r - 3, c + 2]
    shifted_label = np.zeros_like(label)
    shifted_label[3:, :-2] = label[:-3, 2:]
    np.testing.assert_allclose(x.numpy(), zscore(shifted), atol=1e-4)
    assert np.array_equal(y.numpy(), shifted_label)


def test_quarter_turn_warp_equals_the_dihedral_view_and_gamma_formula():
    image, label = smooth_slice(seed=1)
    warped, warped_label = make_view(image, label, ViewParams(0, 90_000, 0, 0, 1000))
    turned, turned_label = make_view(image, label, ViewParams(3, 0, 0, 0, 1000))
    np.testing.assert_allclose(warped.numpy(), turned.numpy(), atol=1e-4)
    assert np.array_equal(warped_label.numpy(), turned_label.numpy())
    assert np.array_equal(turned_label.numpy(), np.rot90(label, 3))

    x, y = make_view(image, label, ViewParams(5, 0, 0, 0, 1500))
    flipped = np.rot90(np.flip(image, -1), 1)
    lo, hi = flipped.min(), flipped.max()
    gamma = lo + (hi - lo) * ((flipped - lo) / (hi - lo)) ** 1.5
    np.testing.assert_allclose(x.numpy(), zscore(gamma), atol=1e-4)
    assert np.array_equal(y.numpy(), np.rot90(np.flip(label, -1), 1))

    x, y = make_view(image, label, ViewParams(0, 17_000, -4, 5, 800))
    assert set(np.unique(y.numpy())) <= {0, 1, 2, 3} and len(np.unique(y.numpy())) == 4
    assert np.array_equal(center_patch(y, 16).numpy(), y.numpy()[8:24, 8:24])


def test_view_keys_are_deterministic_identity_at_zero_and_within_ranges():
    cfg = load_config(TINY, ["degrade.views_per_sample=16"])
    name = "patient001_frame01.nii.gz:3"
    keys = [view_params(name, v, cfg.degrade, 192) for v in range(16)]
    assert keys[0] == IDENTITY
    again = [view_params(name, v, cfg.degrade, 192) for v in range(16)]
    assert keys == again and len(set(keys)) == 16
    assert [k.dihedral for k in keys] == [v % 8 for v in range(16)]
    assert (cfg.degrade.max_rotation_deg, cfg.degrade.max_shift_fraction,
            cfg.degrade.gamma_range) == (15.0, 0.08, [0.7, 1.5])
    shift = math.floor(0.08 * 192)
    for k in keys[1:]:
        assert abs(k.rotation_mdeg) <= 15_000
        assert abs(k.shift_y) <= shift and abs(k.shift_x) <= shift
        assert 700 <= k.gamma_milli <= 1500
    other = view_params("patient001_frame01.nii.gz:4", 5, cfg.degrade, 192)
    assert other != keys[5]
    with pytest.raises(ValueError, match="views_per_sample"):
        view_params("x", 16, cfg.degrade, 192)


def test_view_ranges_come_from_the_config_and_enter_digests_only_when_set():
    still = load_config(TINY, ["degrade.views_per_sample=16", "degrade.max_rotation_deg=0",
                               "degrade.max_shift_fraction=0", "degrade.gamma_range=[1.2, 1.2]"])
    keys = [view_params("patient001_frame01.nii.gz:3", v, still.degrade, 192) for v in range(16)]
    assert keys[1:] == [ViewParams(v % 8, 0, 0, 0, 1200) for v in range(1, 16)]
    wide = load_config(TINY, ["degrade.views_per_sample=16", "degrade.max_rotation_deg=90",
                              "degrade.max_shift_fraction=0.25"])
    wide_keys = [view_params("patient001_frame01.nii.gz:3", v, wide.degrade, 192)
                 for v in range(16)]
    assert max(abs(k.rotation_mdeg) for k in wide_keys) > 15_000
    assert max(max(abs(k.shift_y), abs(k.shift_x)) for k in wide_keys) > math.floor(0.08 * 192)
    # Fields added after shipped teachers and caches were recorded: absent from digests at their
    # defaults (those records stay valid), present once set.
    default = load_config(TINY)
    new_fields = {"max_rotation_deg", "max_shift_fraction", "gamma_range"}
    assert not new_fields & set(result_values(default.degrade))
    assert new_fields <= set(result_values(still.degrade))
    with pytest.raises(ConfigError, match=r"degrade\.gamma_range: expected \[low, high\]"):
        load_config(TINY, ["degrade.gamma_range=[1.5, 0.7]"])


# ---------------------------------------------------------------------------------------------
# the tiny config end to end

def read_volume(root: Path, volume: str, size: int):
    """(raw image [S, H, W], labels [S, H, W]) of a test frame, read with nibabel directly."""
    patient = volume.split("_")[0]
    folder = next(root.glob(f"*/{patient}"))
    image = np.asarray(nib.load(folder / f"{volume}.nii.gz").dataobj, np.float32)
    label = np.asarray(nib.load(folder / f"{volume}_gt.nii.gz").dataobj).astype(np.int64)
    assert image.shape[:2] == (size, size)              # the tiny data are generated at S
    return np.moveaxis(image, -1, 0), np.moveaxis(label, -1, 0)


def own_dice(pred, gt, k):
    p, g = pred == k, gt == k
    total = p.sum() + g.sum()
    return 1.0 if total == 0 else 2.0 * (p & g).sum() / total


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny recipe: stopped by SIGTERM after the teacher's first step, then resumed."""
    from kdhpc import distill

    base = tmp_path_factory.mktemp("seg")
    patch = pytest.MonkeyPatch()
    patch.setenv("KDHPC_DATA", str(base / "data"))
    run_dir = base / "run"
    args = [str(TINY), f"run_dir={run_dir}"]
    try:
        from drills import sigterm_at_step
        patch.setattr("kdhpc.train.step_callbacks", [sigterm_at_step(1)])
        assert distill.main(args) == 75                 # preempted: checkpointed, asks a requeue
        assert not (run_dir / "teacher" / "stage.json").exists()
        patch.setattr("kdhpc.train.step_callbacks", [])
        assert distill.main(args) == 0
        yield run_dir, load_config(run_dir / "config.yaml")
    finally:
        patch.undo()


def test_tiny_run_resumed_the_killed_teacher_and_reports_recomputable_dice(tiny_run):
    run_dir, cfg = tiny_run
    teacher = json.loads((run_dir / "teacher" / "stage.json").read_text())["result"]
    assert teacher["resumed_from"] == 2 and teacher["steps"] == cfg.train.max_steps

    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = metrics["per_volume"]
    predictions = read_predictions(sorted((run_dir / "evaluate").glob("predictions-rank*.h5")))
    root = Path(json.loads((run_dir / "data" / "stage.json").read_text())["result"]["root"])
    size = cfg.data.crop[0]
    frames: dict[str, dict[str, list[float]]] = {}  # model -> patient -> per-frame mean Dice
    for row in sorted(rows, key=lambda r: (r["model"], r["volume"])):
        _, gt = read_volume(root, row["volume"], size)
        pred = predictions[f"{row['model']}/{row['volume']}"]
        scores = [own_dice(pred, gt, k) for k in (1, 2, 3)]
        assert [row["dice_RV"], row["dice_myo"], row["dice_LV"]] == pytest.approx(scores)
        assert row["dice_mean"] == pytest.approx(np.mean(scores))
        patient = row["volume"].split("_frame")[0]
        frames.setdefault(row["model"], {}).setdefault(patient, []).append(np.mean(scores))
    # Paired over patients: each patient's value is the mean of its ED and ES frames.
    by_model = {model: [float(np.mean(v)) for _, v in sorted(patients.items())]
                for model, patients in frames.items()}
    assert all(len(v) == 2 for patients in frames.values() for v in patients.values())
    assert set(by_model) == {"teacher_tta", "teacher", "student_nokd", "student_kd"}
    for model, values in by_model.items():
        assert metrics["dice"][model]["dice_mean"]["mean"] == pytest.approx(np.mean(values))
    test = metrics["paired_tests"]["student_kd vs student_nokd: dice_mean"]
    diff = np.array(by_model["student_kd"]) - np.array(by_model["student_nokd"])
    assert test["mean_difference"] == pytest.approx(diff.mean())
    if np.ptp(diff) > 0:
        expected = scipy.stats.ttest_rel(by_model["student_kd"], by_model["student_nokd"])
        assert test["p_value"] == pytest.approx(expected.pvalue)
    report = (run_dir / "report.md").read_text()
    assert f"{np.mean(by_model['student_kd']):.4f}" in report
    assert (run_dir / "panel.png").stat().st_size > 0

    # the saved predictions are the models' argmax on the raw slices, normalised as documented
    volume = sorted({r["volume"] for r in rows})[0]
    image, _ = read_volume(root, volume, size)
    student = seg.load_network(cfg.model.student, run_dir / "student_kd" / "best_model.pt")
    x = torch.from_numpy(np.stack([zscore(s) for s in image]).astype(np.float32))[:, None]
    with torch.no_grad():
        mine = student(x)[0].argmax(1).numpy()
    # (float32 vs float64 z-scores may flip a near-tie of a barely trained network)
    assert (mine == predictions[f"student_kd/{volume}"]).mean() > 0.999


def test_tiny_run_cache_holds_the_teacher_logits_of_each_view(tiny_run):
    from kdhpc.data.default import dataset_root
    from kdhpc.teacher import CachedTeacher, cache_config

    run_dir, cfg = tiny_run
    recipe = seg.CardiacData(cfg, dataset_root(cfg))
    views = recipe.views("train")
    teacher = seg.load_network(cfg.model.teacher, run_dir / "teacher" / "best_model.pt")
    cache = CachedTeacher(run_dir / "teacher_cache", data_config=cache_config(cfg))
    picks = [(0, 0), (len(views) - 1, views.num_views - 1), (1, 1)]
    items = [views.get_view(i, v) for i, v in picks]
    batch = {"index": torch.tensor([i for i, _ in picks]),
             "view": torch.tensor([v for _, v in picks]),
             "view_key": torch.stack([it["view_key"] for it in items])}
    cached = cache.targets(batch)
    # the teacher sees the whole view; its logits are cut to the student's central patch
    size, patch = cfg.data.crop[0], cfg.data.patch_size
    contexts = torch.stack([it["context"] for it in items])
    assert contexts.shape[-1] == size and items[0]["image"].shape[-1] == patch
    for it in items:
        start = (size - patch) // 2
        assert torch.equal(it["image"], it["context"][:, start:start + patch, start:start + patch])
    with torch.no_grad():
        direct = teacher(contexts)
    assert len(cached) == len(direct) == 4
    for level, logits in enumerate(direct):
        start, width = (size - patch) // 2 >> level, patch >> level
        want = logits[..., start:start + width, start:start + width]
        torch.testing.assert_close(cached[f"logits_{level}"], want, rtol=2e-3, atol=2e-3)
    cache.close()

    log = (run_dir / "student_kd" / "train_log.csv").read_text().splitlines()
    assert "kl" in log[0].split(",") and "kl" not in (
        run_dir / "student_nokd" / "train_log.csv").read_text().splitlines()[0].split(",")


def test_tiny_run_export_matches_the_eager_student(tiny_run):
    run_dir, cfg = tiny_run
    exported = json.loads((run_dir / "export" / "stage.json").read_text())["result"]
    assert exported["torchscript"]["max_abs_diff"] <= LOGIT_PARITY_TOLERANCE
    assert "onnx" in exported
    scripted = torch.jit.load(str(run_dir / "export" / "student_kd.torchscript.pt"))
    student = seg.load_network(cfg.model.student, run_dir / "student_kd" / "best_model.pt")
    x = torch.randn(3, 1, cfg.data.crop[0], cfg.data.crop[0],
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), student(x)[0], rtol=1e-5, atol=1e-5)


def test_tiny_rerun_skips_every_stage(tiny_run, monkeypatch):
    from kdhpc import distill
    from kdhpc.recipe import Stages

    run_dir, cfg = tiny_run
    monkeypatch.setenv("KDHPC_DATA", str(run_dir.parent / "data"))
    stages = Stages(run_dir, log=lambda msg: None)
    summary = distill.run(cfg, stages)["report"]
    assert stages.ran == [] and "report" in stages.skipped and len(stages.skipped) == 9
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert summary["mean_dice"]["student_kd"] == pytest.approx(
        metrics["dice"]["student_kd"]["dice_mean"]["mean"])


def test_bad_config_is_refused_with_the_key():
    from kdhpc.config import ConfigError

    cfg = load_config(TINY, ["data.crop=[64, 48]"])
    with pytest.raises(ConfigError, match="data.crop"):
        seg.image_size(cfg)
    for patch in (96, 40):
        cfg = load_config(TINY, [f"data.patch_size={patch}"])
        with pytest.raises(ConfigError, match="data.patch_size"):
            seg.patch_size(cfg)
