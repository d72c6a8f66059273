"""ACDC NIfTI: writer/reader round trip, crop or pad, frame selection, bad input."""

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from kdhpc.data.acdc import ACDCSliceDataset, crop_or_pad, read_info, write_acdc_patient
from kdhpc.data.fastmri import DataFormatError


def frame(rng, shape):
    image = (rng.random(shape) * 300).astype(np.float32)
    label = rng.integers(0, 4, shape).astype(np.uint8)
    return image, label


def write_patient(root, rng, patient=1, shape=(24, 20, 3)):
    frames = {1: frame(rng, shape), 4: frame(rng, shape), 2: (frame(rng, shape)[0], None)}
    path = write_acdc_patient(root, patient, frames, {"ED": 1, "ES": 4, "Group": "DCM",
                                                      "Height": 170.0, "Weight": 70.5},
                              spacing=(1.25, 1.5, 8.0))
    return path, frames


def test_round_trip_files_info_and_slices(tmp_path):
    rng = np.random.default_rng(0)
    path, frames = write_patient(tmp_path, rng, patient=12)
    assert path == tmp_path / "patient012"
    assert sorted(os.listdir(path)) == ["Info.cfg", "patient012_frame01.nii.gz",
                                        "patient012_frame01_gt.nii.gz",
                                        "patient012_frame02.nii.gz",
                                        "patient012_frame04.nii.gz",
                                        "patient012_frame04_gt.nii.gz"]
    assert (path / "Info.cfg").read_text().splitlines() == [
        "ED: 1", "ES: 4", "Group: DCM", "Height: 170.0", "NbFrame: 4", "Weight: 70.5"]
    assert read_info(path / "Info.cfg") == {"ED": 1, "ES": 4, "Group": "DCM", "Height": 170.0,
                                            "NbFrame": 4, "Weight": 70.5}
    stored = nib.load(path / "patient012_frame04_gt.nii.gz")
    assert np.array_equal(np.asarray(stored.dataobj), frames[4][1])
    assert np.allclose(stored.header.get_zooms(), (1.25, 1.5, 8.0))

    ds = ACDCSliceDataset(tmp_path, size=24, normalize=False)
    assert ds.volumes == [("patient012_frame01", 3), ("patient012_frame04", 3)]
    for i in range(len(ds)):
        item = ds[i]
        image, label = frames[1 if i < 3 else 4]
        padded_image = np.zeros((24, 24), np.float32)
        padded_image[:, 2:22] = image[:, :, item["slice"]]
        padded_label = np.zeros((24, 24), np.int64)
        padded_label[:, 2:22] = label[:, :, item["slice"]]
        assert np.array_equal(item["image"].numpy(), padded_image[None])
        assert np.array_equal(item["label"].numpy(), padded_label)
        assert item["label"].dtype == torch.int64
        assert item["phase"] == ("ED" if i < 3 else "ES")
        assert np.allclose(item["affine"], np.diag([1.25, 1.5, 8.0, 1.0]))


def test_crop_or_pad_centres_against_explicit_indices():
    rng = np.random.default_rng(1)
    x = rng.random((2, 9, 4))
    out = crop_or_pad(x, 6)
    for i in range(6):
        for j in range(6):
            src_i = i + (9 - 6) // 2  # crop keeps [(n - size) // 2, ...)
            src_j = j - (6 - 4) // 2  # pad puts data at [(size - n) // 2, ...)
            want = x[:, src_i, src_j] if 0 <= src_j < 4 else 0.0
            assert np.array_equal(out[:, i, j], want * np.ones(2))


def test_normalised_crop_to_192_and_frame_choices(tmp_path):
    rng = np.random.default_rng(2)
    _, frames = write_patient(tmp_path, rng, patient=3, shape=(200, 150, 2))
    ds = ACDCSliceDataset(tmp_path, size=192, frames="ES")
    assert ds.volumes == [("patient003_frame04", 2)]
    item = ds[1]
    raw = frames[4][0][:, :, 1].astype(np.float64)
    expected = crop_or_pad((raw - raw.mean()) / raw.std(), 192)
    assert item["image"].shape == (1, 192, 192)
    assert np.allclose(item["image"].numpy()[0], expected, atol=1e-5)
    assert np.array_equal(item["label"].numpy(), crop_or_pad(frames[4][1][:, :, 1], 192))
    assert [v for v, _ in ACDCSliceDataset(tmp_path, frames="ED").volumes] == [
        "patient003_frame01"]
    assert [v for v, _ in ACDCSliceDataset(tmp_path, frames="all").volumes] == [
        "patient003_frame01", "patient003_frame04"]
    with pytest.raises(ValueError, match="frames"):
        ACDCSliceDataset(tmp_path, frames="mid")


