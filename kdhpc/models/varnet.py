"""E2E-VarNet (Sriram et al. 2020, fastMRI's ``VarNet``) for multi-coil k-space, sized by its
constructor.

Input: the masked multi-coil k-space ``k0`` complex ``[B, C, H, W]`` in fastMRI's *centred*
layout and the mask ``[B, 1, 1, W]`` (1 = sampled phase-encode column). Output: the
root-sum-of-squares image ``[B, 1, H, W]`` of the last cascade's coil images (fastMRI's
``rss(complex_abs(ifft2c(kspace_pred)), dim=1)``); the recipe crops it to the target.

- Sensitivity maps (:class:`SensitivityModel`, computed once per forward): the auto-calibration
  lines (the contiguous sampled block around the centre column, found from the mask as fastMRI's
  ``get_pad_and_num_low_freqs`` does) low-pass the k-space, ``F^-1`` gives coil images, each
  coil image runs through one :class:`NormUnet` (coils folded into the batch), and the result
  is divided by its root-sum-of-squares over coils.
- Cascades (:class:`VarNetCascade`). fastMRI writes cascade t in k-space::

      k_{t+1} = k_t - lam_t M (k_t - k0) - F(E(U_t(R(F^-1 k_t))))

  with ``R(x) = sum_c conj(S_c) x_c`` (coil combination), ``E(y)_c = S_c y`` (expansion) and a
  learned soft-DC weight ``lam_t`` (initialised to 1). ``F`` is unitary, so with coil images
  ``x_t = F^-1 k_t`` the same map is, exactly::

      x_{t+1} = DC(x_t; k0, M, lam_t) - S * U_t(R(x_t)),

  ``DC = kdhpc.ops.data_consistency(x, k0, mask, lam, centered=True, output="complex")``, which
  is how this module computes it (the C++ op applies the 1-D mask with 1-D transforms along W and
  gives ``lam_t`` its gradient). tests/test_varnet.py checks it against a plain-torch k-space
  cascade written as fastMRI's.
- :class:`NormUnet`: a complex image ``[N, 1, H, W]`` as two real channels, normalised by the
  mean and standard deviation of each of them, padded to a multiple of 16, fastMRI's
  :class:`Unet` (``chans`` features, ``pools`` average poolings, instance norm, LeakyReLU 0.2,
  no conv bias), unpadded and unnormalised.

Sizes: the published E2E-VarNet is 12 cascades, U-Nets of 18 channels and 4 pools, and a
sensitivity U-Net of 8 channels and 4 pools (``build_model("varnet_e2e")``, ~30 M parameters).

Feature taps (``feature_layers``, the registry convention): the bottleneck ConvBlock of every
cascade's U-Net (``cascades.<t>.regularizer.unet.bottleneck``, attention transfer), then every
cascade (``cascades.<t>``, its output coil images ``x_{t+1}`` ``[B, C, H, W]`` complex, whose RSS
the per-cascade transfer matches). ``forward(k0, mask, return_features=True)`` returns
``(output, features)`` in that order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdhpc.ops import data_consistency
from kdhpc.ops.fft import ifft2


def root_sum_of_squares(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``sqrt(sum_c |x_c|^2)`` over ``dim``, keeping it (fastMRI's ``rss_complex``)."""
    return (x.real.square() + x.imag.square()).sum(dim, keepdim=True).sqrt()


def coil_images(kspace: torch.Tensor) -> torch.Tensor:
    """Coil images ``F^-1 k`` (centred, orthonormal) of k-space ``[B, C, H, W]``."""
    return ifft2(kspace, centered=True)


