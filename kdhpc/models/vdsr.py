"""VDSR for same-grid MRI super-resolution (KD-MRI's SR teacher and student).

Architecture (docs/methods.md, KD-MRI's super-resolution variant): ``n_convs`` 3x3
convolutions, stride 1, padding 1, bias, ``1 -> C, (n_convs - 2) x (C -> C), C -> 1`` with ReLU
after every convolution but the last, and a global residual:

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

from kdhpc.models.dccnn import ConvStack


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
        self.body = ConvStack(n_convs, channels, feature_conv, in_channels)
        # He initialisation as in the VDSR paper: PyTorch's default shrinks the signal ~3x per
        # layer, which starves an 11-layer plain ReLU stack.
        for conv in self.body.convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.feature_layers = (f"body.acts.{self.body.feature_index}",)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """``x`` [B, 1, H, W] -> ``x + f(x)`` [B, 1, H, W]; with ``return_features`` also the
        list of feature taps ``[ReLU(conv_k)]`` ([B, C, H, W])."""
        if x.dim() != 4:
            raise ValueError(f"VDSR input: expected [B, C, H, W], found shape {tuple(x.shape)}")
        out, tap = self.body(x)  # [B, 1, H, W], [B, C, H, W]
        out = x + out
        return (out, [tap]) if return_features else out
