"""DC-CNN: cascades of a small CNN and a data-consistency step (KD-MRI's reconstruction nets).

Architecture (docs/methods.md; KD-MRI's ``reconstruction/models.py``): ``n_cascades`` times

    z = CNN_c(x)                                  # 3x3 convs, 32 ch, bias, ReLU but the last, no BN
    x = Re(IFFT2(M * k0 + (1 - M) * FFT2(z)))    # hard DC, lam = 1 (orthonormal FFT)

with ``CNN_c = conv(1->C), (n_convs - 2) x conv(C->C), conv(C->1)``. There is no residual
connection inside a cascade: the CNN output goes straight into DC. The general soft DC is
``k + lam * M * (k0 - k)``; ``lam = 1`` is KD-MRI's hard replacement. The DC step is
:func:`kdhpc.ops.data_consistency.data_consistency` (C++/CUDA fast path with a PyTorch reference).

Teacher: 5 cascades x 5 convs, 141,765 parameters; student: 5 x 3 convs, 49,285 parameters.

FFT layout: ``centered=False`` is KD-MRI's unshifted k-space (DC at index 0);
``centered=True`` is fastMRI's centred k-space (see :mod:`kdhpc.data.degrade`).

Feature taps (see :mod:`kdhpc.models`): in every cascade the ReLU output of convolution number
``feature_conv`` (1-based), by default the middle one, ``(n_convs + 1) // 2``: conv3 of the
teacher, conv2 of the student, KD-MRI's attention-transfer pairs (one per cascade).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdhpc.ops.data_consistency import data_consistency


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel; a C -> 1 conv runs as a GEMM.

    oneDNN's direct kernel runs a C -> 1 conv about 5x slower than a GEMM of the same FLOPs
    (32 -> 1 at 320 x 320, one thread: 13.6 ms vs 2.8 ms; 32 -> 32, with 32x the FLOPs, takes
    20 ms). Every DC-CNN cascade ends in one, in teacher and student alike, so this fixed cost
    decides how much of the teacher/student FLOP ratio survives. With ``k = (dy, dx)`` the 9 taps:

        t = W[C, 9]^T @ x[C, H*W]                          # [9, H, W], each tap's contribution
        y[i, j] = b + sum_k t_k[i + dy_k - 1, j + dx_k - 1]   # zero outside the image

    (the C -> 1 counterpart of im2col: a col2im of 9 shifted adds on a single channel). Other
    shapes (1 -> C included: oneDNN is fast there once freed memory is not returned to the OS,
    see ``benchmarks/inference.py``) go to ``F.conv2d``. Same values up to float summation
    order; differentiable.
    """
    b, cin, h, w = x.shape
    if weight.shape[0] != 1 or weight.shape[-2:] != (3, 3) or cin == 1:
        return F.conv2d(x, weight, bias, padding=1)
    # bmm, not matmul: for a weight that requires grad, matmul folds the product the other way
    # round and returns taps with a pixel stride of 9, which makes the shifted adds 4x slower.
    taps = torch.bmm(weight.reshape(cin, 9).t().expand(b, 9, cin),
                     x.reshape(b, cin, h * w))  # [B, 9, H*W], contiguous
    taps = taps.view(b, 9, h, w)
    y = taps[:, 4:5].clone() if bias is None else taps[:, 4:5] + bias.view(1, 1, 1, 1)
    for k in (0, 1, 2, 3, 5, 6, 7, 8):  # the centre tap (4) started the sum
        oy, ox = k // 3 - 1, k % 3 - 1
        i0, i1, j0, j1 = max(0, -oy), h - max(0, oy), max(0, -ox), w - max(0, ox)
        y[:, :, i0:i1, j0:j1] += taps[:, k:k + 1, i0 + oy:i1 + oy, j0 + ox:j1 + ox]
    return y  # [B, 1, H, W]


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(cin, cout, 3, padding=1)`` (same parameters and state-dict keys) whose forward
    is :func:`conv3x3`, so that a C -> 1 conv takes the GEMM form and hooks still see it."""

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(x, self.weight, self.bias)


class ConvStack(nn.Module):
    """Plain 3x3 conv stack ``in -> C, (n_convs - 2) x (C -> C), C -> in``, bias, ReLU after every
    conv but the last, no norm: a DC-CNN cascade's CNN and VDSR's body.

    ``forward`` returns the output and the feature tap, the ReLU output of conv number
    ``feature_conv`` (1-based; None = the middle one, ``(n_convs + 1) // 2``).
    """

    def __init__(self, n_convs: int, channels: int, feature_conv: int | None = None,
                 in_channels: int = 1):
        super().__init__()
        if n_convs < 2:
            raise ValueError(f"n_convs: expected >= 2, found {n_convs}")
        feature_conv = (n_convs + 1) // 2 if feature_conv is None else feature_conv
        if not 1 <= feature_conv <= n_convs - 1:
            raise ValueError(f"feature_conv: expected 1..{n_convs - 1} (a conv followed by a "
                             f"ReLU), found {feature_conv}")
        widths = [in_channels] + [channels] * (n_convs - 1) + [in_channels]
        self.convs = nn.ModuleList(Conv3x3(widths[i], widths[i + 1]) for i in range(n_convs))
        # One ReLU instance per conv so that each activation is addressable by name (hooks).
        self.acts = nn.ModuleList(nn.ReLU(inplace=True) for _ in range(n_convs - 1))
        self.feature_index = feature_conv - 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        tap = x
        for i, act in enumerate(self.acts):
            h = act(self.convs[i](h))  # [B, C, H, W]
            if i == self.feature_index:
                tap = h
        return self.convs[-1](h), tap  # [B, in, H, W], [B, C, H, W]


class DCCNN(nn.Module):
    """Cascaded CNN + hard data consistency, image domain, one real channel.

    Args:
        n_cascades: CNN + DC blocks (5 in KD-MRI).
        n_convs: convolutions per cascade CNN (teacher 5, student 3; >= 2).
        channels: hidden width (32 in KD-MRI).
        feature_conv: 1-based conv whose ReLU output is tapped in each cascade;
            None = ``(n_convs + 1) // 2``.
        centered: k-space layout of ``k0`` and ``mask`` (False: KD-MRI, True: fastMRI).
        dc_lam: DC weight ``lam`` in ``k + lam * M * (k0 - k)``; 1 = hard replacement.
    """

    def __init__(self, n_cascades: int = 5, n_convs: int = 5, channels: int = 32,
                 feature_conv: int | None = None, centered: bool = False, dc_lam: float = 1.0):
        super().__init__()
        if n_cascades < 1:
            raise ValueError(f"DCCNN n_cascades: expected >= 1, found {n_cascades}")
        self.cascades = nn.ModuleList(ConvStack(n_convs, channels, feature_conv)
                                      for _ in range(n_cascades))
        self.centered = bool(centered)
        self.dc_lam = float(dc_lam)
        tap = self.cascades[0].feature_index
        self.feature_layers = tuple(f"cascades.{c}.acts.{tap}" for c in range(n_cascades))

    def forward(self, x_zf: torch.Tensor, k0: torch.Tensor, mask: torch.Tensor,
                return_features: bool = False):
        """Reconstruct from the zero-filled image.

        Args:
            x_zf: zero-filled image, real, [B, 1, H, W].
            k0: measured k-space, complex, [B, 1, H, W] (zeros off the mask).
            mask: sampling mask, broadcastable to [H, W] ([H, 1], [1, W] or [H, W]), 1 = sampled.
            return_features: also return the per-cascade feature taps.

        Returns:
            the reconstruction [B, 1, H, W], or ``(reconstruction, [tap_c] * n_cascades)`` with
            ``tap_c`` [B, C, H, W].
        """
        if x_zf.dim() != 4 or x_zf.shape[1] != 1 or x_zf.is_complex():
            raise ValueError(f"DCCNN x_zf: expected a real [B, 1, H, W] image, found "
                             f"{tuple(x_zf.shape)} {x_zf.dtype}")
        if tuple(k0.shape) != tuple(x_zf.shape) or not k0.is_complex():
            raise ValueError(f"DCCNN k0: expected complex k-space of shape {tuple(x_zf.shape)}, "
                             f"found {tuple(k0.shape)} {k0.dtype}")
        x = x_zf
        features = []
        for cascade in self.cascades:
            z, tap = cascade(x)  # [B, 1, H, W], [B, C, H, W]
            features.append(tap)
            x = data_consistency(z, k0, mask, lam=self.dc_lam, centered=self.centered,
                                 output="real")  # [B, 1, H, W]
        return (x, features) if return_features else x
