"""E2E-VarNet: the image-domain cascade and the sensitivity network against fastMRI's k-space
formulation written out here in plain torch, the multi-coil views against h5py, and the recipe
end to end against a numpy recomputation of its zero-filled row."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kdhpc.config import MaskConfig, load_config
from kdhpc.data.default import dataset_root
from kdhpc.data.fastmri import FastMRISliceDataset
from kdhpc.data.masks import equispaced_fraction_mask, file_seed
from kdhpc.data.multicoil import MultiCoilViews
from kdhpc.models import build_model
from kdhpc.models.varnet import VarNet
from kdhpc.recipe import (Stages, execute, planned_digests, recipe_of, shared_stages,
                          stages_for)
from kdhpc.teacher import pretrained

REPO = Path(__file__).resolve().parent.parent
DIMS = (-2, -1)


# ---------------------------------------------------------------------------------------------
# fastMRI's VarNet in k-space, written independently of kdhpc.models.varnet

def fft2c(x):
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=DIMS), norm="ortho"),
                              dim=DIMS)


def ifft2c(k):
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=DIMS), norm="ortho"),
                              dim=DIMS)


def norm_unet_reference(unet, image):
    """fastMRI's NormUnet on complex [N, 1, H, W], real/imag in a last dim of 2 as fastMRI."""
    x = torch.stack([image.real, image.imag], dim=-1)                    # [N, 1, H, W, 2]
    b, c, h, w, two = x.shape
    x = x.permute(0, 4, 1, 2, 3).reshape(b, 2 * c, h, w)
    flat = x.view(b, 2, c * h * w)
    mean, std = flat.mean(dim=2).view(b, 2, 1, 1), flat.std(dim=2).view(b, 2, 1, 1)
    x = (x - mean) / std
    w_mult, h_mult = ((w - 1) | 15) + 1, ((h - 1) | 15) + 1
    w_pad = [math.floor((w_mult - w) / 2), math.ceil((w_mult - w) / 2)]
    h_pad = [math.floor((h_mult - h) / 2), math.ceil((h_mult - h) / 2)]
    x = torch.nn.functional.pad(x, w_pad + h_pad)
    x = unet(x)[..., h_pad[0]:h_mult - h_pad[1], w_pad[0]:w_mult - w_pad[1]]
    x = x * std + mean
    x = x.view(b, 2, c, h, w).permute(0, 2, 3, 4, 1)
    return torch.complex(x[..., 0], x[..., 1])


def cascade_reference(cascade, k, k0, mask, sens):
    """fastMRI's VarNetBlock: k - where(M, k - k0, 0) * lam - F(E(U(R(F^-1 k))))."""
    soft_dc = torch.where(mask.bool(), k - k0, torch.zeros_like(k)) * cascade.dc_weight
    reduced = (ifft2c(k) * sens.conj()).sum(dim=1, keepdim=True)
    model_term = fft2c(norm_unet_reference(cascade.regularizer.unet, reduced) * sens)
    return k - soft_dc - model_term


def sensitivity_reference(sens_net, k0, mask):
    """ACS lines found column by column from the centre, low-pass, per-coil NormUnet, / RSS."""
    b, c, h, w = k0.shape
    out = []
    for i in range(b):
        line = mask[i].reshape(-1) > 0
        centre = w // 2
        left = 0
        while left < centre and line[centre - 1 - left]:
            left += 1
        right = 0
        while centre + right < w and line[centre + right]:
            right += 1
        count = max(2 * min(left, right), 1)
        start = (w - count + 1) // 2
        low = torch.zeros_like(k0[i])
        low[..., start:start + count] = k0[i][..., start:start + count]
        maps = norm_unet_reference(sens_net.norm_unet.unet, ifft2c(low)[:, None])[:, 0]
        out.append(maps / (maps.abs() ** 2).sum(0, keepdim=True).sqrt())
    return torch.stack(out)


def problem(seed=0, b=2, c=3, h=24, w=32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, c, h, w, 2, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, 1, 1, w, generator=g) < 0.3).double()
    mask[0, ..., 13:19] = 1.0      # asymmetric ACS run around column 16: 3 left, 3 right ...
    mask[0, ..., 19] = 1.0         # ... and 4 right for sample 0
    mask[0, ..., 12] = 0.0
    mask[0, ..., 20] = 0.0
    mask[1, ..., 14:18] = 1.0
    mask[1, ..., 13] = 0.0
    mask[1, ..., 18] = 0.0
    return torch.view_as_complex(k) * mask, mask


