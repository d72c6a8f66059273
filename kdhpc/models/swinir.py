"""SwinIR for same-grid MRI enhancement (Shou et al.'s model-based teacher).

Architecture (Liang et al. 2021, the denoising variant: no upsampler, input and output on one grid):

    f0 = conv_first(x)                              # conv3x3, in -> D
    t  = tokens(f0)                                 # [B, H*W, D]
    t  = RSTB_k(... RSTB_1(t))                      # residual Swin transformer blocks
    f  = f0 + conv_after_body(image(LayerNorm(t)))
    y  = x + conv_last(f)                           # conv3x3, D -> in; image residual

    RSTB(t)  = t + conv3x3(image(STL_depth(... STL_1(t))))
    STL(t)   = t' + MLP(LN(t')),  t' = t + W-MSA(LN(t))  (windows of M x M tokens; every second
               layer shifts the windows by M // 2 with a cyclic roll)
    W-MSA    : softmax(q k^T / sqrt(d_h) + B_rel + mask) v per window and head; B_rel is the learned
               relative position bias, ((2M - 1)^2 entries per head).

Sizes not divisible by the window: each Swin layer zero-pads its tokens up to multiples of M,
masks the padded tokens out as keys, and crops them afterwards. The convolutions never see
padding other than their own zero padding, so the output on an H x W image does not depend on
the pad (SwinIR itself reflect-pads the image, which lets pad content leak in). Masked logits get
``MASK_LOGIT`` (-1e4: exp underflows to exactly 0 in fp32/bf16, yet a query whose keys are all
masked, possible only for pad queries that are discarded, stays finite, unlike -inf).

Named sizes in :mod:`kdhpc.models`: ``swinir_denoise`` (published grey denoising: D 180, depths
[6]*6, heads [6]*6, window 8, mlp_ratio 2), ``swinir_lightweight_sr`` (published lightweight SR
body: D 60, depths [6]*4, heads [6]*4, used here on the same grid), ``swinir_small`` (CPU).
Stochastic depth (drop_path) of the published training recipe is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdhpc.models.dccnn import Conv3x3  # the D -> 1 output conv as a GEMM

MASK_LOGIT = -1e4


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of ``window``) -> [B * nW, window * window, C], windows in
    row-major order over the image, tokens in row-major order inside a window."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nW, window * window, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def pad_to_window(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pad [B, H, W, C] at the bottom/right up to multiples of ``window``."""
    h, w = x.shape[1:3]
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def relative_position_index(window: int) -> torch.Tensor:
    """[N, N] index into the ((2M - 1)^2)-entry bias table for tokens i, j of one window
    (N = M^2): ``(dy + M - 1) * (2M - 1) + (dx + M - 1)`` with ``(dy, dx) = pos_i - pos_j``."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    rel = pos[:, :, None] - pos[:, None, :] + (window - 1)  # [2, N, N], in 0 .. 2M - 2
    return rel[0] * (2 * window - 1) + rel[1]


def attention_mask(h: int, w: int, window: int, shift: int,
                   device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Additive mask [nW, N, N] for the windows of an ``h x w`` image padded to multiples of
    ``window`` and rolled by ``-shift``; None when nothing is masked.

    Query i may attend key j of its window iff j is a real (not padded) token and, for shifted
    windows, i and j lie in the same region of the rolled grid, i.e. neither crossed the cyclic
    wrap without the other. Allowed pairs get 0, others ``MASK_LOGIT``.
    """
    hp, wp = h + (-h) % window, w + (-w) % window
    if shift == 0 and (hp, wp) == (h, w):
        return None
    region = torch.zeros(hp, wp, device=device)  # [Hp, Wp], region label in the rolled grid
    if shift:
        bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        label = 0
        for rows in bands:
            for cols in bands:
                region[rows, cols] = label
                label += 1
    valid = torch.zeros(hp, wp, device=device)  # [Hp, Wp], 1 = real token
    valid[:h, :w] = 1
    if shift:
        valid = torch.roll(valid, shifts=(-shift, -shift), dims=(0, 1))
    region = window_partition(region[None, :, :, None], window)[..., 0]  # [nW, N]
    valid = window_partition(valid[None, :, :, None], window)[..., 0]  # [nW, N]
    allowed = (region[:, :, None] == region[:, None, :]) & (valid[:, None, :] > 0)
    mask = torch.zeros(allowed.shape, device=device)
    return mask.masked_fill_(~allowed, MASK_LOGIT)  # [nW, N, N]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SwinIR: embed_dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.window = window
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` [B * nW, N, D]; ``mask`` [nW, N, N] or None -> [B * nW, N, D]."""
        bw, n, d = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B * nW, heads, N, d_h] each
        bias = self.bias_table[self.bias_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        # PyTorch's fused CPU attention is fastest with a mask of the full 4-D batch shape (a
        # stride-0 expand is free); 5-D inputs or a broadcast [heads, N, N] mask fall back to
        # slower paths, hence one call per image when the mask differs between windows.
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(bw, -1, -1, -1))
        else:
            nw = mask.shape[0]
            full = bias[None] + mask[:, None]  # [nW, heads, N, N]
            out = torch.cat([F.scaled_dot_product_attention(q[i:i + nw], k[i:i + nw],
                                                            v[i:i + nw], attn_mask=full)
                             for i in range(0, bw, nw)])  # [B * nW, heads, N, d_h]
        out = out.transpose(1, 2).reshape(bw, n, d)  # [B * nW, N, D]
        return self.proj(out)


class SwinLayer(nn.Module):
    """One Swin transformer layer (W-MSA or SW-MSA, then MLP), pre-norm, both residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, size: tuple[int, int], masks: dict) -> torch.Tensor:
        """``x`` [B, H*W, D] tokens of an H x W image; ``masks`` maps shift -> attention mask."""
        h, w = size
        b, _, d = x.shape
        y = pad_to_window(self.norm1(x).view(b, h, w, d), self.window)  # [B, Hp, Wp, D]
        hp, wp = y.shape[1:3]
        shift = self.shift if min(hp, wp) > self.window else 0
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), masks[shift])  # [B * nW, N, D]
        y = window_reverse(y, self.window, hp, wp)  # [B, Hp, Wp, D]
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + y[:, :h, :w].reshape(b, h * w, d)
        return x + self.mlp(self.norm2(x))


class RSTB(nn.Module):
    """Residual Swin transformer block: ``depth`` Swin layers, a 3x3 conv, a residual."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(
            SwinLayer(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth))
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int], masks: dict) -> torch.Tensor:
        h, w = size
        y = x
        for layer in self.layers:
            y = layer(y, size, masks)  # [B, H*W, D]
        y = self.conv(y.transpose(1, 2).reshape(x.shape[0], -1, h, w))  # [B, D, H, W]
        return x + y.flatten(2).transpose(1, 2)


class SwinIR(nn.Module):
    """Same-grid SwinIR (see the module docstring).

    Args:
        embed_dim: token width D.
        depths: Swin layers per RSTB.
        heads: attention heads per RSTB.
        window: window size M (tokens per side).
        mlp_ratio: MLP hidden width / D.
        in_channels: image channels (1: a magnitude image).
    """

    def __init__(self, embed_dim: int = 180, depths=(6, 6, 6, 6, 6, 6), heads=(6, 6, 6, 6, 6, 6),
                 window: int = 8, mlp_ratio: float = 2.0, in_channels: int = 1):
        super().__init__()
        depths, heads = list(depths), list(heads)
        if len(depths) != len(heads) or not depths:
            raise ValueError(f"SwinIR: depths and heads need one entry per RSTB, found depths="
                             f"{depths}, heads={heads}")
        if window < 2:
            raise ValueError(f"SwinIR window: expected >= 2, found {window}")
        self.window = window
        self.conv_first = Conv3x3(in_channels, embed_dim)
        self.blocks = nn.ModuleList(RSTB(embed_dim, d, nh, window, mlp_ratio)
                                    for d, nh in zip(depths, heads))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.conv_last = Conv3x3(embed_dim, in_channels)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        # Transformer-style init of the published model; convs keep PyTorch's default.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, H, W] (any H, W) -> enhanced image [B, C, H, W]."""
        if x.dim() != 4 or x.shape[1] != self.conv_first.in_channels:
            raise ValueError(f"SwinIR input: expected [B, {self.conv_first.in_channels}, H, W], "
                             f"found {tuple(x.shape)}")
        b, _, h, w = x.shape
        shift = self.window // 2
        masks = {0: attention_mask(h, w, self.window, 0, x.device),
                 shift: attention_mask(h, w, self.window, shift, x.device)}
        masks = {s: (m.to(x.dtype) if m is not None else None) for s, m in masks.items()}
        f0 = self.conv_first(x)  # [B, D, H, W]
        t = f0.flatten(2).transpose(1, 2)  # [B, H*W, D]
        for block in self.blocks:
            t = block(t, (h, w), masks)
        t = self.norm(t)
        f = f0 + self.conv_after_body(t.transpose(1, 2).reshape(b, -1, h, w))
        return x + self.conv_last(f)