def test_label_shape_mismatch_names_both_files(tmp_path):
    rng = np.random.default_rng(3)
    path, _ = write_patient(tmp_path, rng, patient=5)
    label_file = path / "patient005_frame04_gt.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 19, 3), np.uint8), np.eye(4)), label_file)
    with pytest.raises(DataFormatError, match=r"patient005_frame04_gt.nii.gz: label shape "
                                              r"\(24, 19, 3\) differs from its image .*"
                                              r"patient005_frame04.nii.gz shape \(24, 20, 3\)"):
        ACDCSliceDataset(tmp_path)


def test_bad_files_are_refused(tmp_path):
    rng = np.random.default_rng(4)
    path, frames = write_patient(tmp_path / "a", rng, patient=6)
    (path / "patient006_frame01_gt.nii.gz").unlink()
    with pytest.raises(DataFormatError, match="patient006_frame01_gt.nii.gz: file not found"):
        ACDCSliceDataset(tmp_path / "a")

    path, _ = write_patient(tmp_path / "b", rng, patient=7)
    (path / "Info.cfg").write_text("ES: 4\n")
    with pytest.raises(DataFormatError, match="Info.cfg: missing key 'ED'"):
        ACDCSliceDataset(tmp_path / "b")

    path, _ = write_patient(tmp_path / "c", rng, patient=8, shape=(64, 64, 8))
    image_file = path / "patient008_frame04.nii.gz"
    data = image_file.read_bytes()
    image_file.write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    ds = ACDCSliceDataset(tmp_path / "c")
    with pytest.raises(DataFormatError, match="patient008_frame04.nii.gz: cannot read slice 7"):
        ds[len(ds) - 1]

    image, label = frame(rng, (8, 8, 2))
    bad_label_frames = {1: (image, label + 3), 2: frame(rng, (8, 8, 2))}
    with pytest.raises(DataFormatError, match=r"frame 1 label: expected labels in \[0, 1, 2, 3\]"):
        write_acdc_patient(tmp_path / "d", 9, bad_label_frames, {"ED": 1, "ES": 2})
    nan_image = frame(rng, (8, 8, 2))
    nan_image[0][0, 0, 0] = np.nan
    with pytest.raises(DataFormatError, match="frame 2 image: expected finite values"):
        write_acdc_patient(tmp_path / "d", 9, {1: frame(rng, (8, 8, 2)), 2: nan_image},
                           {"ED": 1, "ES": 2})
    with pytest.raises(DataFormatError, match="frame 2 label: expected the image's shape"):
        write_acdc_patient(tmp_path / "d", 9, {1: frame(rng, (8, 8, 2)),
                                               2: (frames[1][0], frames[1][1][:, :, :2])},
                           {"ED": 1, "ES": 2})
    with pytest.raises(DataFormatError, match=r"info\['ES'\] = 3: expected one of the frames"):
        write_acdc_patient(tmp_path / "d", 9, {1: frame(rng, (8, 8, 2))}, {"ED": 1, "ES": 3})
    assert not (tmp_path / "d").exists() or os.listdir(tmp_path / "d") == []


def test_rewrite_replaces_the_patient_folder_whole(tmp_path):
    rng = np.random.default_rng(5)
    write_patient(tmp_path, rng, patient=2)
    new = {1: frame(rng, (10, 10, 1)), 3: frame(rng, (10, 10, 1))}
    path = write_acdc_patient(tmp_path, 2, new, {"ED": 1, "ES": 3})
    assert sorted(os.listdir(tmp_path)) == ["patient002"]
    assert sorted(os.listdir(path)) == ["Info.cfg", "patient002_frame01.nii.gz",
                                        "patient002_frame01_gt.nii.gz",
                                        "patient002_frame03.nii.gz",
                                        "patient002_frame03_gt.nii.gz"]
    item = ACDCSliceDataset(tmp_path, size=10, normalize=False)[1]
    assert np.array_equal(item["image"].numpy()[0], new[3][0][:, :, 0])


