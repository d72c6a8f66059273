"""Masks: fastMRI semantics, KD-MRI line counts, layouts, sign-safe masking, seeds, config."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from kdhpc.config import MaskConfig
from kdhpc.data.masks import (apply_mask, equispaced_fraction_mask, equispaced_spacing,
                              file_seed, load_mask, make_mask, random_mask, to_layout,
                              train_seed, variable_density_mask)


def centre_columns(width: int, n_low: int) -> np.ndarray:
    """Centred-layout indices of the fastMRI centre block, written as ceil((W - n) / 2) + j."""
    start = math.ceil((width - n_low) / 2)
    return np.arange(start, start + n_low)


def unshifted_centre(n: int, n_center: int) -> np.ndarray:
    """Unshifted indices whose integer frequency lies in [-(k // 2), k - k // 2)."""
    freq = np.rint(np.fft.fftfreq(n) * n).astype(int)
    return np.flatnonzero((freq >= -(n_center // 2)) & (freq < n_center - n_center // 2))


@pytest.mark.parametrize("width,acc,cf", [(368, 4, 0.08), (368, 8, 0.04), (320, 5, 0.08),
                                          (371, 3.3, 0.1)])
def test_random_mask_centre_and_keep_probability(width, acc, cf):
    n_low = round(width * cf)
    rng = np.random.default_rng(1234)
    draws = np.stack([random_mask(width, acc, cf, rng) for _ in range(1500)])
    centre = centre_columns(width, n_low)
    assert (draws[:, centre] == 1).all()
    others = np.setdiff1d(np.arange(width), centre)
    kept = draws[:, others].mean()
    prob = (width / acc - n_low) / (width - n_low)
    n_samples = draws.shape[0] * others.size
    assert abs(kept - prob) < 6 * math.sqrt(prob * (1 - prob) / n_samples)
    lines_std = math.sqrt(others.size * prob * (1 - prob) / draws.shape[0])
    assert abs(draws.sum(1).mean() - width / acc) < 6 * lines_std
    assert set(np.unique(draws)) <= {0.0, 1.0}


@pytest.mark.parametrize("width,acc,cf", [(368, 4, 0.08), (368, 8, 0.04), (320, 5, 0.08),
                                          (640, 4, 0.08), (201, 8, 0.04)])
def test_equispaced_fraction_lines_and_total(width, acc, cf):
    n_low = round(width * cf)
    spacing = equispaced_spacing(width, acc, n_low)
    for offset in range(round(spacing)):
        expected = set(centre_columns(width, n_low).tolist())
        j = 0
        while offset + j * spacing < width - 1:
            expected.add(int(np.round(offset + j * spacing)))
            j += 1
        mask = equispaced_fraction_mask(width, acc, cf, rng=0, offset=offset)
        assert set(np.flatnonzero(mask).tolist()) == expected
        # Spacing chosen so that the total matches W / acc (up to the rounding of positions).
        assert abs(mask.sum() - width / acc) <= 2
    drawn = [equispaced_fraction_mask(width, acc, cf, rng=s) for s in range(20)]
    assert len({m.tobytes() for m in drawn}) > 1  # the random offset varies


def test_equispaced_rejects_centre_larger_than_budget():
    with pytest.raises(ValueError, match="center_fraction"):
        equispaced_fraction_mask(100, 8, 0.2, rng=0)


@pytest.mark.parametrize("n,n_center,counts", [(150, 10, {4: 37, 5: 30, 8: 18}),
                                               (240, 9, {4: 60, 5: 48, 8: 30})])
def test_variable_density_matches_kdmri_line_counts(n, n_center, counts):
    for acc, lines in counts.items():
        mask = variable_density_mask(n, acc, n_center / n, seed=42)
        assert mask.sum() == lines
        assert (mask[unshifted_centre(n, n_center)] == 1).all()
        assert np.array_equal(mask, variable_density_mask(n, acc, n_center / n, seed=42))
        assert not np.array_equal(mask, variable_density_mask(n, acc, n_center / n, seed=43))


def test_variable_density_prefers_low_frequencies():
    n, acc, n_center = 240, 4, 9
    mean = np.mean([variable_density_mask(n, acc, n_center / n, seed=s) for s in range(300)], 0)
    freq = np.abs(np.rint(np.fft.fftfreq(n) * n))
    near = mean[(freq > 6) & (freq <= 20)].mean()
    far = mean[freq > 90].mean()
    assert near > 2 * far > 0


def test_variable_density_rejects_centre_over_budget():
    with pytest.raises(ValueError, match="centre block"):
        variable_density_mask(100, 8, 0.2, seed=0)


@pytest.mark.parametrize("n", [10, 11])
def test_layouts_move_dc_and_round_trip(n):
    centred = np.zeros(n, np.float32)
    centred[n // 2] = 1  # DC of the centred layout
    unshifted = to_layout(centred, "centered", "unshifted")
    assert np.flatnonzero(unshifted).tolist() == [0]
    mask = (np.random.default_rng(n).random((n, n)) > 0.5).astype(np.float32)
    there = to_layout(mask, "centered", "unshifted")
    assert np.array_equal(to_layout(there, "unshifted", "centered"), mask)
    assert np.array_equal(to_layout(torch.from_numpy(mask), "centered", "unshifted").numpy(), there)
    with pytest.raises(ValueError, match="dst"):
        to_layout(mask, "centered", "shifted")


def test_apply_mask_writes_positive_zero_only():
    rng = np.random.default_rng(0)
    kspace = (rng.standard_normal((4, 6, 16)) + 1j * rng.standard_normal((4, 6, 16)))
    mask = random_mask(16, 4, 0.125, rng)
    naive = kspace * mask
    zeros = naive[:, :, mask == 0]
    # Without + 0.0 negative inputs leave -0.0 behind: the test can fail.
    assert np.signbit(zeros.real).any() and np.signbit(zeros.imag).any()
    for data in (kspace, torch.from_numpy(kspace.astype(np.complex64))):
        out = np.asarray(apply_mask(data, mask))
        dropped = out[:, :, mask == 0]
        assert (dropped == 0).all()
        assert not np.signbit(dropped.real).any() and not np.signbit(dropped.imag).any()
        assert np.array_equal(out[:, :, mask == 1], np.asarray(data)[:, :, mask == 1])


def test_make_mask_follows_config_kind_and_layout(tmp_path):
    width = 96
    base = MaskConfig(acceleration=4.0, center_fraction=0.08, seed=7)
    for layout in ("centered", "unshifted"):
        cfg = dataclasses.replace(base, layout=layout)
        random_cfg = dataclasses.replace(cfg, kind="random")
        assert np.array_equal(make_mask(random_cfg, width, seed=3),
                              to_layout(random_mask(width, 4.0, 0.08, 3), "centered", layout))
        equi = dataclasses.replace(cfg, kind="equispaced")
        assert np.array_equal(make_mask(equi, width, seed=5),
                              to_layout(equispaced_fraction_mask(width, 4.0, 0.08, 5),
                                        "centered", layout))
        kdmri = dataclasses.replace(cfg, kind="kdmri")
        assert np.array_equal(make_mask(kdmri, width),  # seed defaults to cfg.seed
                              to_layout(variable_density_mask(width, 4.0, 0.08, 7),
                                        "unshifted", layout))
    stored = variable_density_mask(width, 5.0, 0.08, seed=1)
    np.save(tmp_path / "mask.npy", stored)
    file_cfg = dataclasses.replace(base, kind="file", path=str(tmp_path / "mask.npy"))
    assert np.array_equal(make_mask(file_cfg, width), stored)
    with pytest.raises(ValueError, match="differs from the k-space width 64"):
        make_mask(file_cfg, 64)


def test_load_mask_rejects_bad_files(tmp_path):
    np.save(tmp_path / "half.npy", np.full(8, 0.5))
    np.save(tmp_path / "cube.npy", np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="half.npy: expected only zeros and ones"):
        load_mask(tmp_path / "half.npy")
    with pytest.raises(ValueError, match="cube.npy: expected a 1-D"):
        load_mask(tmp_path / "cube.npy")
    with pytest.raises(ValueError, match="absent.npy: mask file not found"):
        load_mask(tmp_path / "absent.npy")


def test_seeds_are_deterministic_and_distinct():
    assert file_seed("/data/val/file1.h5", 42) == file_seed("/elsewhere/file1.h5", 42)
    seeds = {file_seed(name, base) for name in ("file1.h5", "file2.h5") for base in (42, 43)}
    assert len(seeds) == 4
    keys = [(r, rank, w, e) for r in (0, 1) for rank in (0, 1) for w in (0, 1) for e in (0, 1)]
    train = [train_seed(*k) for k in keys]
    assert len(set(train)) == len(keys)
    assert train == [train_seed(*k) for k in keys]
    assert all(0 <= s < 2**63 for s in train + list(seeds))
    with pytest.raises(ValueError, match="rank"):
        train_seed(0, -1, 0, 0)
