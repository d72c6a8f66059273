"""2-D nnU-Net-style U-Net with deep supervision (Cui et al.'s segmentation teacher).

Architecture (Isensee et al., nnU-Net's 2-D "PlainConvUNet" for a 192 x 192 cine slice):

- encoder stage s (s = 0 .. S-1) at resolution 192 / 2^s with ``F_s = min(base * 2^s, max)``
  features: two ``conv3x3 -> InstanceNorm(affine) -> LeakyReLU(0.01)``; the first conv of every
  stage but the first has stride 2 (strided-conv downsampling, no pooling);
- decoder stage s (s = S-2 .. 0): ``ConvTranspose2d(F_{s+1} -> F_s, k=2, stride=2)``, concatenate
  the encoder's stage-s output (skip first), two conv-norm-act blocks;
- deep supervision: a 1x1 conv to K classes on the outputs of the ``n_heads`` highest-resolution
  decoder stages.

Defaults: S = 6 (192 -> 6 pixels at the bottom, as nnU-Net plans for this patch), base 32,
max 512, K = 4 (0 bg, 1 RV, 2 myocardium, 3 LV), 4 heads.

Output convention (teacher and student alike): ``forward`` always returns the list of
``n_heads`` logits, highest resolution first, ``[B, K, H / 2^i, W / 2^i]`` for i = 0 .. n_heads-1,
in training and in eval mode. Mode-dependent return types would break distillation, whose frozen
eval-mode teacher must still give all four levels; the prediction is ``model(x)[0]``
(:func:`segment`), and the three extra 1x1 heads cost < 0.1% of the network.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def check_segmentation_input(model: nn.Module, x: torch.Tensor, in_channels: int,
                             divisor: int) -> None:
    """Raise a clear error unless ``x`` is [B, in_channels, H, W] with H, W divisible by
    ``divisor`` (every downsampling must halve exactly for the skips to line up)."""
    name = type(model).__name__
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name} input: expected [B, {in_channels}, H, W], found "
                         f"{tuple(x.shape)}")
    if x.shape[-2] % divisor or x.shape[-1] % divisor:
        raise ValueError(f"{name} input: expected H and W divisible by {divisor} (2^downsamplings),"
                         f" found {tuple(x.shape[-2:])}; pad or crop the image (192 x 192 works)")


class DeepSupervisionHeads(nn.Module):
    """1x1 convs to class logits, one per decoder output, highest resolution first."""

    def __init__(self, channels: Sequence[int], n_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(c, n_classes, 1) for c in channels)

    def forward(self, decoder_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``decoder_outputs[i]`` [B, C_i, H / 2^i, W / 2^i] -> logits [B, K, H / 2^i, W / 2^i]."""
        return [head(d) for head, d in zip(self.heads, decoder_outputs)]


def decode(skips: Sequence[torch.Tensor], up: nn.ModuleList, decoder: nn.ModuleList
           ) -> list[torch.Tensor]:
    """U-Net decoder pass: from the deepest skip upwards, ``h = decoder[l](cat(skip_l, up[l](h)))``.

    ``skips[l]`` [B, C_l, H / 2^l, W / 2^l] are the encoder outputs (the last one is the
    bottleneck); returns the decoder outputs of levels 0 .. L-2, highest resolution first.
    """
    h = skips[-1]
    decoded = []
    for lvl in reversed(range(len(decoder))):
        h = decoder[lvl](torch.cat([skips[lvl], up[lvl](h)], dim=1))  # [B, C_l, ...]
        decoded.append(h)
    return decoded[::-1]


def segment(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full-resolution logits [B, K, H, W] of a deep-supervision model (its first output)."""
    return model(x)[0]


class ConvNormAct(nn.Sequential):
    """conv3x3 (bias, nnU-Net keeps it) -> InstanceNorm2d(affine) -> LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                         nn.InstanceNorm2d(cout, eps=1e-5, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class UNet(nn.Module):
    """nnU-Net-style 2-D U-Net with deep supervision (see the module docstring).

    Args:
        in_channels: image channels (1).
        n_classes: output classes K (4).
        base_features: features of the first stage (32).
        max_features: cap on features per stage (512).
        n_stages: encoder stages S (6: 192 -> 6 pixels).
        n_heads: deep-supervision heads at the highest-resolution decoder stages (<= S - 1).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 4, base_features: int = 32,
                 max_features: int = 512, n_stages: int = 6, n_heads: int = 4):
        super().__init__()
        if n_stages < 2 or not 1 <= n_heads <= n_stages - 1:
            raise ValueError(f"UNet: expected n_stages >= 2 and 1 <= n_heads <= n_stages - 1, "
                             f"found n_stages={n_stages}, n_heads={n_heads}")
        widths = [min(base_features * 2 ** s, max_features) for s in range(n_stages)]
        self.in_channels = in_channels
        self.divisor = 2 ** (n_stages - 1)
        self.encoder = nn.ModuleList(
            nn.Sequential(ConvNormAct(in_channels if s == 0 else widths[s - 1], widths[s],
                                      stride=1 if s == 0 else 2),
                          ConvNormAct(widths[s], widths[s]))
            for s in range(n_stages))
        # Index s of up / decoder builds the stage-s (resolution 2^-s) decoder output.
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[s + 1], widths[s], 2, stride=2)
                                for s in range(n_stages - 1))
        self.decoder = nn.ModuleList(
            nn.Sequential(ConvNormAct(2 * widths[s], widths[s]), ConvNormAct(widths[s], widths[s]))
            for s in range(n_stages - 1))
        self.heads = DeepSupervisionHeads(widths[:n_heads], n_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` [B, 1, H, W] -> ``n_heads`` logits [B, K, H / 2^i, W / 2^i], highest first."""
        check_segmentation_input(self, x, self.in_channels, self.divisor)
        skips = []
        h = x
        for stage in self.encoder:
            h = stage(h)  # [B, F_s, H / 2^s, W / 2^s]
            skips.append(h)
        decoded = decode(skips, self.up, self.decoder)
        return self.heads(decoded[:len(self.heads.heads)])