# ---------------------------------------------------------------- ACDC as downloaded

from kdhpc.data.acdc import (download_split, is_acdc_download, resample_inplane,  # noqa: E402
                             resampled_affine, restore_inplane, voxel_spacing, write_like)


def write_download(root, rng, shape=(20, 16, 2)):
    """An unpacked ACDC download: training/ with 5 patients (patient004 a symlink to a folder
    elsewhere, as when data live on another disk) and testing/ with 2."""
    for number in (1, 2, 3, 5):
        write_patient(root / "training", rng, patient=number, shape=shape)
    elsewhere, _ = write_patient(root / "elsewhere", rng, patient=4, shape=shape)
    (root / "training" / "patient004").symlink_to(elsewhere, target_is_directory=True)
    for number in (101, 102):
        write_patient(root / "testing", rng, patient=number, shape=shape)


def test_download_split_is_seeded_patient_level_and_follows_symlinks(tmp_path):
    rng = np.random.default_rng(5)
    write_download(tmp_path, rng)
    assert is_acdc_download(tmp_path) and not is_acdc_download(tmp_path / "training")
    names = lambda folders: [p.name for p in folders]  # noqa: E731
    train, val = (download_split(tmp_path, s, 0.4, seed=7) for s in ("train", "val"))
    assert len(val) == 2 and len(train) == 3  # round(5 * 0.4) patients for validation
    assert sorted(names(train) + names(val)) == [f"patient00{i}" for i in range(1, 6)]
    assert names(download_split(tmp_path, "test")) == ["patient101", "patient102"]
    # Seeded: the same split again, and every patient lands in val for some seed.
    assert names(download_split(tmp_path, "val", 0.4, seed=7)) == names(val)
    seen = {n for seed in range(20) for n in names(download_split(tmp_path, "val", 0.4, seed))}
    assert seen == {f"patient00{i}" for i in range(1, 6)}
    # The dataset reads the split's patients, the symlinked one included, both frames each.
    everyone = ACDCSliceDataset(download_split(tmp_path, "train", 0.2, seed=1)
                                + download_split(tmp_path, "val", 0.2, seed=1), size=16)
    assert sorted(v for v, _ in everyone.volumes) == sorted(
        f"patient00{i}_frame0{f}" for i in range(1, 6) for f in (1, 4))
    # Searching the training folder itself also follows the symlink.
    assert len(ACDCSliceDataset(tmp_path / "training", size=16).volumes) == 10
    with pytest.raises(DataFormatError, match="expected the ACDC download with folders "
                                              "training/ and testing/"):
        download_split(tmp_path / "training", "train")
    with pytest.raises(ValueError, match=r"val_fraction: expected a value in \(0, 1\)"):
        download_split(tmp_path, "val", 1.0)


def test_resampling_matches_torch_bilinear_and_nearest_by_hand():
    rng = np.random.default_rng(6)
    image = rng.random((20, 15, 2)).astype(np.float32)
    spacing, target = (1.5, 1.0), (1.25, 1.25)  # 20 -> 24 rows, 15 -> 12 columns
    out = resample_inplane(image, spacing, target)
    assert out.shape == (24, 12, 2) and out.dtype == np.float32
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].double(),
        scale_factor=(1.5 / 1.25, 1.0 / 1.25), mode="bilinear", align_corners=False,
        recompute_scale_factor=False)[0].permute(1, 2, 0).numpy()
    assert ref.shape == out.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    labels = rng.integers(0, 4, (20, 15)).astype(np.uint8)
    nearest = resample_inplane(labels, spacing, target, label=True)
    rows = np.clip(np.floor((np.arange(24) + 0.5) * 1.25 / 1.5 - 0.5 + 0.5), 0, 19).astype(int)
    cols = np.clip(np.floor((np.arange(12) + 0.5) * 1.25 / 1.0 - 0.5 + 0.5), 0, 14).astype(int)
    assert nearest.dtype == np.uint8
    assert np.array_equal(nearest, labels[np.ix_(rows, cols)])
    assert resample_inplane(image, (1.25, 1.25), target) is image  # equal spacing: unchanged


