"""Tests of kdhpc.models: exact sizes, values against independent computations, feature taps,
SwinIR windows and masks, multi-task conditioning, deep supervision, gradient flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdhpc.models import (MODEL_NAMES, build_model, count_parameters, feature_layers, segment)
from kdhpc.models import swinir as swinir_module
from kdhpc.models.dccnn import DCCNN, conv3x3
from kdhpc.models.edsr import EDSR, MultiTaskEDSR
from kdhpc.models.mobilenet_unet import InvertedResidual
from kdhpc.models.swinir import (WindowAttention, attention_mask, relative_position_index,
                                 window_partition, window_reverse)
from kdhpc.models.vdsr import VDSR


pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


def _seed(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- sizes and registry

@pytest.mark.parametrize("name, expected", [
    ("dccnn_teacher", 141_765), ("dccnn_student", 49_285),
    ("vdsr_teacher", 333_569), ("vdsr_student", 185_857)])
def test_published_parameter_counts(name, expected):
    assert count_parameters(build_model(name)) == expected


def test_parameter_count_matches_layer_formula():
    # sum over convs of cin * cout * 9 + cout, from the architecture description alone
    def stack(widths):
        return sum(a * b * 9 + b for a, b in zip(widths[:-1], widths[1:]))
    dccnn = DCCNN(n_cascades=3, n_convs=4, channels=8)
    assert count_parameters(dccnn) == 3 * stack([1, 8, 8, 8, 1])
    assert count_parameters(VDSR(n_convs=5, channels=16)) == stack([1, 16, 16, 16, 16, 1])
    model = VDSR(n_convs=3, channels=4)
    model.body.convs[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == stack([1, 4, 4, 1]) - 36


def test_registry_overrides_and_errors():
    assert build_model("dccnn_student", centered=True).centered is True
    assert len(build_model("swinir_small", depths=[2], heads=[4]).blocks) == 1
    with pytest.raises(ValueError, match="dccnn_teacher"):
        build_model("dccnn_teachr")
    with pytest.raises(ValueError, match="n_cascade"):
        build_model("dccnn_teacher", n_cascade=3)
    for name in ("swinir_denoise", "swinir_lightweight_sr", "edsr_baseline", "unet_teacher"):
        assert name in MODEL_NAMES


def test_published_named_sizes():
    swin = build_model("swinir_denoise")
    assert swin.conv_first.out_channels == 180 and swin.window == 8
    assert [len(b.layers) for b in swin.blocks] == [6] * 6
    assert all(layer.attn.heads == 6 and layer.mlp[0].out_features == 360
               for b in swin.blocks for layer in b.layers)
    light = build_model("swinir_lightweight_sr")
    assert light.conv_first.out_channels == 60 and [len(b.layers) for b in light.blocks] == [6] * 4
    edsr = build_model("edsr_baseline")
    assert len(edsr.blocks) == 16 and edsr.head.out_channels == 64


# ---------------------------------------------------------------- thin convs (GEMM path)

@pytest.mark.parametrize("cin, h, w", [(5, 13, 22), (32, 20, 20), (3, 1, 7), (2, 2, 1)])
def test_conv3x3_gemm_path_matches_conv2d_values_and_gradients(cin, h, w):
    _seed(1)
    cout = 1  # the shape that takes the GEMM + shifted-add path
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        base = torch.randn(2, cin, h, w, dtype=dtype)
        x1 = base.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)  # strided
        x2 = base.clone().requires_grad_(True)
        w1 = torch.randn(cout, cin, 3, 3, dtype=dtype, requires_grad=True)
        b1 = torch.randn(cout, dtype=dtype, requires_grad=True)
        w2, b2 = w1.detach().clone().requires_grad_(True), b1.detach().clone().requires_grad_(True)
        fast, ref = conv3x3(x1, w1, b1), F.conv2d(x2, w2, b2, padding=1)
        torch.testing.assert_close(fast, ref, atol=tol, rtol=tol)
        grad_out = torch.randn_like(ref) * 3.0
        fast.backward(grad_out)
        ref.backward(grad_out)
        for a, b in ((x1, x2), (w1, w2), (b1, b2)):
            torch.testing.assert_close(a.grad, b.grad, atol=tol * 10, rtol=tol * 10)


# ---------------------------------------------------------------- DC-CNN

def _numpy_dc(z: np.ndarray, k0: np.ndarray, mask: np.ndarray, centered: bool) -> np.ndarray:
    """Hard DC in numpy: Re(IFFT2(M k0 + (1 - M) FFT2(z))), orthonormal, optional centring."""
    def fft(a):
        if centered:
            return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(a, axes=(-2, -1)), norm="ortho"),
                                   axes=(-2, -1))
        return np.fft.fft2(a, norm="ortho")

    def ifft(a):
        if centered:
            return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(a, axes=(-2, -1)), norm="ortho"),
                                   axes=(-2, -1))
        return np.fft.ifft2(a, norm="ortho")
    return np.real(ifft(mask * k0 + (1 - mask) * fft(z)))


def _kspace_problem(h, w, mask_shape, centered, batch=2, seed=0):
    """A real target image, its k-space, a line mask and the zero-filled image (float64)."""
    g = _seed(seed)
    image = torch.rand(batch, 1, h, w, generator=g, dtype=torch.float64)
    full = np.fft.fft2(image.numpy(), norm="ortho")
    if centered:
        full = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image.numpy(), axes=(-2, -1)),
                                           norm="ortho"), axes=(-2, -1))
    mask = (torch.rand(mask_shape, generator=g, dtype=torch.float64) < 0.4).double()
    k0 = torch.from_numpy(full) * mask
    zf = np.fft.ifft2(k0.numpy(), norm="ortho") if not centered else np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(k0.numpy(), axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return torch.from_numpy(np.real(zf)).contiguous(), k0, mask


@pytest.mark.parametrize("centered, mask_shape", [(False, (24, 1)), (True, (1, 20))])
def test_dccnn_matches_independent_convs_and_numpy_dc(centered, mask_shape):
    x_zf, k0, mask = _kspace_problem(24, 20, mask_shape, centered)
    model = DCCNN(n_cascades=2, n_convs=5, channels=6, centered=centered).double()
    out = model(x_zf, k0, mask)
    x = x_zf
    for cascade in model.cascades:
        h = x
        for i, conv in enumerate(cascade.convs):
            h = F.conv2d(h, conv.weight, conv.bias, padding=1)
            if i < len(cascade.convs) - 1:
                h = torch.relu(h)
        x = torch.from_numpy(_numpy_dc(h.detach().numpy(), k0.numpy(), mask.numpy(), centered))
    torch.testing.assert_close(out.detach(), x, atol=1e-10, rtol=1e-10)


def test_dccnn_hard_dc_keeps_sampled_lines():
    # Re(.) is exact only for Hermitian k-space: a real target, and a mask that keeps line -i
    # whenever it keeps line i (unshifted layout: i <-> (H - i) % H).
    h, w = 32, 18
    g = _seed(3)
    image = torch.rand(2, 1, h, w, generator=g, dtype=torch.float64)
    rows = torch.rand(h, generator=g) < 0.3
    rows = rows | rows[(-torch.arange(h)) % h]
    rows[0] = True
    mask = rows.double().view(h, 1)
    k0 = torch.fft.fft2(image, norm="ortho") * mask
    x_zf = torch.fft.ifft2(k0, norm="ortho").real
    model = build_model("dccnn_student").double()
    out = model(x_zf, k0, mask)
    k_out = torch.fft.fft2(out, norm="ortho")
    sampled = rows.nonzero().flatten()
    torch.testing.assert_close(k_out[..., sampled, :], k0[..., sampled, :], atol=1e-12, rtol=0)
    # and the unsampled lines are the network's, not zero-filled
    assert k_out[..., ~rows, :].abs().mean() > 1e-3


def test_dccnn_rejects_bad_inputs():
    model = DCCNN(n_cascades=1, n_convs=2, channels=2)
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="k0"):
        model(x, torch.rand(1, 1, 8, 8), torch.ones(8, 1))
    with pytest.raises(ValueError, match="x_zf"):
        model(x[:, 0], torch.zeros(1, 8, 8, dtype=torch.complex64), torch.ones(8, 1))


# ---------------------------------------------------------------- VDSR

def test_vdsr_values_and_global_residual():
    _seed(4)
    model = VDSR(n_convs=5, channels=8).double()
    x = torch.rand(2, 1, 15, 11, dtype=torch.float64)
    h = x
    for i, conv in enumerate(model.body.convs):
        h = F.conv2d(h, conv.weight, conv.bias, padding=1)
        h = torch.relu(h) if i < len(model.body.convs) - 1 else h
    torch.testing.assert_close(model(x), x + h)
    with torch.no_grad():
        model.body.convs[-1].weight.zero_()
        model.body.convs[-1].bias.zero_()
    torch.testing.assert_close(model(x), x, atol=0, rtol=0)


# ---------------------------------------------------------------- feature taps

def _forward_with_hooks(model, names, *inputs):
    captured = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: captured.__setitem__(n, out.detach().clone()))
        for n in names]
    # conv outputs as well, to check the tapped ReLU follows the named conv
    convs = {}
    hooks += [mod.register_forward_hook(
        lambda m, inp, out, n=n: convs.__setitem__(n, out.detach().clone()))
        for n, mod in model.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    try:
        out, feats = model(*inputs, return_features=True)
    finally:
        for hk in hooks:
            hk.remove()
    return out, feats, captured, convs


@pytest.mark.parametrize("teacher, student, pairs, t_conv, s_conv", [
    ("vdsr_teacher", "vdsr_student", 1, 6, 4)])
def test_vdsr_feature_taps_are_named_relu_outputs(teacher, student, pairs, t_conv, s_conv):
    _seed(5)
    x = torch.rand(1, 1, 12, 10)
    results = []
    for name, conv_no in ((teacher, t_conv), (student, s_conv)):
        model = build_model(name, channels=8)
        names = feature_layers(model)
        assert names == (f"body.acts.{conv_no - 1}",)
        out, feats, captured, convs = _forward_with_hooks(model, names, x)
        torch.testing.assert_close(out, model(x), atol=0, rtol=0)
        for n, f in zip(names, feats):
            torch.testing.assert_close(f, captured[n], atol=0, rtol=0)
            torch.testing.assert_close(f, torch.relu(convs[f"body.convs.{conv_no - 1}"]))
        results.append(feats)
    assert len(results[0]) == len(results[1]) == pairs


def test_dccnn_feature_taps_are_conv3_and_conv2_relus():
    x_zf, k0, mask = _kspace_problem(16, 12, (16, 1), False, batch=1)
    x_zf, k0 = x_zf.float(), k0.to(torch.complex64)
    pairs = []
    for name, conv_no in (("dccnn_teacher", 3), ("dccnn_student", 2)):
        model = build_model(name, channels=8)
        names = feature_layers(model)
        assert names == tuple(f"cascades.{c}.acts.{conv_no - 1}" for c in range(5))
        out, feats, captured, convs = _forward_with_hooks(model, names, x_zf, k0, mask)
        torch.testing.assert_close(out, model(x_zf, k0, mask), atol=0, rtol=0)
        assert len(feats) == 5
        for c, (n, f) in enumerate(zip(names, feats)):
            torch.testing.assert_close(f, captured[n], atol=0, rtol=0)
            torch.testing.assert_close(f, torch.relu(convs[f"cascades.{c}.convs.{conv_no - 1}"]))
        # independent: the first cascade's tap is ReLU(conv_k(...ReLU(conv_1(x_zf))))
        h = x_zf
        for conv in model.cascades[0].convs[:conv_no]:
            h = torch.relu(F.conv2d(h, conv.weight, conv.bias, padding=1))
        torch.testing.assert_close(feats[0], h, atol=1e-5, rtol=1e-5)
        pairs.append(feats)
    assert all(t.shape == s.shape for t, s in zip(*pairs))


# ---------------------------------------------------------------- SwinIR

def test_window_partition_round_trip_and_layout():
    g = _seed(6)
    x = torch.randn(2, 16, 24, 3, generator=g)  # [B, H, W, C]
    windows = window_partition(x, 8)
    assert torch.equal(window_reverse(windows, 8, 16, 24), x)
    # window (b, wy, wx), token (ty, tx) holds x[b, 8 wy + ty, 8 wx + tx]
    b, wy, wx, ty, tx = 1, 1, 2, 5, 3
    index = b * (2 * 3) + wy * 3 + wx
    assert torch.equal(windows[index, ty * 8 + tx], x[b, 8 * wy + ty, 8 * wx + tx])


def test_relative_position_index_against_loops():
    m = 3
    index = relative_position_index(m)
    for i in range(m * m):
        for j in range(m * m):
            (yi, xi), (yj, xj) = divmod(i, m), divmod(j, m)
            assert index[i, j] == (yi - yj + m - 1) * (2 * m - 1) + (xi - xj + m - 1)


@pytest.mark.parametrize("h, w, shift", [(16, 24, 4), (21, 19, 4), (13, 16, 0), (16, 16, 2)])
def test_attention_mask_against_original_coordinates(h, w, shift):
    window = 8
    mask = attention_mask(h, w, window, shift)
    if shift == 0 and h % window == 0 and w % window == 0:
        assert mask is None
        return
    hp, wp = -(-h // window) * window, -(-w // window) * window
    # original (unrolled, unpadded) coordinates of every token of the rolled, padded grid
    ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    coords = torch.stack([(ys + shift) % hp, (xs + shift) % wp], dim=-1).float()  # [Hp, Wp, 2]
    coords = window_partition(coords[None], window)  # [nW, N, 2]
    real = (coords[..., 0] < h) & (coords[..., 1] < w)  # [nW, N]
    gap = (coords[:, :, None] - coords[:, None, :]).abs()  # [nW, N, N, 2]
    # a pair is a true neighbour pair iff it did not cross the cyclic wrap: |d| < window
    allowed = (gap < window).all(-1) & real[:, None, :]
    assert torch.equal(mask == 0, allowed)
    assert torch.all((mask == 0) | (mask == swinir_module.MASK_LOGIT))


def test_window_attention_matches_per_window_loop():
    g = _seed(7)
    attn = WindowAttention(dim=8, window=2, heads=2).double()
    with torch.no_grad():
        attn.bias_table.normal_(generator=g)
    x = torch.randn(3, 4, 8, dtype=torch.float64, generator=g)  # [nW, N, D]
    mask = torch.zeros(3, 4, 4, dtype=torch.float64)
    mask[1, :, 2] = swinir_module.MASK_LOGIT
    out = attn(x, mask)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    expected = torch.zeros_like(x)
    for wnd in range(3):
        heads = []
        for hd in range(2):
            sl = slice(4 * hd, 4 * hd + 4)
            logits = q[wnd, :, sl] @ k[wnd, :, sl].T / 2.0
            for i in range(4):
                for j in range(4):
                    (yi, xi), (yj, xj) = divmod(i, 2), divmod(j, 2)
                    logits[i, j] += attn.bias_table[(yi - yj + 1) * 3 + (xi - xj + 1), hd]
                    if wnd == 1 and j == 2:
                        logits[i, j] = -float("inf")
            heads.append(torch.softmax(logits, -1) @ v[wnd, :, sl])
        expected[wnd] = attn.proj(torch.cat(heads, -1))
    torch.testing.assert_close(out, expected)


def test_swinir_output_independent_of_padding_content(monkeypatch):
    _seed(8)
    model = build_model("swinir_small", embed_dim=16, depths=[2, 2], heads=[2, 2], window=4).eval()
    x = torch.rand(2, 1, 10, 7)  # neither side divisible by the window
    with torch.no_grad():
        clean = model(x)

    def pad_with_garbage(t, window):
        h, w = t.shape[1:3]
        out = torch.randn(t.shape[0], h + (-h) % window, w + (-w) % window, t.shape[3]) * 100
        out[:, :h, :w] = t
        return out
    monkeypatch.setattr(swinir_module, "pad_to_window", pad_with_garbage)
    with torch.no_grad():
        dirty = model(x)
    torch.testing.assert_close(dirty, clean, atol=1e-5, rtol=1e-5)
    # and the shifted layers are live: changing a far pixel changes a pixel through attention
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    with torch.no_grad():
        assert (model(x2) - dirty).abs()[:, :, 9, 6].max() > 0


def test_swinir_image_residual():
    model = build_model("swinir_small", embed_dim=8, depths=[1], heads=[2], window=4)
    with torch.no_grad():
        model.conv_last.weight.zero_()
        model.conv_last.bias.zero_()
    x = torch.rand(1, 1, 9, 8)
    torch.testing.assert_close(model(x), x, atol=0, rtol=0)


# ---------------------------------------------------------------- EDSR

def test_edsr_values_against_manual_forward():
    _seed(9)
    model = EDSR(n_blocks=2, features=6, res_scale=0.5).double()
    x = torch.rand(2, 1, 9, 7, dtype=torch.float64)

    def conv(c, t):
        return F.conv2d(t, c.weight, c.bias, padding=1)
    f0 = conv(model.head, x)
    h = f0
    for block in model.blocks:
        h = h + 0.5 * conv(block.conv2, torch.relu(conv(block.conv1, h)))
    expected = x + conv(model.out_conv, f0 + conv(model.body_conv, h))
    torch.testing.assert_close(model(x), expected)


def test_multitask_edsr_depends_on_task():
    _seed(10)
    model = MultiTaskEDSR(n_blocks=2, features=8, n_tasks=2).double()
    x = torch.rand(2, 1, 10, 9, dtype=torch.float64)
    y0, y1 = model(x, 0), model(x, "superres")
    assert (y0 - y1).abs().max() > 1e-6
    mixed = model(x, torch.tensor([0, 1]))
    torch.testing.assert_close(mixed[0], y0[0])
    torch.testing.assert_close(mixed[1], y1[1])
    # identity FiLM for a task reduces the network to the plain EDSR with the shared weights
    plain = EDSR(n_blocks=2, features=8).double()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "film.weight"})
    with torch.no_grad():
        model.film.weight[1].zero_()
    torch.testing.assert_close(model(x, 1), plain(x))
    with pytest.raises(ValueError, match="0..1"):
        model(x, 2)
    with pytest.raises(ValueError, match="unknown name"):
        model(x, "deblur")


# ---------------------------------------------------------------- segmentation

@pytest.mark.parametrize("name", ["unet_teacher_small", "mobilenet_unet_student_small"])
def test_deep_supervision_levels_and_values(name):
    _seed(11)
    model = build_model(name).eval()
    x = torch.rand(2, 1, 64, 48)
    decoder_out = {}
    hooks = [model.decoder[lvl].register_forward_hook(
        lambda m, i, o, lvl=lvl: decoder_out.__setitem__(lvl, o)) for lvl in range(4)]
    with torch.no_grad():
        logits = model(x)
    for hk in hooks:
        hk.remove()
    assert len(logits) == 4
    for i, lg in enumerate(logits):
        assert lg.shape == (2, 4, 64 // 2 ** i, 48 // 2 ** i)
        head = model.heads.heads[i]
        expected = torch.einsum("kc,bchw->bkhw", head.weight[:, :, 0, 0], decoder_out[i]) \
            + head.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(lg, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(segment(model, x), logits[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.rand(1, 1, 40, 48))


def test_unet_teacher_train_and_eval_agree():
    # InstanceNorm keeps no running statistics: the list convention gives the same values in
    # both modes (what a frozen eval-mode teacher feeds the KD loss).
    _seed(12)
    model = build_model("unet_teacher_small")
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    for a, b in zip(train_out, eval_out):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_unet_teacher_default_is_nnunet_shape():
    model = build_model("unet_teacher")
    widths = [stage[0][0].out_channels for stage in model.encoder]
    assert widths == [32, 64, 128, 256, 512, 512]
    strides = [stage[0][0].stride[0] for stage in model.encoder]
    assert strides == [1, 2, 2, 2, 2, 2]
    assert all(isinstance(stage[0][1], torch.nn.InstanceNorm2d) for stage in model.encoder)


@pytest.mark.parametrize("cin, cout, stride, residual", [(8, 8, 1, True), (8, 8, 2, False),
                                                         (8, 12, 1, False)])
def test_inverted_residual_shortcut(cin, cout, stride, residual):
    _seed(13)
    block = InvertedResidual(cin, cout, stride, expansion=8).eval()
    with torch.no_grad():
        for m in block.modules():  # non-trivial BN statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, cin, 12, 12)
    with torch.no_grad():
        branch = block.block(x)
        out = block(x)
    assert block.block[0].out_channels == 8 * cin
    torch.testing.assert_close(out, x + branch if residual else branch, atol=0, rtol=0)
    assert block.use_residual is residual


# ---------------------------------------------------------------- gradients reach every parameter

def _gradient_cases():
    g = _seed(14)
    x_zf, k0, mask = _kspace_problem(16, 12, (16, 1), False, batch=2)
    recon = (x_zf.float(), k0.to(torch.complex64), mask.float())
    image = (torch.rand(2, 1, 16, 12, generator=g),)
    seg = (torch.rand(2, 1, 32, 32, generator=g),)
    return [("dccnn_teacher", dict(channels=4), recon), ("dccnn_student", dict(channels=4), recon),
            ("vdsr_teacher", dict(channels=4), image), ("vdsr_student", dict(channels=4), image),
            ("swinir_small", dict(embed_dim=8, depths=[2], heads=[2], window=4), image),
            ("edsr_small", dict(n_blocks=2, features=4), image),
            ("edsr_multitask_small", dict(n_blocks=2, features=4), image + (torch.tensor([0, 1]),)),
            ("unet_teacher_small", {}, seg), ("mobilenet_unet_student_small", {}, seg)]


@pytest.mark.parametrize("name, overrides, inputs", _gradient_cases(),
                         ids=[c[0] for c in _gradient_cases()])
def test_gradients_reach_every_parameter(name, overrides, inputs):
    model = build_model(name, **overrides).train()
    out = model(*inputs)
    outputs = out if isinstance(out, list) else [out]
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs)
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"{name}: no gradient for {missing}"