def acs_bounds(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample the first column and the number of the auto-calibration lines of ``mask``
    ``[B, 1, 1, W]``: fastMRI's ``get_pad_and_num_low_freqs`` (twice the shorter run of sampled
    columns on either side of column ``W // 2``, at least 1, centred)."""
    lines = (mask.reshape(mask.shape[0], -1) > 0).to(torch.int8)          # [B, W]
    centre = lines.shape[1] // 2
    left = torch.argmin(lines[:, :centre].flip(1), dim=1)
    right = torch.argmin(lines[:, centre:], dim=1)
    # argmin of an all-ones run is 0: a fully sampled half counts as its whole length.
    left = torch.where(lines[:, :centre].all(1), torch.full_like(left, centre), left)
    right = torch.where(lines[:, centre:].all(1), torch.full_like(right, lines.shape[1] - centre),
                        right)
    count = torch.clamp(2 * torch.minimum(left, right), min=1)
    return (lines.shape[1] - count + 1) // 2, count


class ConvBlock(nn.Sequential):
    """fastMRI's U-Net block: twice (conv3x3 without bias, instance norm, LeakyReLU 0.2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm2d(cout),
                         nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm2d(cout),
                         nn.LeakyReLU(0.2, inplace=True))


class UpBlock(nn.Sequential):
    """fastMRI's transpose-conv block: ConvTranspose 2x2 stride 2 (no bias), norm, LeakyReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False),
                         nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class Unet(nn.Module):
    """fastMRI's U-Net: ``pools`` levels of ConvBlock + 2x2 average pooling, a bottleneck
    ConvBlock of ``chans * 2^pools`` features, transpose-conv upsampling with skips, 1x1 out."""

    def __init__(self, in_chans: int, out_chans: int, chans: int, pools: int):
        super().__init__()
        widths = [chans * 2 ** level for level in range(pools)]
        self.down = nn.ModuleList(ConvBlock(in_chans if i == 0 else widths[i - 1], w)
                                  for i, w in enumerate(widths))
        self.bottleneck = ConvBlock(widths[-1], 2 * widths[-1])
        self.up_transpose = nn.ModuleList(UpBlock(2 * w, w) for w in reversed(widths))
        self.up = nn.ModuleList(ConvBlock(2 * w, w) for w in reversed(widths))
        self.out = nn.Conv2d(chans, out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.avg_pool2d(x, 2)
        x = self.bottleneck(x)
        for transpose, block in zip(self.up_transpose, self.up):
            skip = skips.pop()
            x = transpose(x)
            # odd sizes: reflect-pad the upsampled map on the right / bottom (fastMRI)
            pad = [0, int(x.shape[-1] != skip.shape[-1]), 0, int(x.shape[-2] != skip.shape[-2])]
            if any(pad):
                x = F.pad(x, pad, "reflect")
            x = block(torch.cat([x, skip], dim=1))
        return self.out(x)


class NormUnet(nn.Module):
    """A complex image ``[N, 1, H, W]`` through :class:`Unet` as normalised real/imag channels."""

    def __init__(self, chans: int, pools: int):
        super().__init__()
        self.unet = Unet(2, 2, chans, pools)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        n, _, h, w = image.shape
        x = torch.view_as_real(image[:, 0]).permute(0, 3, 1, 2)           # [N, 2, H, W]
        flat = x.reshape(n, 2, h * w)
        mean = flat.mean(2).reshape(n, 2, 1, 1)
        std = flat.std(2).reshape(n, 2, 1, 1)
        x = (x - mean) / std
        h_mult, w_mult = ((h - 1) | 15) + 1, ((w - 1) | 15) + 1          # next multiple of 16
        h_pad = ((h_mult - h) // 2, math.ceil((h_mult - h) / 2))
        w_pad = ((w_mult - w) // 2, math.ceil((w_mult - w) / 2))
        x = F.pad(x, [*w_pad, *h_pad])
        x = self.unet(x)[..., h_pad[0]:h_mult - h_pad[1], w_pad[0]:w_mult - w_pad[1]]
        x = x * std + mean
        return torch.view_as_complex(x.permute(0, 2, 3, 1).contiguous())[:, None]


class SensitivityModel(nn.Module):
    """Coil sensitivities ``[B, C, H, W]`` from the auto-calibration lines (module docstring)."""

    def __init__(self, chans: int, pools: int):
        super().__init__()
        self.norm_unet = NormUnet(chans, pools)

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = kspace.shape
        start, count = acs_bounds(mask)
        columns = torch.arange(w, device=kspace.device)
        acs = (columns >= start[:, None]) & (columns < (start + count)[:, None])   # [B, W]
        images = coil_images(kspace * acs[:, None, None, :])                 # [B, C, H, W]
        maps = self.norm_unet(images.reshape(b * c, 1, h, w)).reshape(b, c, h, w)
        return maps / root_sum_of_squares(maps)


class VarNetCascade(nn.Module):
    """One cascade on coil images: ``DC(x; k0, M, lam) - S * U(sum_c conj(S_c) x_c)``."""

    def __init__(self, chans: int, pools: int):
        super().__init__()
        self.regularizer = NormUnet(chans, pools)
        self.dc_weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, k0: torch.Tensor, mask: torch.Tensor,
                sens: torch.Tensor) -> torch.Tensor:
        combined = (sens.conj() * x).sum(1, keepdim=True)                   # [B, 1, H, W]
        refined = data_consistency(x, k0, mask, self.dc_weight, centered=True, output="complex")
        return refined - sens * self.regularizer(combined)


class VarNet(nn.Module):
    """E2E-VarNet (module docstring). ``forward(k0 [B, C, H, W] complex, mask [B, 1, 1, W])``
    returns the RSS image ``[B, 1, H, W]``."""

    def __init__(self, num_cascades: int = 12, chans: int = 18, pools: int = 4,
                 sens_chans: int = 8, sens_pools: int = 4):
        super().__init__()
        for name, value in (("num_cascades", num_cascades), ("chans", chans), ("pools", pools),
                            ("sens_chans", sens_chans), ("sens_pools", sens_pools)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VarNet {name}: expected a positive integer, found {value!r}")
        self.num_cascades, self.pools = num_cascades, pools
        self.sens_net = SensitivityModel(sens_chans, sens_pools)
        self.cascades = nn.ModuleList(VarNetCascade(chans, pools) for _ in range(num_cascades))
        self.feature_layers = (
            *(f"cascades.{t}.regularizer.unet.bottleneck" for t in range(num_cascades)),
            *(f"cascades.{t}" for t in range(num_cascades)))

    def forward(self, k0: torch.Tensor, mask: torch.Tensor, return_features: bool = False):
        if not k0.is_complex() or k0.dim() != 4 or mask.dim() != 4:
            raise ValueError(f"VarNet: expected complex k-space [B, C, H, W] and a mask "
                             f"[B, 1, 1, W], found {k0.dtype} {tuple(k0.shape)} and "
                             f"{tuple(mask.shape)}")
        sens = self.sens_net(k0, mask)
        x = coil_images(k0)
        bottlenecks, outputs = [], []
        hooks = ([c.regularizer.unet.bottleneck.register_forward_hook(
            lambda module, args, out: bottlenecks.append(out)) for c in self.cascades]
            if return_features else [])
        try:
            for cascade in self.cascades:
                x = cascade(x, k0, mask, sens)
                outputs.append(x)
        finally:
            for hook in hooks:
                hook.remove()
        image = root_sum_of_squares(x)
        return (image, [*bottlenecks, *outputs]) if return_features else image