def small_varnet(seed=0):
    torch.manual_seed(seed)
    return VarNet(num_cascades=2, chans=4, pools=2, sens_chans=4, sens_pools=2).double()


def test_cascade_is_fastmri_kspace_cascade_in_values_and_gradients():
    model = small_varnet()
    k0, mask = problem()
    cascade = model.cascades[0]
    with torch.no_grad():
        cascade.dc_weight.fill_(0.7)
    sens = torch.randn(*k0.shape, dtype=torch.complex128, generator=torch.Generator()
                       .manual_seed(3))
    x = (ifft2c(k0) + 0.1 * torch.randn_like(k0)).requires_grad_(True)
    weights = torch.randn(k0.shape, dtype=torch.float64)

    ours = cascade(x, k0, mask, sens)
    grads = torch.autograd.grad((weights * ours.abs()).sum(), [x, *cascade.parameters()])
    x_ref = x.detach().clone().requires_grad_(True)
    theirs = ifft2c(cascade_reference(cascade, fft2c(x_ref), k0, mask, sens))
    grads_ref = torch.autograd.grad((weights * theirs.abs()).sum(),
                                    [x_ref, *cascade.parameters()])
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    assert grads[1].abs() > 0                                   # dc_weight (first parameter)
    for mine, ref in zip(grads, grads_ref):
        torch.testing.assert_close(mine, ref, rtol=1e-8, atol=1e-10)


