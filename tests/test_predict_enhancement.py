"""kdhpc.predict and kdhpc.evaluate for an enhancement run: its predictions on a fastMRI-layout
folder written here, scored by kdhpc.evaluate, give the PSNR, SSIM and SNR that the run's own
evaluation reports for the same files (the test split's volumes, copied)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from kdhpc import distill
from kdhpc.config import load_config
from kdhpc.evaluate import evaluate
from kdhpc.metrics import volume_table
from kdhpc.evaluate import main as evaluate_main
from kdhpc.predict import PredictError, predict
from kdhpc.predict import main as predict_main
from kdhpc.recipe import Stages
from kdhpc.recipes import enhancement as E

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def enh_run(tmp_path_factory):
    """A finished tiny enhancement run (every slice of each test volume evaluated)."""
    base = tmp_path_factory.mktemp("enh_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDHPC_DATA", str(base / "data"))
        cfg = load_config(REPO / "configs" / "enh_tiny.yaml",
                          [f"run_dir={base / 'run'}", "data.slice_fraction=1.0"])
        results = distill.run(cfg, Stages(cfg.run_dir, log=lambda msg: None))
    root = Path(results["data"]["root"])
    return Path(cfg.run_dir), E.split_folder(cfg, root, cfg.data.test_split), cfg


def test_enhancement_predict_then_evaluate_equals_the_runs_own_evaluation(enh_run, tmp_path):
    run_dir, test_split, cfg = enh_run
    folder = tmp_path / "fastmri"
    folder.mkdir()
    for f in sorted(test_split.glob("*.h5")):
        shutil.copy(f, folder / f.name)
    out = tmp_path / "pred"
    # Default network: the KD student at loss.alpha (an enhancement run has no student_kd stage).
    assert predict_main([str(run_dir), "--data", str(folder), "--out", str(out)]) == 0
    files = sorted(folder.glob("*.h5"))
    assert files and sorted(p.name for p in out.glob("*.h5")) == [f.name for f in files]
    for f in files:
        with h5py.File(out / f.name, "r") as pred, h5py.File(f, "r") as target:
            assert list(pred.keys()) == ["reconstruction"]
            assert pred.attrs["kdhpc_metrics"] == "enhancement"
            rec = pred["reconstruction"][()]
            assert rec.shape == target["reconstruction_esc"].shape and rec.dtype == np.float32
    scores_file = tmp_path / "scores.json"
    assert evaluate_main(["--target", str(folder), "--pred", str(out), "--out",
                          str(scores_file)]) == 0
    scores = json.loads(scores_file.read_text())
    assert scores["metrics"] == "enhancement"
    # The run's own evaluation: per-slice rows of its evaluate stage for that student.
    rows = json.loads((run_dir / "evaluate" / "slices.json").read_text())
    model = E.model_names(E.alpha_grid(cfg))[cfg.loss.alpha]
    mine = [r for r in rows if r["task"] == cfg.degrade.task and r["model"] == model]
    volumes = {v["volume"]: v for v in volume_table(mine)}
    assert sorted(scores["per_volume"]) == sorted(volumes) == [f.name for f in files]
    for name, own in volumes.items():
        got = scores["per_volume"][name]
        snr = [v for r in mine if r["volume"] == name for k, v in r.items()
               if k.startswith("snr_")]
        assert snr and got["snr"] == pytest.approx(np.mean(snr), rel=1e-4)
        assert got["psnr"] == pytest.approx(own["psnr"], rel=1e-5)
        assert got["ssim"] == pytest.approx(own["ssim"], rel=1e-4, abs=1e-6)
    # Another network of the run, named: the no-KD student's predictions score as its own rows.
    out0 = tmp_path / "pred0"
    predict(run_dir, folder, out0, E.alpha_name(0.0))
    nokd = [r for r in rows if r["task"] == cfg.degrade.task and r["model"] ==
            E.model_names(E.alpha_grid(cfg))[0.0]]
    again = evaluate(folder, out0)
    for volume in volume_table(nokd):
        assert again["per_volume"][volume["volume"]]["psnr"] == pytest.approx(volume["psnr"],
                                                                              rel=1e-5)


def test_enhancement_predict_refuses_measured_kspace(enh_run, tmp_path):
    run_dir, test_split, _ = enh_run
    with pytest.raises(PredictError, match=r"--input kspace: an enhancement run makes its "
                                           r"inputs from the files' targets"):
        predict(run_dir, test_split, tmp_path / "out", input_kind="kspace")
    assert not (tmp_path / "out").exists()
