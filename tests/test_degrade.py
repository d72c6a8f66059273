"""Degradations: FFT conventions, undersampling, NSA noise, truncation, dihedral views."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from kdhpc.config import DegradeConfig
from kdhpc.data.degrade import (ViewKey, dihedral, dihedral_inverse, fft2, ifft2, make_view,
                                nsa_noise, random_noise_sigma, truncate, undersample, view_key)
from kdhpc.data.masks import random_mask


def numpy_fft2(x: np.ndarray, centered: bool) -> np.ndarray:
    if centered:
        return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"),
                               axes=(-2, -1))
    return np.fft.fft2(x, norm="ortho")


def numpy_ifft2(k: np.ndarray, centered: bool) -> np.ndarray:
    if centered:
        return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"),
                               axes=(-2, -1))
    return np.fft.ifft2(k, norm="ortho")


def random_complex(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.complex128, generator=g)


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("shape", [(2, 8, 6), (7, 5)])
def test_fft_conventions_match_numpy(centered, shape):
    x = random_complex(shape, seed=len(shape))
    k = fft2(x, centered)
    assert np.allclose(k.numpy(), numpy_fft2(x.numpy(), centered), atol=1e-12)
    assert torch.allclose(ifft2(k, centered), x, atol=1e-12)


@pytest.mark.parametrize("centered", [True, False])
def test_undersample_matches_numpy_and_keeps_positive_zero(centered):
    kspace = random_complex((3, 10, 16), seed=1)
    mask = random_mask(16, 4, 0.125, rng=2)
    if not centered:
        mask = np.fft.ifftshift(mask)
    masked, image = undersample(kspace, mask, centered)
    expected = kspace.numpy() * mask
    assert np.array_equal(masked.numpy(), expected + 0.0)
    assert np.allclose(image.numpy(), numpy_ifft2(expected, centered), atol=1e-12)
    dropped = masked[..., mask == 0]
    assert not torch.signbit(dropped.real).any() and not torch.signbit(dropped.imag).any()


def test_nsa_noise_std_scales_with_sqrt_r():
    sigma = 0.3
    clean = random_complex((256, 256), seed=3).to(torch.complex64)
    n = clean.numel()
    measured = {}
    for r in (1.0, 2.0, 4.0, 8.0):
        g = torch.Generator().manual_seed(int(r))
        noise = (nsa_noise(clean, r, sigma, g) - clean).to(torch.complex128)
        power = noise.abs().square().mean().item()  # E|n|^2 = sigma^2 r
        # Variance estimate of n samples: relative std sqrt(1/n) for |n|^2 ~ Exp; allow 6 of them.
        assert abs(power / (sigma**2 * r) - 1) < 6 / math.sqrt(n)
        for part in (noise.real, noise.imag):  # each part carries half: std sigma sqrt(r / 2)
            assert abs(part.std().item() / (sigma * math.sqrt(r / 2)) - 1) < 6 / math.sqrt(2 * n)
            assert abs(part.mean().item()) < 6 * sigma * math.sqrt(r / 2) / math.sqrt(n)
        assert abs(torch.corrcoef(torch.stack([noise.real.flatten(),
                                               noise.imag.flatten()]))[0, 1]) < 6 / math.sqrt(n)
        # Orthonormal FFT: the same std per image pixel.
        image_noise = ifft2(noise, centered=True)
        assert abs(image_noise.abs().square().mean().item() / power - 1) < 1e-6
        measured[r] = math.sqrt(power)
    for r in (2.0, 4.0, 8.0):
        assert abs(measured[r] / measured[1.0] / math.sqrt(r) - 1) < 12 / math.sqrt(n)


def test_nsa_noise_on_noisy_data_adds_the_missing_variance_and_is_reproducible():
    clean = random_complex((128, 128), seed=4).to(torch.complex64)
    sigma, r = 0.5, 4.0
    added = nsa_noise(clean, r, sigma, torch.Generator().manual_seed(9), data_has_noise=True)
    power = (added - clean).abs().square().mean().item()
    assert abs(power / (sigma**2 * (r - 1)) - 1) < 6 / math.sqrt(clean.numel())
    again = nsa_noise(clean, r, sigma, torch.Generator().manual_seed(9), data_has_noise=True)
    assert torch.equal(added, again)
    with pytest.raises(ValueError, match="nsa_factor"):
        nsa_noise(clean, 0.5, sigma)
    with pytest.raises(ValueError, match="complex"):
        nsa_noise(clean.real, 2.0, sigma)


def test_random_noise_sigma_stays_in_jitter_range():
    cfg = DegradeConfig(noise_sigma=0.02, noise_jitter=[0.5, 2.0])
    g = torch.Generator().manual_seed(0)
    draws = np.array([random_noise_sigma(cfg, 10.0, g) for _ in range(400)])
    assert draws.min() >= 0.02 * 10 * 0.5 and draws.max() <= 0.02 * 10 * 2.0
    assert draws.std() > 0.05  # U(0.1, 0.4) has std 0.087
    fixed = dataclasses.replace(cfg, noise_jitter=[1.0, 1.0])
    assert random_noise_sigma(fixed, 10.0, g) == pytest.approx(0.2)


def kept_lines(n: int, n_keep: int, centered: bool) -> np.ndarray:
    """Indices whose integer frequency lies in [-(k // 2), k - k // 2)."""
    freq = np.rint(np.fft.fftfreq(n) * n).astype(int)
    if centered:
        freq = np.fft.fftshift(freq)
    return np.flatnonzero((freq >= -(n_keep // 2)) & (freq < n_keep - n_keep // 2))


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("height,width,scale", [(32, 256, 4.0), (20, 33, 3.0)])
def test_truncate_phase_encode_keeps_exactly_the_central_columns(centered, height, width, scale):
    kspace = random_complex((2, height, width), seed=5)
    out = truncate(kspace, scale, "phase_encode", centered)
    assert out.shape == kspace.shape
    cols = kept_lines(width, round(width / scale), centered)
    assert len(cols) == round(width / scale)
    assert torch.equal(out[..., cols], kspace[..., cols])
    rest = np.setdiff1d(np.arange(width), cols)
    dropped = out[..., rest]
    assert (dropped == 0).all() and not torch.signbit(dropped.real).any()
    assert not torch.signbit(dropped.imag).any()


@pytest.mark.parametrize("centered", [True, False])
def test_truncate_central_block_is_kdmri_64_of_256(centered):
    kspace = random_complex((256, 256), seed=6)
    out = truncate(kspace, 4.0, "central_block", centered)
    lines = kept_lines(256, 64, centered)
    block = np.ix_(lines, lines)
    assert torch.equal(out[block], kspace[block])
    assert torch.count_nonzero(out).item() == 64 * 64
    # An image band-limited to the kept block passes unchanged; a higher frequency is removed.
    band = torch.zeros(256, 256, dtype=torch.complex128)
    band[block] = kspace[block]
    low = ifft2(band, centered)
    assert torch.allclose(ifft2(truncate(fft2(low, centered), 4.0, "central_block", centered),
                                centered), low, atol=1e-12)
    yy, xx = torch.meshgrid(*[torch.arange(256, dtype=torch.float64)] * 2, indexing="ij")
    high = torch.cos(2 * math.pi * 40 * xx / 256).to(torch.complex128)  # frequency 40 > 32
    assert ifft2(truncate(fft2(high, centered), 4.0, "central_block", centered),
                 centered).abs().max() < 1e-10
    with pytest.raises(ValueError, match="mode"):
        truncate(kspace, 4.0, "radial", centered)


def test_dihedral_matches_numpy_and_inverts():
    x = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(7))
    a = x.numpy()
    flipped = np.flip(a, -1)
    expected = [np.rot90(a, k, axes=(-2, -1)) for k in range(4)]
    expected += [np.rot90(flipped, k, axes=(-2, -1)) for k in range(4)]
    for view in range(8):
        y = dihedral(x, view)
        assert np.array_equal(y.numpy(), expected[view])
        assert np.array_equal(dihedral(a, view), expected[view])
        assert torch.equal(dihedral_inverse(y, view), x)
        assert np.array_equal(dihedral_inverse(expected[view], view), a)
    square = torch.randn(6, 6, generator=torch.Generator().manual_seed(8))
    assert len({dihedral(square, v).numpy().tobytes() for v in range(8)}) == 8
    with pytest.raises(ValueError, match="0..7"):
        dihedral(x, 8)


def test_view_key_is_deterministic_and_distinct():
    cfg = DegradeConfig(views_per_sample=8, dihedral=True)
    keys = [view_key("vol1.h5:3", v, cfg) for v in range(8)]
    assert keys == [view_key("vol1.h5:3", v, cfg) for v in range(8)]
    assert [k.dihedral for k in keys] == list(range(8))
    assert len({k.mask_seed for k in keys}) == 8 and len({k.noise_seed for k in keys}) == 8
    assert view_key("vol1.h5:4", 0, cfg) != keys[0]
    assert view_key("vol1.h5:3", 0, cfg, base_seed=1) != keys[0]
    plain = dataclasses.replace(cfg, dihedral=False, views_per_sample=3)
    plain_keys = [view_key("vol1.h5:3", v, plain) for v in range(3)]
    assert [k.dihedral for k in plain_keys] == [0, 0, 0]
    assert len({k.noise_seed for k in plain_keys}) == 3
    with pytest.raises(ValueError, match="views_per_sample = 3"):
        view_key("vol1.h5:3", 3, plain)


@pytest.mark.parametrize("task", ["undersample", "denoise", "superres"])
def test_make_view_reproduces_a_view_from_its_key(task):
    target = torch.rand(16, 12, generator=torch.Generator().manual_seed(10))
    cfg = DegradeConfig(task=task, nsa_factor=4.0, noise_sigma=0.05, sr_scale=2.0,
                        sr_mode="phase_encode")
    key = view_key("s", 6, cfg)
    mask = random_mask(12 if key.dihedral % 2 == 0 else 16, 4, 0.2, rng=key.mask_seed)
    first = make_view(target, key, cfg, centered=True, mask=mask)
    second = make_view(target, key, cfg, centered=True, mask=mask)
    for name in ("target", "kspace", "image"):
        assert torch.equal(first[name], second[name])
    x = dihedral(target, key.dihedral).numpy()
    assert np.array_equal(first["target"].numpy(), x)
    k = numpy_fft2(x.astype(np.complex128), centered=True)
    if task == "undersample":
        assert np.allclose(first["kspace"].numpy(), k * mask, atol=1e-5)
    elif task == "superres":
        cols = kept_lines(x.shape[-1], round(x.shape[-1] / 2), centered=True)
        expected = np.zeros_like(k)
        expected[:, cols] = k[:, cols]
        assert np.allclose(first["kspace"].numpy(), expected, atol=1e-5)
    else:
        other = make_view(target, ViewKey(key.dihedral, key.mask_seed, key.noise_seed + 1), cfg,
                          centered=True)
        assert not torch.equal(other["kspace"], first["kspace"])
        noise = first["kspace"].numpy() - k
        expected_std = 0.05 * x.max() * math.sqrt(4.0)  # jitter [1, 1]
        assert 0.5 < np.sqrt(np.mean(np.abs(noise) ** 2)) / expected_std < 1.5
    assert np.allclose(first["image"].numpy(), numpy_ifft2(first["kspace"].numpy(), True),
                       atol=1e-6)
