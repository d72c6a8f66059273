"""U-Net whose encoder is built of MobileNetV2 inverted residual blocks (Cui et al.'s student).

Inverted residual block (Sandler et al. 2018), expansion t, stride s:

    IR(x) = [x +] BN(conv1x1_{tC -> C'}(ReLU6(BN(dwconv3x3_s(ReLU6(BN(conv1x1_{C -> tC}(x))))))))

The 1x1 projection is linear (no activation); the identity shortcut exists iff s = 1 and C = C'.
BatchNorm (not InstanceNorm) as in MobileNetV2: at inference it is a per-channel affine map.

Encoder: level 0 is MobileNetV2's plain stem, ``conv3x3 (1 -> c_0) -> BN -> ReLU6`` at full
resolution; each level l = 1 .. L-1 is an IR block of stride 2 (c_{l-1} -> c_l) followed by
``blocks_per_level[l-1] - 1`` IR blocks of stride 1 (with the identity shortcut). Decoder: per
level l = L-2 .. 0, a 2x2 transposed conv (c_{l+1} -> c_l, stride 2), concatenation with the
encoder's level-l output (skip first) and one IR block (2 c_l -> c_l, expansion
``decoder_expansion``). Deep-supervision heads: 1x1 convs at the
4 highest resolutions, like the teacher, with the same output convention
(:mod:`kdhpc.models.unet`): ``forward`` always returns the list, highest resolution first.

Defaults, sized for the real-time goal (>= 10 images/s at 192 x 192, batch 1, on one CPU thread,
and >= 5x the teacher's rate; ``benchmarks/inference.py`` measures it): channels
(8, 16, 32, 64, 128), expansion 8 (the paper's selected student), one IR block at 96 x 96 and two
at each lower level, decoder expansion 2. Cost on a CPU is set by the expanded tensors at the
top levels, not by FLOPs: 8 x 8 = 64 channels at 192 x 192 (the stride-2 block's expansion) is
already the most expensive layer, which is why level 0 is the plain stem, the 96 x 96 level has
a single block, and width is spent at the cheap low resolutions instead. Decoder blocks see
concatenated skips (twice as wide), so they expand 2x only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdhpc.models.unet import DeepSupervisionHeads, check_segmentation_input, decode


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise 3x3 (stride) -> linear project 1x1."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expansion: float = 8):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride: expected 1 or 2, found {stride}")
        if expansion < 1:
            raise ValueError(f"InvertedResidual expansion: expected >= 1, found {expansion}")
        hidden = int(round(cin * expansion))
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden,
                             bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)  # [B, C', H / s, W / s]
        return x + y if self.use_residual else y


class MobileNetUNet(nn.Module):
    """U-Net with a MobileNetV2 encoder and deep supervision (see the module docstring).

    Args:
        in_channels: image channels (1).
        n_classes: output classes K (4).
        channels: features per level, highest resolution first; L = len(channels) levels.
        expansion: expansion of the encoder's inverted residual blocks (8 in the paper).
        decoder_expansion: expansion of the decoder's inverted residual blocks.
        blocks_per_level: IR blocks per encoder level below the first (one int for all, or
            one per level).
        n_heads: deep-supervision heads (<= L - 1).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 4,
                 channels: Sequence[int] = (8, 16, 32, 64, 128), expansion: float = 8,
                 decoder_expansion: float = 2,
                 blocks_per_level: int | Sequence[int] = (1, 2, 2, 2),
                 n_heads: int = 4):
        super().__init__()
        channels = list(channels)
        levels = len(channels)
        if isinstance(blocks_per_level, int):
            blocks_per_level = [blocks_per_level] * (levels - 1)
        blocks_per_level = list(blocks_per_level)
        if (levels < 2 or not 1 <= n_heads <= levels - 1 or len(blocks_per_level) != levels - 1
                or min(blocks_per_level) < 1):
            raise ValueError(f"MobileNetUNet: expected >= 2 levels, 1 <= n_heads <= levels - 1 "
                             f"and blocks_per_level >= 1 (one int, or one per level below the "
                             f"first), found channels={channels}, "
                             f"n_heads={n_heads}, blocks_per_level={blocks_per_level}")
        self.in_channels = in_channels
        self.divisor = 2 ** (levels - 1)
        # Level 0 is MobileNetV2's plain conv stem, kept at full resolution for the top skip and
        # head; an inverted residual block there would expand c_0 x t channels at H x W.
        encoder: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]), nn.ReLU6(inplace=True))]
        for lvl in range(1, levels):
            encoder.append(nn.Sequential(
                InvertedResidual(channels[lvl - 1], channels[lvl], 2, expansion),
                *(InvertedResidual(channels[lvl], channels[lvl], 1, expansion)
                  for _ in range(blocks_per_level[lvl - 1] - 1))))
        self.encoder = nn.ModuleList(encoder)
        # Index l of up / decoder builds the level-l (resolution 2^-l) decoder output.
        self.up = nn.ModuleList(nn.ConvTranspose2d(channels[lvl + 1], channels[lvl], 2, stride=2)
                                for lvl in range(levels - 1))
        self.decoder = nn.ModuleList(
            InvertedResidual(2 * channels[lvl], channels[lvl], 1, decoder_expansion)
            for lvl in range(levels - 1))
        self.heads = DeepSupervisionHeads(channels[:n_heads], n_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` [B, 1, H, W] -> ``n_heads`` logits [B, K, H / 2^i, W / 2^i], highest first."""
        check_segmentation_input(self, x, self.in_channels, self.divisor)
        h = x
        skips = []
        for level in self.encoder:
            h = level(h)  # [B, c_l, H / 2^l, W / 2^l]
            skips.append(h)
        decoded = decode(skips, self.up, self.decoder)
        return self.heads(decoded[:len(self.heads.heads)])