def test_sensitivity_network_matches_reference_and_has_unit_rss():
    model = small_varnet(1)
    k0, mask = problem(1)
    ours = model.sens_net(k0, mask)
    theirs = sensitivity_reference(model.sens_net, k0, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close((ours.abs() ** 2).sum(1), torch.ones_like(ours.real[:, 0]))
    params = list(model.sens_net.parameters())
    g = torch.autograd.grad(ours.abs().sum(), params)
    g_ref = torch.autograd.grad(theirs.abs().sum(), params)
    for mine, ref in zip(g, g_ref):
        torch.testing.assert_close(mine, ref, rtol=1e-8, atol=1e-10)


def test_whole_varnet_matches_reference_and_dc_weight_gradient_matches_finite_differences():
    model = small_varnet(2)
    k0, mask = problem(2)
    with torch.no_grad():
        output = model(k0, mask)
        sens = sensitivity_reference(model.sens_net, k0, mask)
        k = k0.clone()
        for cascade in model.cascades:
            k = cascade_reference(cascade, k, k0, mask, sens)
        expected = (ifft2c(k).abs() ** 2).sum(1, keepdim=True).sqrt()
    torch.testing.assert_close(output, expected, rtol=1e-9, atol=1e-10)

    lam = model.cascades[1].dc_weight
    weights = torch.randn(output.shape, dtype=torch.float64)

    def value():
        return (weights * model(k0, mask)).sum()

    (grad,) = torch.autograd.grad(value(), [lam])
    step = 1e-5
    with torch.no_grad():
        lam += step
        up = value()
        lam -= 2 * step
        down = value()
        lam += step
    assert grad.abs() > 1e-6
    torch.testing.assert_close(grad, ((up - down) / (2 * step)).reshape(1), rtol=1e-5, atol=1e-9)


def test_registry_sizes_and_the_published_parameter_count():
    counts = {n: sum(p.numel() for p in build_model(n).parameters())
              for n in ("varnet_teacher", "varnet_student")}
    assert counts["varnet_teacher"] > 5 * counts["varnet_student"]
    published = build_model("varnet_e2e")
    # Sriram et al. report ~30 M parameters for 12 cascades of 18-channel, 4-pool U-Nets.
    assert 29e6 < sum(p.numel() for p in published.parameters()) < 31e6
    assert len(published.cascades) == 12 and published.pools == 4


# ---------------------------------------------------------------------------------------------
# multi-coil files as measured

def write_multicoil(path: Path, rng, mask=None, slices=3, coils=2, h=16, w=20, crop=12):
    kspace = (rng.standard_normal((slices, coils, h, w))
              + 1j * rng.standard_normal((slices, coils, h, w))).astype(np.complex64)
    target = rng.uniform(0, 5, (slices, crop, crop)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        f.create_dataset("reconstruction_rss", data=target)
        if mask is not None:
            f.create_dataset("mask", data=mask.astype(np.float32))
        f.attrs["max"] = float(target.max())
    return kspace, target


def test_views_read_the_files_kspace_target_and_own_mask(tmp_path):
    rng = np.random.default_rng(0)
    own = (rng.uniform(size=20) < 0.4).astype(np.float32)
    own[9:12] = 1
    write_multicoil(tmp_path / "a_with_mask.h5", rng, mask=own)
    write_multicoil(tmp_path / "b_no_mask.h5", rng)
    cfg = MaskConfig(kind="equispaced", acceleration=4, center_fraction=0.1, layout="centered",
                     seed=7)
    views = MultiCoilViews(FastMRISliceDataset(tmp_path, "multicoil"), cfg, crop=(10, 10))
    for index in range(len(views)):
        item = views.get_view(index, 0)
        fname, s = views.slices.volumes[views.volume_of(index)][0], index % 3
        with h5py.File(fname, "r") as f:
            kspace, target = f["kspace"][s], f["reconstruction_rss"][()]
        mask = own if "with_mask" in fname else equispaced_fraction_mask(
            20, 4, 0.1, file_seed(fname, 7))
        peak = target[:, 1:11, 1:11].max()              # the volume's cropped maximum
        np.testing.assert_array_equal(item["mask"].reshape(-1).numpy(), mask)
        np.testing.assert_allclose(item["kspace"].numpy(), kspace * mask / peak, rtol=1e-6)
        np.testing.assert_allclose(item["target"][0].numpy(), target[s, 1:11, 1:11] / peak,
                                   rtol=1e-6)
        assert float(item["volume_max"]) == pytest.approx(peak)
    with pytest.raises(ValueError, match="mask.kind: expected one of random, equispaced"):
        MultiCoilViews(views.slices, MaskConfig(kind="kdmri"))


# ---------------------------------------------------------------------------------------------
# the recipe

def test_alpha_reruns_only_the_kd_student_and_what_reads_it():
    tiny = REPO / "configs" / "varnet_tiny.yaml"
    for purpose, expected in (("distill", {"student_kd", "evaluate", "report"}),
                              ("sweep", {"student_kd", "evaluate_val"})):
        base = planned_digests(load_config(tiny), purpose)
        other = planned_digests(load_config(tiny, ["loss.alpha=0.3"]), purpose)
        assert {n for n in base if base[n] != other[n]} == expected
    for key in ("loss.cascade_weight", "loss.at_weight"):   # swept from their default, 0
        cfg = load_config(tiny, [f"{key}=0"])
        assert shared_stages(stages_for(recipe_of(cfg), cfg, "sweep"), [key]) == [
            "data", "teacher", "teacher_cache", "student"]


def test_tiny_run_reports_the_zero_filled_rss_that_numpy_computes(tmp_path):
    cfg = load_config(REPO / "configs" / "varnet_tiny.yaml", [f"run_dir={tmp_path / 'run'}"])
    run = execute(cfg, Stages(cfg.run_dir))
    assert "KD-Student" in run.results["report"]["text"]
    per_volume = json.loads((tmp_path / "run" / "metrics.json").read_text())["per_volume"]
    test_files = sorted((dataset_root(cfg) / "multicoil_test").glob("*.h5"))
    assert sorted(per_volume["ZF"]) == [f.name for f in test_files]
    for path in test_files:
        with h5py.File(path, "r") as f:
            kspace, target = f["kspace"][()], f["reconstruction_rss"][()]
        mask = equispaced_fraction_mask(kspace.shape[-1], 4, 0.08, file_seed(path, 42))
        images = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace * mask, axes=(-2, -1)),
                                              norm="ortho"), axes=(-2, -1))
        zf = np.sqrt((np.abs(images) ** 2).sum(1))
        mse = np.mean((target.astype(np.float64) - zf) ** 2)
        psnr = 10 * np.log10(target.max() ** 2 / mse)
        assert per_volume["ZF"][path.name]["psnr"] == pytest.approx(psnr, abs=1e-3)


def test_the_shipped_teacher_matches_its_manifest_and_the_default_config():
    entry = pretrained.read_manifest()["varnet_default"]
    path = pretrained.WEIGHTS_DIR / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert path.stat().st_size < 2_000_000
    cfg = load_config(REPO / "configs" / "varnet_default.yaml")
    assert cfg.model.teacher_checkpoint == "pretrained:varnet_default"
    assert pretrained.resolve_teacher_checkpoint(cfg) == (path, entry["sha256"])
    model = build_model(entry["arch"])
    model.load_state_dict(torch.load(path, weights_only=True))  # strict: every key and shape
    assert pretrained.data_identity(load_config(REPO / entry["config"])) == entry["data"]
