"""kdhpc.predict and kdhpc.evaluate: a real reconstruction run (python -m kdhpc.distill), its
predictions on a fastMRI-layout folder scored by kdhpc.evaluate equal the run's own evaluation;
evaluate's metrics against scikit-image / numpy (fastMRI's evaluate.py formulas); measured
k-space with the file's own mask; one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kdhpc.config import load_config
from kdhpc.data.fastmri import write_fastmri
from kdhpc.evaluate import EvaluateError, evaluate
from kdhpc.evaluate import main as evaluate_main
from kdhpc.predict import PredictError, load_run_model, predict
from kdhpc.predict import main as predict_main

REPO = Path(__file__).resolve().parents[1]
METRICS = ("nmse", "psnr", "ssim")


@pytest.fixture(scope="module")
def recon_run(tmp_path_factory):
    """A finished tiny reconstruction run and its data, made by the real command line."""
    base = tmp_path_factory.mktemp("recon_run")
    # Without the rank variables an earlier in-process run exported (its port is still bound).
    env = {**{k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
           "PYTHONPATH": str(REPO), "KDHPC_DATA": str(base / "data")}
    run_dir = base / "run"
    proc = subprocess.run([sys.executable, "-m", "kdhpc.distill", "configs/recon_tiny.yaml",
                           f"run_dir={run_dir}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = run_dir / "data" / "stage.json"
    dataset = json.loads(data.read_text())["result"]["dataset"]
    test_split = base / "data" / dataset / "singlecoil_test"
    assert sorted(test_split.glob("*.h5"))
    return run_dir, test_split


def test_predict_then_evaluate_equals_the_runs_own_evaluation(recon_run, tmp_path):
    run_dir, test_split = recon_run
    # A fastMRI-layout folder of our own: the run's test volumes, copied.
    folder = tmp_path / "fastmri"
    folder.mkdir()
    for f in sorted(test_split.glob("*.h5")):
        shutil.copy(f, folder / f.name)
    out = tmp_path / "pred"
    assert predict_main([str(run_dir), "--data", str(folder), "--out", str(out)]) == 0
    cfg = load_config(run_dir / "config.yaml")
    for f in sorted(folder.glob("*.h5")):
        with h5py.File(out / f.name, "r") as pred, h5py.File(f, "r") as target:
            assert list(pred.keys()) == ["reconstruction"]
            rec = pred["reconstruction"][()]
            crop = tuple(min(c, n) for c, n in zip(cfg.data.crop,
                                                   target["reconstruction_esc"].shape[1:]))
            assert rec.shape == (target["reconstruction_esc"].shape[0], *crop)
            assert rec.dtype == np.float32 and np.isfinite(rec).all()
    scores_file = tmp_path / "scores.json"
    assert evaluate_main(["--target", str(folder), "--pred", str(out), "--out",
                          str(scores_file)]) == 0
    scores = json.loads(scores_file.read_text())
    own = json.loads((run_dir / "evaluate" / "per_volume.json").read_text())["KD-Student"]
    assert sorted(scores["per_volume"]) == sorted(own)
    for name, values in own.items():
        for metric in METRICS:
            assert scores["per_volume"][name][metric] == pytest.approx(values[metric], rel=1e-4,
                                                                       abs=1e-6), (name, metric)
    for metric in METRICS:
        assert scores["total"][metric]["mean"] == pytest.approx(
            np.mean([v[metric] for v in own.values()]), rel=1e-4)


def test_predict_measured_kspace_uses_the_files_mask(recon_run, tmp_path):
    """A fastMRI test-style file (undersampled k-space, ``mask``, no target): the output equals
    the run's student applied by hand (numpy FFTs) to the masked measured k-space."""
    run_dir, _ = recon_run
    model, cfg = load_run_model(run_dir)
    rng = np.random.default_rng(0)
    height, width, slices = 40, 36, 2  # larger than the run's 32 x 32 crop: output is cropped
    image = rng.random((slices, height, width)).astype(np.float32)
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image, axes=(-2, -1)), norm="ortho"),
                             axes=(-2, -1)).astype(np.complex64)
    mask = (rng.random(width) < 0.4).astype(np.float32)
    mask[width // 2 - 2: width // 2 + 2] = 1
    folder = tmp_path / "test_files"
    write_fastmri(folder / "file_test_000.h5", kspace * mask, None, mask=mask,
                  acceleration=4)
    assert predict(run_dir, folder, tmp_path / "out", input_kind="kspace")
    with h5py.File(tmp_path / "out" / "file_test_000.h5", "r") as f:
        rec = f["reconstruction"][()]
    # Independent: the zero-filled image on the full grid, its unshifted spectrum and mask.
    zf = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace * mask, axes=(-2, -1)),
                                      norm="ortho"), axes=(-2, -1))
    peak = np.abs(zf).max()
    zf = zf / peak
    k0 = np.fft.fft2(zf, norm="ortho")
    with torch.inference_mode():
        full = model(torch.from_numpy(zf.real[:, None].astype(np.float32)),
                     torch.from_numpy(k0[:, None].astype(np.complex64)),
                     torch.from_numpy(np.fft.ifftshift(mask)).reshape(1, 1, 1, -1)).numpy()
    h, w = cfg.data.crop
    top, left = (height - h) // 2, (width - w) // 2
    expected = full[:, 0, top:top + h, left:left + w] * peak
    assert rec.shape == (slices, h, w)
    np.testing.assert_allclose(rec, expected, rtol=1e-4, atol=1e-5 * peak)
    # Fully sampled k-space without a mask dataset: the run's mask config undersamples it, the
    # same as a file carrying that mask (centred layout) over pre-masked k-space.
    from kdhpc.data.masks import make_mask, to_layout

    run_mask = to_layout(make_mask(cfg.mask, width), cfg.mask.layout, "centered")
    assert 0 < run_mask.sum() < width
    write_fastmri(tmp_path / "full" / "file_full_000.h5", kspace, image)
    write_fastmri(tmp_path / "masked" / "file_full_000.h5", kspace * run_mask, None,
                  mask=run_mask, acceleration=4, max_value=float(np.abs(image).max()))
    for name in ("full", "masked"):
        predict(run_dir, tmp_path / name, tmp_path / f"out_{name}", input_kind="kspace")
    with h5py.File(tmp_path / "out_full" / "file_full_000.h5", "r") as a, \
            h5py.File(tmp_path / "out_masked" / "file_full_000.h5", "r") as b:
        np.testing.assert_allclose(a["reconstruction"][()], b["reconstruction"][()], rtol=1e-6,
                                   atol=1e-7)
    # The run's convention needs a target: such a file is refused, naming it and the fix.
    with pytest.raises(PredictError, match=r"file_test_000.h5.*no target.*--input kspace"):
        predict(run_dir, folder, tmp_path / "out2")


