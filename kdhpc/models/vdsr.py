"""VDSR for same-grid MRI super-resolution (KD-MRI's SR teacher and student).

Architecture (REFERENCE.md s.1): ``n_convs`` 3x3 convolutions, stride 1, padding 1, bias,
``1 -> C, (n_convs - 2) x (C -> C), C -> 1`` with ReLU after every convolution but the last, and a
global residual:

    y = x + f(x)

The low-resolution input already lies on the output grid (magnitude of the IFFT of the central
k-space block, zero-filled), so there is no upsampler. Teacher: 11 convs, C = 64, 333,569
parameters; student: 7 convs, 185,857 parameters.

Feature taps (see :mod:`kdhpc.models`): the ReLU output of convolution number ``feature_conv``
(1-based), by default the middle one, ``(n_convs + 1) // 2``: conv6 of the teacher, conv4 of the
student, KD-MRI's attention-transfer pair.
"""

from __future__ import annotations

import torch
from torch import nn

from kdhpc.models.dccnn import Conv3x3


class VDSR(nn.Module):
    """VDSR: plain conv-ReLU stack with a global residual, same grid in and out.

    Args:
        n_convs: number of 3x3 convolutions (>= 2); 11 for the teacher, 7 for the student.
        channels: width of the hidden convolutions.
        feature_conv: 1-based index of the convolution whose ReLU output is the feature tap;
            None = ``(n_convs + 1) // 2``.
        in_channels: image channels (1: a real magnitude image).
    """

    def __init__(self, n_convs: int = 11, channels: int = 64, feature_conv: int | None = None,
                 in_channels: int = 1):
        super().__init__()
        if n_convs < 2:
            raise ValueError(f"VDSR n_convs: expected >= 2, found {n_convs}")
        feature_conv = (n_convs + 1) // 2 if feature_conv is None else feature_conv
        if not 1 <= feature_conv <= n_convs - 1:
            raise ValueError(f"VDSR feature_conv: expected 1..{n_convs - 1} (a conv followed by "
                             f"a ReLU), found {feature_conv}")
        widths = [in_channels] + [channels] * (n_convs - 1) + [in_channels]
        # Conv3x3: the 64 -> 1 last conv runs as a GEMM (see kdhpc.models.dccnn.conv3x3).
        self.convs = nn.ModuleList(Conv3x3(widths[i], widths[i + 1]) for i in range(n_convs))
        # One ReLU instance per conv so that each activation is addressable by name (hooks).
        self.acts = nn.ModuleList(nn.ReLU(inplace=True) for _ in range(n_convs - 1))
        # He initialisation as in the VDSR paper: PyTorch's default shrinks the signal ~3x per
        # layer, which starves an 11-layer plain ReLU stack.
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.feature_index = feature_conv - 1
        self.feature_layers = (f"acts.{self.feature_index}",)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """``x`` [B, 1, H, W] -> ``x + f(x)`` [B, 1, H, W]; with ``return_features`` also the
        list of feature taps ``[ReLU(conv_k)]`` ([B, C, H, W])."""
        if x.dim() != 4:
            raise ValueError(f"VDSR input: expected [B, C, H, W], found shape {tuple(x.shape)}")
        h = x
        features = []
        for i, act in enumerate(self.acts):
            h = act(self.convs[i](h))  # [B, C, H, W]
            if i == self.feature_index:
                features.append(h)
        out = x + self.convs[-1](h)  # [B, 1, H, W]
        return (out, features) if return_features else out