def test_resampled_affine_agrees_with_nibabel_resampling():
    processing = pytest.importorskip("nibabel.processing")
    rng = np.random.default_rng(7)
    image = rng.random((20, 15, 3)).astype(np.float32)
    affine = np.array([[0.0, -1.0, 0, 10], [1.5, 0.0, 0, -4], [0, 0, 8.0, 2], [0, 0, 0, 1]])
    spacing = voxel_spacing(affine)
    assert np.allclose(spacing, (1.5, 1.0))
    target = (1.25, 1.25)
    ours = resample_inplane(image, spacing, target)
    new_affine = resampled_affine(affine, spacing, target)
    theirs = processing.resample_from_to(nib.Nifti1Image(image, affine),
                                         (ours.shape, new_affine), order=1).get_fdata()
    assert np.allclose(voxel_spacing(new_affine), target)
    # Interior (away from the edge handling, which differs: replicate vs constant).
    np.testing.assert_allclose(ours[2:-2, 2:-2], theirs[2:-2, 2:-2], rtol=1e-5, atol=1e-6)


def test_predictions_return_to_the_original_geometry(tmp_path):
    rng = np.random.default_rng(8)
    path, frames = write_patient(tmp_path, rng, patient=9, shape=(20, 16, 2))
    image_file = path / "patient009_frame01.nii.gz"
    original = nib.load(image_file)
    labels = frames[1][1]
    spacing = voxel_spacing(original.affine)  # (1.25, 1.5)
    # Resample to half the spacing (x2 per axis): nearest there and back is exact.
    target = tuple(spacing / 2)
    fine = resample_inplane(labels, spacing, target, label=True)
    assert fine.shape == (40, 32, 2)
    back = restore_inplane(fine, labels.shape, spacing, target)
    assert np.array_equal(back, labels)
    # A prediction on a coarser grid also comes back on the input's grid and affine.
    coarse_target = (1.6, 1.6)
    coarse = resample_inplane(labels, spacing, coarse_target, label=True)
    restored = restore_inplane(coarse, labels.shape, spacing, coarse_target)
    out = write_like(restored, image_file, tmp_path / "pred.nii.gz")
    saved = nib.load(out)
    assert saved.shape == original.shape
    assert np.allclose(saved.affine, original.affine)
    assert np.allclose(saved.header.get_zooms(), original.header.get_zooms())
    assert np.array_equal(np.asarray(saved.dataobj), restored)
    assert (np.asarray(saved.dataobj) == labels).mean() > 0.5  # mostly the same labels
    with pytest.raises(ValueError, match=r"expected a resampled grid of \(16, 15\)"):
        restore_inplane(fine, labels.shape, spacing, coarse_target)
    with pytest.raises(DataFormatError, match=r"expected the shape of .* \(20, 16, 2\), found "
                                              r"\(40, 32, 2\)"):
        write_like(fine, image_file, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()


def test_dataset_resamples_slices_to_the_target_spacing(tmp_path):
    rng = np.random.default_rng(9)
    _, frames = write_patient(tmp_path, rng, patient=2, shape=(20, 16, 2))
    ds = ACDCSliceDataset(tmp_path, size=24, normalize=False, frames="ED", spacing=(1.0, 1.0))
    item = ds[1]
    raw = frames[1][0][:, :, 1]
    ref = torch.nn.functional.interpolate(torch.from_numpy(raw)[None, None].double(),
                                          scale_factor=(1.25, 1.5), mode="bilinear",
                                          align_corners=False, recompute_scale_factor=False)
    expected = crop_or_pad(ref[0, 0].numpy(), 24)  # 25 x 24 -> centre 24 x 24
    np.testing.assert_allclose(item["image"][0].numpy(), expected, rtol=1e-5, atol=1e-4)
    assert np.allclose(item["spacing"], (1.25, 1.5))
