"""KD-MRI HDF5: key names, round trips, fastMRI conversion with explicit re-centring, bad input."""

import os

import h5py
import numpy as np
import pytest

from kdhpc.config import MaskConfig
from kdhpc.data.fastmri import DataFormatError, write_fastmri
from kdhpc.data.kdmri import KDMRISliceDataset, acc_key, convert_fastmri, write_kdmri
from kdhpc.data.masks import make_mask


def centred_fft(x):
    """fastMRI's centred orthonormal FFT, in numpy."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"),
                           axes=(-2, -1))


def undersampled(volfs, mask):
    """(img_volus, kspace_volus) of an (H, W, S) volume, with numpy's unshifted FFT."""
    kspace = np.fft.fft2(volfs, axes=(0, 1), norm="ortho") * mask[None, :, None]
    return np.abs(np.fft.ifft2(kspace, axes=(0, 1), norm="ortho")), kspace


def kdmri_volume(rng, shape, mask):
    """(volfs, img_volus, kspace_volus), (H, W, S)."""
    volfs = rng.random(shape).astype(np.float32)
    return (volfs, *undersampled(volfs, mask))


def test_acc_key_uses_kdmri_spelling():
    assert [acc_key(a) for a in (4, 5.0, 8, 3.3, "4x", "5")] == ["4x", "5x", "8x", "3_3x",
                                                                  "4x", "5x"]
    with pytest.raises(ValueError, match="acceleration"):
        acc_key(0.5)


def test_round_trip_two_accelerations_and_acc_folder(tmp_path):
    rng = np.random.default_rng(0)
    mask4 = (rng.random(12) < 0.3).astype(np.float32)
    mask8 = (rng.random(12) < 0.15).astype(np.float32)
    volfs, img4, k4 = kdmri_volume(rng, (10, 12, 3), mask4)
    img8, k8 = undersampled(volfs, mask8)
    path = write_kdmri(tmp_path / "acc_4x" / "vol.h5", volfs, {4: (img4, k4), "8x": (img8, k8)})
    with h5py.File(path) as f:
        assert set(f.keys()) == {"volfs", "img_volus_4x", "kspace_volus_4x", "img_volus_8x",
                                 "kspace_volus_8x"}
    np.save(tmp_path / "mask4.npy", mask4)
    ds = KDMRISliceDataset(tmp_path, 4, mask=tmp_path / "mask4.npy")  # finds acc_4x/
    assert len(ds) == 3
    for s in range(3):
        item = ds[s]
        assert np.allclose(item["target"].numpy(), volfs[:, :, s])
        assert np.allclose(item["image"].numpy(), img4[:, :, s], atol=1e-6)
        assert np.allclose(item["kspace"].numpy(), k4[:, :, s], atol=1e-6)
        assert np.array_equal(item["mask"].numpy(), mask4)
    eight = KDMRISliceDataset(tmp_path / "acc_4x", "8x")[2]
    assert np.allclose(eight["kspace"].numpy(), k8[:, :, 2], atol=1e-6)
    assert "mask" not in eight