def _write_recon(path: Path, volume: np.ndarray, key: str = "reconstruction") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=volume)


def test_evaluate_matches_skimage_and_numpy(tmp_path):
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    expected = {}
    for i, key in enumerate(["reconstruction_esc", "reconstruction_rss", "reconstruction"]):
        gt = rng.random((3, 24, 20)).astype(np.float32) * (i + 1)
        pred = (gt + 0.1 * rng.standard_normal(gt.shape)).astype(np.float32)
        name = f"vol{i}.h5"
        _write_recon(tmp_path / "target" / name, gt, key)
        _write_recon(tmp_path / "pred" / name, pred)
        gt64, pred64 = gt.astype(np.float64), pred.astype(np.float64)
        peak = gt64.max()  # fastMRI evaluate.py: maxval = gt.max() of the volume
        expected[name] = {
            "nmse": np.linalg.norm(gt64 - pred64) ** 2 / np.linalg.norm(gt64) ** 2,
            "psnr": skimage_metrics.peak_signal_noise_ratio(gt64, pred64, data_range=peak),
            "ssim": np.mean([skimage_metrics.structural_similarity(g, p, data_range=peak)
                             for g, p in zip(gt64, pred64)]),
        }
    scores = evaluate(tmp_path / "target", tmp_path / "pred")
    assert scores["volumes"] == 3
    for name, values in expected.items():
        for metric in METRICS:
            assert scores["per_volume"][name][metric] == pytest.approx(values[metric], rel=1e-9)
    for metric in METRICS:
        values = [v[metric] for v in expected.values()]
        assert scores["total"][metric]["mean"] == pytest.approx(np.mean(values), rel=1e-9)
        assert scores["total"][metric]["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    # --crop: both volumes centre cropped first
    cropped = evaluate(tmp_path / "target", tmp_path / "pred", crop=(20, 20))
    with h5py.File(tmp_path / "target" / "vol2.h5") as t, h5py.File(tmp_path / "pred" /
                                                                    "vol2.h5") as p:
        gt, pred = t["reconstruction"][:, 2:22, :], p["reconstruction"][:, 2:22, :]
    assert cropped["per_volume"]["vol2.h5"]["psnr"] == pytest.approx(
        skimage_metrics.peak_signal_noise_ratio(gt.astype(np.float64), pred.astype(np.float64),
                                                data_range=float(gt.max())), rel=1e-9)


def test_evaluate_errors_are_one_line_and_name_the_files(tmp_path, capsys):
    vol = np.ones((2, 8, 8), np.float32)
    _write_recon(tmp_path / "t" / "a.h5", vol, "reconstruction_esc")
    _write_recon(tmp_path / "t" / "b.h5", vol, "reconstruction_esc")
    _write_recon(tmp_path / "p" / "a.h5", vol)
    with pytest.raises(EvaluateError, match=r"no prediction for target\(s\) b.h5"):
        evaluate(tmp_path / "t", tmp_path / "p")
    _write_recon(tmp_path / "p" / "b.h5", np.ones((2, 8, 6), np.float32))
    with pytest.raises(EvaluateError, match=r"b.h5: reconstruction: expected the target's shape "
                                            r"\(2, 8, 8\).*found \(2, 8, 6\)"):
        evaluate(tmp_path / "t", tmp_path / "p")
    _write_recon(tmp_path / "p" / "c.h5", vol)
    assert evaluate_main(["--target", str(tmp_path / "t"), "--pred", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no target for prediction(s) c.h5" in err
    _write_recon(tmp_path / "t2" / "a.h5", vol, "image")
    with pytest.raises(EvaluateError, match=r"a.h5: expected a dataset reconstruction_esc or "
                                            r"reconstruction_rss or reconstruction, found keys "
                                            r"\['image'\]"):
        evaluate(tmp_path / "t2", tmp_path / "p" / "a.h5")


def test_predict_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert predict_main([str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
                        ) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected a run folder with config.yaml" in err
