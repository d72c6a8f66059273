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