@pytest.mark.parametrize("challenge", ["singlecoil", "multicoil"])
def test_convert_from_fastmri_kspace_recentres_explicitly(tmp_path, challenge):
    rng = np.random.default_rng(1)
    images = rng.random((3, 16, 12)).astype(np.float32) + 0.1  # [S, H, W] real, positive
    if challenge == "multicoil":
        coils = rng.standard_normal((2, 16, 12)) + 1j * rng.standard_normal((2, 16, 12))
        coils /= np.sqrt((np.abs(coils) ** 2).sum(0, keepdims=True))  # sum |s_c|^2 = 1
        kspace = centred_fft(images[:, None] * coils[None])  # RSS of the coil images = images
    else:
        kspace = centred_fft(images)
    write_fastmri(tmp_path / "src" / "file1.h5", kspace.astype(np.complex64),
                  rng.random((3, 8, 8)))
    cfg = MaskConfig(kind="random", center_fraction=0.1, layout="centered", seed=5)
    written = convert_fastmri(tmp_path / "src", tmp_path / "dst", [4, 8], cfg,
                              challenge=challenge, from_kspace=True)
    assert written == [tmp_path / "dst" / "acc_4x" / "file1.h5",
                       tmp_path / "dst" / "acc_8x" / "file1.h5"]
    expected_fs = images / images.max()
    for acc in (4, 8):
        mask = np.load(tmp_path / "dst" / "us_masks" / f"mask_{acc}x.npy")
        centred_mask = make_mask(MaskConfig(kind="random", center_fraction=0.1,
                                            layout="centered", seed=5, acceleration=acc), 12)
        assert np.array_equal(mask, np.fft.ifftshift(centred_mask))
        with h5py.File(tmp_path / "dst" / f"acc_{acc}x" / "file1.h5") as f:
            volfs = f["volfs"][()]
            kus = f[f"kspace_volus_{acc}x"][()]
            ius = f[f"img_volus_{acc}x"][()]
        assert volfs.shape == (16, 12, 3)
        assert np.allclose(volfs, expected_fs.transpose(1, 2, 0), atol=1e-5)
        reference = np.fft.fft2(expected_fs, norm="ortho") * mask  # unshifted, [S, H, W]
        assert np.allclose(kus, reference.transpose(1, 2, 0), atol=1e-5)
        assert np.allclose(ius, np.abs(np.fft.ifft2(reference, norm="ortho")).transpose(1, 2, 0),
                           atol=1e-5)
    # Merely ifftshift-ing fastMRI's k-space is not the same thing (checkerboard phase).
    if challenge == "singlecoil":
        naive = np.fft.ifftshift(kspace / images.max(), axes=(-2, -1))
        assert not np.allclose(naive, np.fft.fft2(expected_fs, norm="ortho"), atol=1e-3)


def test_convert_from_targets_one_slice_per_file(tmp_path):
    rng = np.random.default_rng(2)
    targets = rng.random((2, 8, 10)).astype(np.float32)
    write_fastmri(tmp_path / "knee.h5", np.ones((2, 8, 10), np.complex64), targets)
    cfg = MaskConfig(kind="equispaced", center_fraction=0.2, layout="centered")
    written = convert_fastmri(tmp_path / "knee.h5", tmp_path / "dst", [4], cfg,
                              normalize=False, one_slice_per_file=True)
    assert [p.name for p in written] == ["knee_000.h5", "knee_001.h5"]
    ds = KDMRISliceDataset(tmp_path / "dst", 4)
    assert ds.volumes == [(str(p), 1) for p in written]
    assert np.allclose(ds[1]["target"].numpy(), targets[1])


def test_bad_input_is_refused_with_file_and_key(tmp_path):
    rng = np.random.default_rng(3)
    mask = np.ones(6, np.float32)
    volfs, image, kspace = kdmri_volume(rng, (4, 6, 2), mask)
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match=r"kspace_volus_4x: expected volfs's shape"):
        write_kdmri(out / "a.h5", volfs, {4: (image, kspace[:, :, :1])})
    with pytest.raises(DataFormatError, match=r"kspace_volus_4x: expected complex"):
        write_kdmri(out / "a.h5", volfs, {4: (image, image)})
    nan = volfs.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(DataFormatError, match=r"volfs: expected finite"):
        write_kdmri(out / "a.h5", nan, {4: (image, kspace)})
    assert not out.exists()

    good = write_kdmri(tmp_path / "good.h5", volfs, {4: (image, kspace)})
    with pytest.raises(DataFormatError, match=r"good.h5: missing key 'img_volus_5x'"):
        KDMRISliceDataset(good, 5)
    with pytest.raises(DataFormatError, match="mask width 7 differs"):
        KDMRISliceDataset(good, 4, mask=np.ones(7))
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["volfs"] = volfs[:, :, 0]
        f["img_volus_4x"] = image[:, :, 0]
        f["kspace_volus_4x"] = kspace[:, :, 0]
    with pytest.raises(DataFormatError, match=r"flat.h5: volfs: expected \(H, W, S\)"):
        KDMRISliceDataset(tmp_path / "flat.h5", 4)
    with h5py.File(good, "a") as f:
        f["kspace_volus_4x"][1, 1, 1] = np.inf
    with pytest.raises(DataFormatError, match=r"good.h5: kspace_volus_4x\[:, :, 1\]: expected "
                                              r"finite"):
        KDMRISliceDataset(good, 4)[1]
    data = good.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataFormatError, match="cut.h5: cannot open as HDF5"):
        KDMRISliceDataset(tmp_path / "cut.h5", 4)
    assert sorted(os.listdir(tmp_path)) == ["cut.h5", "flat.h5", "good.h5"]
