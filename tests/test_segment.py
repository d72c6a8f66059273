"""``python -m kdhpc.segment``: labels of a NIfTI from a run folder, on the image's grid and with
its affine; bad images refused with the file and the shape. The run folder here is built from
a real (untrained) student and a real TorchScript export, without training."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from kdhpc import segment as S
from kdhpc.config import load_config, to_dict
from kdhpc.data.acdc import crop_or_pad
from kdhpc.export import export_segmenter
from kdhpc.models import build_model

REPO = Path(__file__).resolve().parent.parent
SIZE = 64


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """config.yaml, student_kd/best_model.pt and export/ of a randomly initialised student."""
    folder = tmp_path_factory.mktemp("segrun")
    cfg = load_config(REPO / "configs" / "seg_tiny.yaml", [f"run_dir={folder}"])
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(3)
    student = build_model(cfg.model.student)
    with torch.no_grad():  # nonzero BatchNorm statistics, so eval mode is not the identity
        for module in student.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    (folder / "student_kd").mkdir()
    torch.save(student.state_dict(), folder / "student_kd" / "best_model.pt")
    (folder / "export").mkdir()
    inputs = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    export_segmenter(student.eval(), inputs, folder / "export", 2, log=lambda msg: None)
    return folder, student.eval()


def write_image(path: Path, array: np.ndarray, zooms=(1.4, 1.3, 8.0)) -> nib.Nifti1Image:
    affine = np.diag([*zooms[:array.ndim], 1.0]) if array.ndim == 3 else np.diag(
        [zooms[0], zooms[1], 1.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    image = nib.Nifti1Image(array.astype(np.float32), affine)
    nib.save(image, path)
    return image


def expected_labels(student, volume: np.ndarray) -> np.ndarray:
    """Independent path: crop/pad each slice, z-score in float64, argmax, paste back."""
    height, width, n = volume.shape
    out = np.zeros((height, width, n), np.uint8)
    for s in range(n):
        x = crop_or_pad(volume[:, :, s], SIZE).astype(np.float64)
        x = ((x - x.mean()) / x.std()).astype(np.float32)
        with torch.no_grad():
            pred = student(torch.from_numpy(x)[None, None])[0].argmax(1)[0].numpy()
        top, left = (SIZE - height) // 2, (width - SIZE) // 2   # height < SIZE, width > SIZE
        out[:, left:left + SIZE, s] = pred[top:top + height, :]
    return out


def test_segment_writes_labels_on_the_image_grid_with_its_affine(run_dir, tmp_path, capsys):
    folder, student = run_dir
    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 50.0, (50, 80, 3))            # H < S (padded), W > S (cropped)
    image = write_image(tmp_path / "case_frame01.nii.gz", volume)
    assert S.main([str(tmp_path / "case_frame01.nii.gz"), "--model", str(folder)]) == 0
    out = nib.load(tmp_path / "case_frame01_seg.nii.gz")
    labels = np.asarray(out.dataobj)
    assert labels.dtype == np.uint8 and labels.shape == volume.shape
    np.testing.assert_allclose(out.affine, image.affine)
    assert out.header.get_zooms() == pytest.approx(image.header.get_zooms())
    want = expected_labels(student, volume.astype(np.float32))
    assert (labels == want).mean() > 0.999
    assert labels[:, :(80 - SIZE) // 2].max() == 0         # outside the window: background
    assert "TorchScript" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    eager_out = tmp_path / "eager.nii.gz"
    assert S.main([str(tmp_path / "case_frame01.nii.gz"), "--model", str(folder), "--eager",
                   "--out", str(eager_out)]) == 0
    assert (np.asarray(nib.load(eager_out).dataobj) == labels).mean() > 0.999


def test_segment_accepts_a_single_2d_slice(run_dir, tmp_path):
    folder, student = run_dir
    rng = np.random.default_rng(1)
    volume = rng.gamma(2.0, 50.0, (50, 80))
    image = nib.Nifti1Image(volume.astype(np.float32), np.diag([1.5, 1.5, 1.0, 1.0]))
    nib.save(image, tmp_path / "slice.nii")
    out = tmp_path / "slice_labels.nii.gz"
    assert S.main([str(tmp_path / "slice.nii"), "--model", str(folder), "--out", str(out)]) == 0
    labels = np.asarray(nib.load(out).dataobj)
    assert labels.shape == (50, 80)
    want = expected_labels(student, volume.astype(np.float32)[..., None])[..., 0]
    assert (labels == want).mean() > 0.999


@pytest.mark.parametrize("shape", [(40,), (20, 30, 4, 5)])
def test_segment_refuses_images_that_are_not_2d_or_3d(run_dir, tmp_path, capsys, shape):
    folder, _ = run_dir
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
    assert S.main([str(path), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and str(shape) in err and "2-D" in err and "3-D" in err
    assert not (tmp_path / "bad_seg.nii.gz").exists()


def test_segment_refuses_non_finite_images_and_missing_runs(run_dir, tmp_path, capsys):
    folder, _ = run_dir
    volume = np.ones((30, 30, 2), np.float32)
    volume[3, 4, 1] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    assert S.main([str(path), "--model", str(folder)]) == 2
    assert "1 NaN/Inf" in capsys.readouterr().err
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((30, 30, 2), np.float32), np.eye(4)), good)
    assert S.main([str(good), "--model", str(tmp_path / "nowhere")]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "good_seg.nii.gz").exists()


def test_fit_to_inverts_crop_or_pad_offsets():
    rng = np.random.default_rng(2)
    for height, width in ((50, 80), (64, 64), (71, 33), (90, 101)):
        x = rng.integers(1, 9, (height, width))
        window = crop_or_pad(x, SIZE)
        back = S.fit_to(window, height, width)
        # Pixels inside the window return to their place; the rest are zero.
        inside = back != 0
        assert np.array_equal(back[inside], x[inside])
        assert inside.sum() == min(height, SIZE) * min(width, SIZE)
        top, left = max(0, (height - SIZE) // 2), max(0, (width - SIZE) // 2)
        assert back[top, left] == x[top, left]


def _own_dice(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    p, g = pred == k, truth == k
    return 1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum())


def test_folder_mode_segments_every_image_and_scores_those_with_labels(run_dir, tmp_path,
                                                                       capsys):
    import json

    folder, student = run_dir
    rng = np.random.default_rng(5)
    data = tmp_path / "testing"
    volumes = {}
    for patient in ("patient101", "patient102"):
        (data / patient).mkdir(parents=True)
        volume = rng.gamma(2.0, 50.0, (50, 80, 2)).astype(np.float32)  # H < S, W > S
        write_image(data / patient / f"{patient}_frame01.nii.gz", volume)
        volumes[patient] = volume
    truth = np.zeros((50, 80, 2), np.uint8)
    truth[20:40, 25:45] = 3
    truth[25:30, 50:60] = 1
    write_image(data / "patient101" / "patient101_frame01_gt.nii.gz", truth)  # labels: scored
    out = tmp_path / "out"
    assert S.main([str(data), "--model", str(folder), "--out", str(out)]) == 0
    written = {}
    for patient, volume in volumes.items():
        written[patient] = np.asarray(nib.load(out / patient /
                                               f"{patient}_frame01_seg.nii.gz").dataobj)
        assert (written[patient] == expected_labels(student, volume)).mean() > 0.999
    labels = written["patient101"]
    report = json.loads((out / "dice.json").read_text())
    assert list(report["per_image"]) == ["patient101/patient101_frame01.nii.gz"]
    row = report["per_image"]["patient101/patient101_frame01.nii.gz"]
    for k, name in ((1, "RV"), (2, "myocardium"), (3, "LV")):
        assert row[name] == pytest.approx(_own_dice(labels, truth, k))
    assert report["mean"]["mean"] == pytest.approx(np.mean([row["RV"], row["myocardium"],
                                                             row["LV"]]))
    assert "mean Dice over 1 labelled images" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert S.main([str(empty), "--model", str(folder)]) == 2
    assert "expected NIfTI images" in capsys.readouterr().err


def test_run_trained_with_spacing_predicts_through_the_same_resampling(run_dir, tmp_path):
    """A run with data.spacing: the image (another spacing) is resampled in-plane to the run's,
    segmented, and the labels resampled back (nearest) onto the image's grid and affine; here
    by hand with kdhpc.data.acdc's functions and this file's own preprocessing."""
    from kdhpc.data.acdc import resample_inplane, restore_inplane

    folder, student = run_dir
    spaced = tmp_path / "spaced_run"
    (spaced / "student_kd").mkdir(parents=True)
    shutil.copy(folder / "student_kd" / "best_model.pt", spaced / "student_kd")
    cfg = load_config(folder / "config.yaml", ["data.spacing=[1.5,1.5]"])
    (spaced / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    rng = np.random.default_rng(5)
    volume = rng.gamma(2.0, 50.0, (60, 90, 2)).astype(np.float32)
    zooms = (1.25, 1.2, 8.0)  # resampled to 1.5 mm: 50 x 72 (padded in H, cropped in W)
    write_image(tmp_path / "fine.nii.gz", volume, zooms)
    image = nib.load(tmp_path / "fine.nii.gz")  # as stored: float32 affine and zooms
    zooms = image.header.get_zooms()
    out = tmp_path / "fine_seg.nii.gz"
    assert S.main([str(tmp_path / "fine.nii.gz"), "--model", str(spaced), "--out", str(out)]) == 0
    written = nib.load(out)
    labels = np.asarray(written.dataobj)
    assert labels.shape == volume.shape and np.array_equal(written.affine, image.affine)
    resampled = resample_inplane(volume, zooms[:2], (1.5, 1.5))
    assert resampled.shape == (50, 72, 2)
    by_hand = restore_inplane(expected_labels(student, resampled), volume.shape,
                              zooms[:2], (1.5, 1.5), label=True)
    assert (labels == by_hand).mean() > 0.999 and len(np.unique(by_hand)) > 1
    # Without the run's spacing the image is segmented on its own grid: another answer.
    unresampled = tmp_path / "plain_seg.nii.gz"
    assert S.main([str(tmp_path / "fine.nii.gz"), "--model", str(folder), "--eager",
                   "--out", str(unresampled)]) == 0
    assert not np.array_equal(np.asarray(nib.load(unresampled).dataobj), labels)
