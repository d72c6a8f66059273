"""The enhancement recipe (Shou et al.): views, routing, perceptual features, the loss, and the
whole tiny recipe end to end with its report checked against independent recomputations, a
rerun that skips every stage, and a preempted run that resumes to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.stats
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kdhpc import distill
from kdhpc.recipe import Stages, read_predictions
from kdhpc.config import Config, ConfigError, load_config
from kdhpc.data.views import EnhancementViews, MultiTaskViews
from kdhpc.losses import EarlyLayers, PerceptualLoss, enhancement_loss
from kdhpc.metrics import ROI_MARGIN, paired_units, roi_labels
from kdhpc.models import build_model
from kdhpc.models.edsr import TaskExperts
from kdhpc.recipes import enhancement as E
from kdhpc.train import Preempted, load_weights

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "enh_tiny.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("enh_data")


@pytest.fixture
def tiny_cfg(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("KDHPC_DATA", str(data_dir))
    return lambda *overrides: load_config(TINY, [f"run_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """One whole tiny run (cached teacher outputs), shared by the end-to-end checks."""
    run_dir = tmp_path_factory.mktemp("enh_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDHPC_DATA", str(data_dir))
        cfg = load_config(TINY, [f"run_dir={run_dir}"])
        summary = distill.run(cfg)["report"]
        root = Path(json.loads((run_dir / "data" / "stage.json").read_text())["result"]["root"])
    return cfg, run_dir, summary, root


# ---------------------------------------------------------------------------------------------
# pieces

def test_patch_is_cut_from_the_degraded_whole_slice(tiny_cfg):
    from kdhpc.data.default import dataset_root

    cfg = tiny_cfg()
    recipe = E.EnhancementData(cfg, dataset_root(cfg))
    for task in E.TASKS:
        patches = EnhancementViews(recipe.slices("train"), cfg, task, patch_size=16)
        whole = EnhancementViews(recipe.slices("train"), cfg, task, patch_size=0)
        for index, view in [(0, 0), (1, 1), (len(patches) - 1, 1)]:
            item, full = patches.get_view(index, view), whole.get_view(index, view)
            top, left = item["view_key"][3:5].tolist()
            window = (..., slice(top, top + 16), slice(left, left + 16))
            assert torch.equal(item["input"], full["input"][window])
            assert torch.equal(item["target"], full["target"][window])
            assert item["view_key"].tolist() == patches.view_key(index, view)
            assert int(item["task"]) == E.TASKS.index(task)
        # Different views of one slice draw different noise and patches; view 0 never rotates.
        a, b = patches.get_view(0, 0), patches.get_view(0, 1)
        assert a["view_key"][0] == 0 and a["view_key"].tolist() != b["view_key"].tolist()


def test_multitask_views_concatenate_tasks_and_keep_their_keys(tiny_cfg):
    from kdhpc.data.default import dataset_root

    cfg = tiny_cfg()
    recipe = E.EnhancementData(cfg, dataset_root(cfg))
    parts = [recipe.views("train", t) for t in E.TASKS]
    mixed = MultiTaskViews(parts)
    assert len(mixed) == sum(len(p) for p in parts)
    for index in range(len(mixed)):
        part, local = (0, index) if index < len(parts[0]) else (1, index - len(parts[0]))
        got, want = mixed.get_view(index, 1), parts[part].get_view(local, 1)
        assert int(got["task"]) == part and torch.equal(got["input"], want["input"])
        assert mixed.view_key(index, 1) == parts[part].view_key(local, 1)
        assert mixed.volume_of(index) == (E.TASKS[part], parts[part].volume_of(local))
    with pytest.raises(IndexError):
        mixed.get_view(len(mixed), 0)


def test_task_experts_route_each_sample_to_its_expert():
    torch.manual_seed(0)
    experts = [build_model("edsr_small", n_blocks=1, features=4) for _ in E.TASKS]
    routed = TaskExperts(experts)
    x = torch.randn(5, 1, 12, 12)
    task = torch.tensor([1, 0, 0, 1, 1])
    with torch.no_grad():
        out = routed(x, task)
        for b in range(5):
            assert torch.allclose(out[b:b + 1], experts[int(task[b])](x[b:b + 1]), atol=1e-6)
        with pytest.raises(ValueError, match="task ids"):
            routed(x, torch.tensor([0, 1, 2, 0, 0]))


def test_early_layers_match_the_networks_own_activations():
    torch.manual_seed(1)
    x = torch.randn(2, 1, 20, 20)
    swin = build_model("swinir_small").eval()
    seen = {}
    swin.blocks[0].layers[0].register_forward_hook(lambda m, i, o: seen.setdefault("t", o))
    with torch.no_grad():
        swin(x)
        features = EarlyLayers(swin)(x)  # [B, D, H, W]
    tokens = seen["t"]  # [B, H*W, D]
    assert torch.allclose(features, tokens.transpose(1, 2).reshape(features.shape), atol=1e-5)
    edsr = build_model("edsr_small").eval()
    with torch.no_grad():
        head = edsr.head(x)
        block = edsr.blocks[0]
        manual = head + block.conv2(torch.relu(block.conv1(head)))
        assert torch.allclose(EarlyLayers(edsr)(x), manual, atol=1e-5)
    with pytest.raises(ConfigError, match="perceptual"):
        EarlyLayers(torch.nn.Conv2d(1, 1, 3))


def test_enhancement_loss_equals_an_independent_formula():
    torch.manual_seed(2)
    pred = torch.rand(3, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    target, teacher = torch.rand(3, 1, 16, 16, dtype=torch.float64), torch.rand(
        3, 1, 16, 16, dtype=torch.float64)
    data_range = torch.tensor([1.5, 2.0, 1.2], dtype=torch.float64)
    net = torch.nn.Conv2d(1, 3, 3, padding=1).double()
    perceptual = PerceptualLoss(net)
    alpha, w1, ws, wp = 0.3, 0.7, 0.4, 0.2
    terms = enhancement_loss(pred, target, teacher, alpha, l1_weight=w1, ssim_weight=ws,
                             perceptual=perceptual, perceptual_weight=wp, data_range=data_range)
    p, t, s = pred.detach().numpy()[:, 0], target.numpy()[:, 0], teacher.numpy()[:, 0]
    ssim = np.mean([structural_similarity(t[b], p[b], win_size=7, data_range=float(data_range[b]),
                                          gaussian_weights=False, use_sample_covariance=True)
                    for b in range(3)])
    with torch.no_grad():
        feat = np.abs((net(pred) - net(target)).numpy()).mean()
    data = w1 * np.abs(p - t).mean() + ws * (1 - ssim) + wp * feat
    expected = alpha * np.abs(p - s).mean() + (1 - alpha) * data
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-9)
    terms["loss"].backward()
    assert pred.grad is not None and all(q.grad is None for q in net.parameters())
    plain = enhancement_loss(pred, target, None, alpha, l1_weight=1.0)
    assert set(plain) == {"l1", "loss"} and plain["loss"].item() == pytest.approx(
        np.abs(p - t).mean())


def test_roi_labels_keep_the_background_away_from_the_head():
    tissue = np.zeros((40, 40), dtype=np.uint8)
    tissue[10:30, 12:28] = 3
    tissue[14:18, 14:18] = 2
    tissue[20:22, 20:22] = 1
    rois = roi_labels(tissue, np.random.default_rng(0).random((40, 40)))
    distance = ndimage.distance_transform_cdt(tissue == 0, metric="taxicab")
    assert np.array_equal(rois == 0, distance > ROI_MARGIN)
    assert np.array_equal(rois == 2, tissue == 2) and np.array_equal(rois == 3, tissue == 3)
    assert not (rois == 1).any()
    image = np.zeros((40, 40))
    image[10:30, 10:30] = 1.0
    auto = roi_labels(None, image)
    assert (auto == 9).sum() == (20 - 2 * ROI_MARGIN) ** 2 and (auto[image > 0] != 0).all()


def test_paired_gives_the_one_sided_p_of_greater():
    rng = np.random.default_rng(3)
    a = {k: v for k, v in enumerate(rng.normal(1.0, 1.0, 12))}
    b = {k: v for k, v in enumerate(rng.normal(0.4, 1.0, 12))}
    result = paired_units(a, b)
    x, y = [a[k] for k in range(12)], [b[k] for k in range(12)]
    assert result["p_greater"] == pytest.approx(
        scipy.stats.ttest_rel(x, y, alternative="greater").pvalue)
    assert result["p_value"] == pytest.approx(scipy.stats.ttest_rel(x, y).pvalue)


def test_bad_config_is_refused_with_the_key(tiny_cfg):
    with pytest.raises(ConfigError, match="degrade.task"):
        E.model_task(tiny_cfg("degrade.task=undersample"))
    with pytest.raises(ConfigError, match="model.student"):
        E.multitask_arch("dccnn_student")
    assert E.multitask_arch("edsr_baseline") == "edsr_multitask_baseline"
    with pytest.raises(ConfigError, match="data.patch_size"):
        from kdhpc.data.default import dataset_root
        cfg = tiny_cfg("data.patch_size=64")
        E.EnhancementData(cfg, dataset_root(cfg)).views("train", "denoise").get_view(0, 0)
    with pytest.raises(ConfigError, match="model.experts"):
        E.check_config(tiny_cfg("model.experts=[a.pt]"))


@pytest.mark.parametrize("name", ["enh_tiny", "enh_default", "enh_published",
                                  "enh_published_lightweight"])
def test_recipe_configs_name_existing_networks(name):
    from kdhpc.models import MODEL_NAMES

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.recipe == "enhancement" and E.model_task(cfg) == "denoise"
    assert cfg.model.teacher.startswith("swinir_") and cfg.model.teacher in MODEL_NAMES
    assert E.multitask_arch(cfg.model.student) in MODEL_NAMES
    if name.startswith("enh_published"):
        assert cfg.model.student == "edsr_baseline"
        assert cfg.model.teacher in ("swinir_denoise", "swinir_lightweight_sr")


# ---------------------------------------------------------------------------------------------
# the whole recipe

STAGES = ["data", "teacher", "teacher_cache", *[E.alpha_name(a) for a in Config().loss.alpha_grid],
          "expert_denoise", "expert_superres", "expert_cache", "multitask_nokd", "multitask_kd",
          "evaluate", "timing", "report"]


def _slice_rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "evaluate" / "slices.json").read_text())


def test_tiny_run_writes_every_stage_and_the_report(tiny_run):
    cfg, run_dir, summary, _ = tiny_run
    for stage in STAGES:
        assert (run_dir / stage / "stage.json").is_file(), stage
    for name in ["report.md", "metrics.json", "alpha_curve.png", "panel_model_based.png",
                 "panel_task_based_denoise.png", "panel_task_based_superres.png"]:
        assert (run_dir / name).stat().st_size > 0, name
    report = (run_dir / "report.md").read_text()
    assert "statsmodels" in report and "p (KD > no-KD)" in report
    metrics = json.loads((run_dir / "metrics.json").read_text())
    latency = metrics["timing"]["rows"]
    assert latency[0]["threads"] == 1 and latency[0]["reliable"] == "yes"
    for row in latency:
        assert 0 < row["SwinIR min ms"] <= row["SwinIR median ms"]
        assert 0 < row["EDSR min ms"] <= row["EDSR median ms"]
        assert row["speed-up"] == pytest.approx(row["SwinIR min ms"] / row["EDSR min ms"])
    assert summary["speed_ratio"] == latency[0]["speed-up"]
    # The DNE expert is the no-KD DNE student (same training), not trained twice.
    expert = json.loads((run_dir / "expert_denoise" / "stage.json").read_text())["result"]
    student = json.loads((run_dir / "student_a0.00" / "stage.json").read_text())["result"]
    assert expert["weights"] == student["weights"] and expert["same_as"] == "student_a0.00"
    # The KD students read the cache the teacher stage's network filled.
    cache = json.loads((run_dir / "teacher_cache" / "stage.json").read_text())["result"]
    assert cache["mode"] == "precompute" and cache["records"] > 0


def _saved(path: Path):
    """(target, rois, dataset indices, {model: predictions}) kept by the evaluation, its volumes
    concatenated in name order."""
    saved = read_predictions([path])
    volumes = sorted(key.split("/", 1)[1] for key in saved if key.startswith("index/"))
    models = {key.split("/", 1)[0] for key in saved} - {"target", "roi", "index"}
    stack = {name: np.concatenate([saved[f"{name}/{v}"] for v in volumes])
             for name in ("target", "roi", "index", *models)}
    return stack.pop("target"), stack.pop("roi"), stack.pop("index"), stack


def test_report_numbers_equal_recomputation_from_saved_predictions(tiny_run):
    cfg, run_dir, _, root = tiny_run
    rows = _slice_rows(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    target, rois, index, preds = _saved(run_dir / "evaluate" / "model_based-rank00000.h5")
    test_files = sorted((root / "singlecoil_test").glob("*.h5"))
    # Targets are the files' reconstructions (the default data need no crop).
    recon = np.concatenate([h5py.File(p, "r")["reconstruction_esc"][:] for p in test_files])
    assert np.allclose(target, recon[index], atol=1e-5 * recon.max())
    # SNR per (slice, ROI): mean over the tissue ROI / sample std over the background ROI.
    names = E.model_names(Config().loss.alpha_grid)
    for model, pred in preds.items():
        for j, i in enumerate(index):
            row = next(r for r in rows if r["model"] == model and r["task"] == "denoise"
                       and r["index"] == i)
            background = pred[j][rois[j] == 0]
            for label, name in ((2, "GM"), (3, "WM")):
                if (rois[j] == label).any():
                    snr = pred[j][rois[j] == label].mean() / background.std(ddof=1)
                    assert row[f"snr_{name}"] == pytest.approx(snr, rel=1e-4)
            peak = row["volume_max"]
            assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(
                target[j], pred[j], data_range=peak), rel=1e-4)
            assert row["ssim"] == pytest.approx(structural_similarity(
                target[j], pred[j], win_size=7, data_range=peak, gaussian_weights=False,
                use_sample_covariance=True), abs=1e-4)
    # The volume PSNR of the table is the whole-volume one; every paired test is over volumes.
    volume_of = {r["index"]: r["volume"] for r in rows if r["task"] == "denoise"}
    volumes = sorted(set(volume_of.values()))
    assert len(volumes) >= 2
    peak = {r["volume"]: r["volume_max"] for r in rows}

    def per_volume(model):
        """{volume: (whole-volume PSNR, mean SNR over its (slice, ROI) units)}, recomputed."""
        out = {}
        for v in volumes:
            js = [j for j, i in enumerate(index) if volume_of[int(i)] == v]
            snr = [val for r in rows if r["model"] == model and r["task"] == "denoise"
                   and r["volume"] == v for k, val in r.items() if k.startswith("snr_")]
            out[v] = (peak_signal_noise_ratio(target[js], preds[model][js], data_range=peak[v]),
                      float(np.mean(snr)))
        return out

    recomputed = {v["volume"]: v["psnr"] for v in metrics["volumes"]
                  if v["task"] == "denoise" and v["model"] == "input"}
    for v, (psnr_v, _) in per_volume("input").items():
        assert recomputed[v] == pytest.approx(psnr_v, rel=1e-4)
    table = {e["model"]: e for e in metrics["alpha_table"]}
    kd, nokd = names[0.5], names[0.0]
    a, b = per_volume(kd), per_volume(nokd)
    for position, key in ((1, "vs_nokd_snr"), (0, "vs_nokd_psnr")):
        x, y = [a[v][position] for v in volumes], [b[v][position] for v in volumes]
        test = table[kd][key]
        assert test["n"] == len(volumes)
        assert test["p_value"] == pytest.approx(scipy.stats.ttest_rel(x, y).pvalue, rel=1e-6)
        assert test["mean_difference"] == pytest.approx(np.mean(x) - np.mean(y), rel=1e-6)
    x, y = [a[v][1] for v in volumes], [b[v][1] for v in volumes]
    assert table[kd]["vs_nokd_snr"]["p_greater"] == pytest.approx(
        scipy.stats.ttest_rel(x, y, alternative="greater").pvalue, rel=1e-6)
    assert table[kd]["snr"] == pytest.approx(np.mean(x))


def test_superres_inputs_equal_an_independent_phase_encode_truncation(tiny_run):
    cfg, run_dir, _, root = tiny_run
    target, _, index, preds = _saved(run_dir / "evaluate" / "task_based_superres-rank00000.h5")
    degraded = preds["input"]
    for j in range(len(index)):
        k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(target[j].astype(np.float64)),
                                        norm="ortho"))
        width = k.shape[1]
        keep = max(1, round(width / cfg.degrade.sr_scale))
        lines = np.zeros(width)
        lines[width // 2 - keep // 2: width // 2 - keep // 2 + keep] = 1
        image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k * lines), norm="ortho"))
        assert np.allclose(degraded[j], np.abs(image), atol=1e-5 * target.max())


def test_rerun_skips_every_stage(tiny_run, monkeypatch, data_dir):
    cfg, run_dir, summary, _ = tiny_run
    monkeypatch.setenv("KDHPC_DATA", str(data_dir))
    stages = Stages(run_dir, log=lambda msg: None)
    again = distill.run(cfg, stages)["report"]
    assert stages.ran == [] and stages.skipped == STAGES
    assert again["speed_ratio"] == summary["speed_ratio"]


def test_preempted_stream_run_resumes_to_the_same_teacher(tiny_run, tiny_cfg, monkeypatch):
    _, first_dir, _, _ = tiny_run
    cfg = tiny_cfg("teacher.mode=stream")
    from drills import sigterm_at_step
    monkeypatch.setattr("kdhpc.train.step_callbacks", [sigterm_at_step(1)])
    with pytest.raises(Preempted):
        distill.run(cfg)
    assert not (Path(cfg.run_dir) / "teacher" / "stage.json").exists()
    monkeypatch.setattr("kdhpc.train.step_callbacks", [])
    distill.run(cfg)
    run_dir = Path(cfg.run_dir)
    result = json.loads((run_dir / "teacher" / "stage.json").read_text())["result"]
    assert 1 <= result["resumed_from"] < result["steps"]  # stopped at the step boundary after 1
    for a, b in [(run_dir / "teacher" / "final_model.pt", first_dir / "teacher" / "final_model.pt")]:
        wa, wb = load_weights(a), load_weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Streamed teacher targets equal the cached ones up to the cache's float16.
    streamed = _train_log(run_dir / "student_a1.00")
    cached = _train_log(first_dir / "student_a1.00")
    assert streamed["kd"] == pytest.approx(cached["kd"], rel=2e-3)
    assert json.loads((run_dir / "teacher_cache" / "stage.json").read_text())["result"][
        "mode"] == "stream"


def _train_log(stage_dir: Path) -> dict:
    import csv

    with (stage_dir / "train_log.csv").open() as fh:
        row = next(csv.DictReader(fh))
    return {k: float(v) for k, v in row.items()}
