"""kdhpc.data.views: views over fastMRI and KD-MRI slices for the undersample, denoise and superres
tasks, checked against independent numpy computations on real (tiny default) files."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from kdhpc.config import DefaultDataConfig, DegradeConfig, MaskConfig
from kdhpc.data import default
from kdhpc.data.fastmri import DataFormatError, FastMRISliceDataset, write_fastmri
from kdhpc.data.kdmri import KDMRISliceDataset, write_kdmri
from kdhpc.data.masks import file_seed, seed_from, variable_density_mask
from kdhpc.data.views import SliceViews, center_crop
from kdhpc.ops import data_consistency
from kdhpc.train import check_view_dataset

TINY = DefaultDataConfig(seed=3, brain_subjects=3, brain_slices=3, brain_size=40, brain_coils=2)
KDMRI_MASK = MaskConfig(kind="kdmri", acceleration=4.0, center_fraction=0.1, seed=5)
RECON = DegradeConfig(task="undersample", dihedral=False, views_per_sample=1)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    root = default.ensure_default(TINY, "brain", tmp_path_factory.mktemp("data"))
    return FastMRISliceDataset(root / "singlecoil_train")


def stored(dataset, index):
    """(target slice, volume max attr) read straight from the h5 file."""
    volume, s = dataset._index[index]
    with h5py.File(dataset.volumes[volume][0], "r") as f:
        return f["reconstruction_esc"][s].astype(np.float64), float(f.attrs["max"])


def test_undersampled_view_is_the_unshifted_fft_of_the_normalised_target(brain):
    views = SliceViews(brain, RECON, mask=KDMRI_MASK, centered=False)
    check_view_dataset(views, "views")
    assert views.num_views == 1 and len(views) == len(brain)
    mask = variable_density_mask(TINY.brain_size, 4.0, 0.1, seed=5)  # unshifted, DC at 0
    assert mask[0] == 1 and mask.sum() == TINY.brain_size // 4
    for index in (0, len(views) - 1):
        item = views.get_view(index, 0)
        target, peak = stored(brain, index)
        np.testing.assert_allclose(item["target"][0].numpy(), target / peak, rtol=1e-6)
        assert float(item["volume_max"]) == pytest.approx(peak) and float(item["scale"]) == \
            pytest.approx(peak)
        kspace = np.fft.fft2(target / peak, norm="ortho") * mask[None, :]
        np.testing.assert_allclose(item["kspace"][0].numpy(), kspace, atol=1e-6)
        assert not np.signbit(item["kspace"].real.numpy()[..., mask == 0]).any()  # +0.0 only
        zero_filled = np.fft.ifft2(kspace, norm="ortho")
        np.testing.assert_allclose(item["input"][0].numpy(), zero_filled.real, atol=1e-6)
        np.testing.assert_array_equal(item["mask"].numpy(), mask.reshape(1, 1, -1))
        assert item["volume"] == brain._index[index][0] == views.volume_of(index)


def test_batches_broadcast_into_data_consistency(brain):
    """A batch's mask [B, 1, 1, W] broadcasts against [B, 1, H, W]: DC of the target itself
    gives the target back (its own k-space already holds every measured line)."""
    views = SliceViews(brain, RECON, mask=KDMRI_MASK)
    batch = default_collate([views.get_view(i, 0) for i in range(3)])
    assert batch["mask"].shape == (3, 1, 1, TINY.brain_size)
    out = data_consistency(batch["target"], batch["kspace"], batch["mask"], centered=False,
                           output="real")
    torch.testing.assert_close(out, batch["target"], atol=1e-5, rtol=0)
    # And DC of zeros is the real zero-filled image, the network input.
    out = data_consistency(torch.zeros_like(batch["target"]), batch["kspace"], batch["mask"],
                           centered=False, output="real")
    torch.testing.assert_close(out, batch["input"], atol=1e-5, rtol=0)


def test_centered_layout_and_crop(brain):
    cfg = MaskConfig(kind="kdmri", acceleration=4.0, center_fraction=0.1, seed=5)
    views = SliceViews(brain, RECON, mask=cfg, centered=True, crop=(32, 30), normalize="slice")
    item = views.get_view(1, 0)
    target, _ = stored(brain, 1)
    crop = center_crop(torch.from_numpy(target), (32, 30)).numpy()
    assert crop.shape == (32, 30)
    np.testing.assert_allclose(item["target"][0].numpy(), crop / target.max(), rtol=1e-6)
    mask = np.fft.fftshift(variable_density_mask(30, 4.0, 0.1, seed=5))  # centred layout
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(crop / target.max()), norm="ortho"))
    np.testing.assert_allclose(item["kspace"][0].numpy(), kspace * mask, atol=1e-6)


def test_denoise_views_are_dihedral_and_seeded_by_their_key(brain):
    cfg = DegradeConfig(task="denoise", dihedral=True, views_per_sample=4, nsa_factor=4.0,
                        noise_sigma=0.05)
    views = SliceViews(brain, cfg, input_kind="magnitude", base_seed=9)
    target, peak = stored(brain, 2)
    fname = brain.volumes[brain._index[2][0]][0]
    noises = []
    for view in range(4):
        item = views.get_view(2, view)
        key = views.view_key(2, view)
        assert key.dihedral == view and list(item["view_key"]) == list(key)
        assert key.noise_seed == seed_from("noise", f"{fname.rsplit('/', 1)[-1]}:"
                                           f"{brain._index[2][1]}", view, 9)
        expected = np.rot90(target / peak, view, axes=(-2, -1))
        np.testing.assert_allclose(item["target"][0].numpy(), expected, rtol=1e-6)
        residual = item["kspace"][0].numpy() - np.fft.fft2(expected, norm="ortho")
        # E|n|^2 = (sigma * max|x|)^2 * r with sigma 0.05 and r = 4 (no jitter): std 0.1 * max.
        assert np.sqrt(np.mean(np.abs(residual) ** 2)) == pytest.approx(0.1 * expected.max(),
                                                                        rel=0.1)
        np.testing.assert_allclose(item["input"][0].numpy(),
                                   np.abs(np.fft.ifft2(item["kspace"][0].numpy(), norm="ortho")),
                                   atol=1e-6)
        noises.append(residual)
        again = views.get_view(2, view)  # the same key gives the same view, bit for bit
        assert torch.equal(again["kspace"], item["kspace"])
    assert not np.allclose(noises[0], np.rot90(noises[1], -1))


def test_superres_keeps_the_central_block(brain):
    cfg = DegradeConfig(task="superres", sr_scale=4.0, sr_mode="central_block", dihedral=False,
                        views_per_sample=1)
    views = SliceViews(brain, cfg, input_kind="magnitude", centered=True)
    item = views.get_view(0, 0)
    target, peak = stored(brain, 0)
    n = TINY.brain_size
    keep = round(n / 4)
    start = (n - keep + 1) // 2
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(target / peak), norm="ortho"))
    block = np.zeros_like(k)
    block[start:start + keep, start:start + keep] = k[start:start + keep, start:start + keep]
    np.testing.assert_allclose(item["kspace"][0].numpy(), block, atol=1e-6)
    lowres = np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(block), norm="ortho")))
    np.testing.assert_allclose(item["input"][0].numpy(), lowres, atol=1e-6)
    assert "mask" not in item


def test_random_masks_are_drawn_per_view(brain):
    cfg = MaskConfig(kind="random", acceleration=4.0, center_fraction=0.1, layout="centered")
    views = SliceViews(brain, dataclasses.replace(RECON, views_per_sample=3), mask=cfg,
                       centered=True)
    masks = [views.get_view(0, v)["mask"] for v in range(3)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert torch.equal(views.get_view(0, 1)["mask"], masks[1])
    other = views.get_view(1, 0)["mask"]
    assert not torch.equal(other, masks[0])  # another slice, another mask
    assert file_seed("a.h5", 1) != views.view_key(0, 0).mask_seed


def test_kdmri_volumes_without_a_max_attribute(tmp_path):
    rng = np.random.default_rng(0)
    volfs = rng.uniform(0, 3, size=(16, 12, 4)).astype(np.float32)  # H, W, S
    zeros = np.zeros_like(volfs)
    write_kdmri(tmp_path / "acc_4x" / "vol.h5", volfs, {4: (zeros, zeros.astype(np.complex64))})
    slices = KDMRISliceDataset(tmp_path, 4, slice_fraction=0.5)  # central slices 1 and 2
    views = SliceViews(slices, RECON, mask=dataclasses.replace(KDMRI_MASK, center_fraction=0.2))
    item = views.get_view(0, 0)
    peak = float(volfs[:, :, 1:3].max())
    assert float(item["volume_max"]) == pytest.approx(peak)
    np.testing.assert_allclose(item["target"][0].numpy(), volfs[:, :, 1] / peak, rtol=1e-6)


def test_two_dimensional_mask_files(brain, tmp_path):
    """KD-MRI ships [H, W] masks (unshifted): used as they are, and their shape is checked."""
    n = TINY.brain_size
    mask = (np.random.default_rng(1).uniform(size=(n, n)) < 0.3).astype(np.float32)
    mask[0, 0] = 1.0
    np.save(tmp_path / "mask_4x.npy", mask)
    cfg = MaskConfig(kind="file", path=str(tmp_path / "mask_4x.npy"), layout="unshifted")
    item = SliceViews(brain, RECON, mask=cfg).get_view(1, 0)
    target, peak = stored(brain, 1)
    np.testing.assert_array_equal(item["mask"].numpy(), mask[None])
    np.testing.assert_allclose(item["kspace"][0].numpy(),
                               np.fft.fft2(target / peak, norm="ortho") * mask, atol=1e-6)
    with pytest.raises(ValueError, match=r"image shape \(30, 40\)"):
        SliceViews(brain, RECON, mask=cfg, crop=(30, 40)).get_view(1, 0)
    with pytest.raises(ValueError, match="mask width 40 differs from the k-space width 30"):
        SliceViews(brain, RECON, mask=cfg, crop=(40, 30)).get_view(1, 0)


def test_bad_input_is_named(brain, tmp_path):
    with pytest.raises(ValueError, match="expected a mask config"):
        SliceViews(brain, RECON)
    with pytest.raises(ValueError, match="normalize"):
        SliceViews(brain, RECON, mask=KDMRI_MASK, normalize="max")
    with pytest.raises(ValueError, match="views_per_sample"):
        SliceViews(brain, RECON, mask=KDMRI_MASK).view_key(0, 1)
    kspace = np.ones((2, 8, 8), np.complex64)
    write_fastmri(tmp_path / "test.h5", kspace, None, mask=np.ones(8, np.float32),
                  acceleration=4.0)
    views = SliceViews(FastMRISliceDataset(tmp_path), RECON, mask=KDMRI_MASK)
    with pytest.raises(DataFormatError, match="test.h5.*no target"):
        views.get_view(0, 0)
