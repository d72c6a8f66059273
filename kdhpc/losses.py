"""Data losses and distillation terms, shared by the three recipes.

Every composite loss returns a dict of named scalar terms with the total under ``"loss"``, so the
engine can log and guard each term. Convention (docs/methods.md): ``alpha`` (and Cui et al.'s
``W``) is the weight of the distillation term; ``1 - alpha`` goes to the data term.

- reconstruction (KD-MRI):   ``alpha * L1(S, T) + (1 - alpha) * L1(S, Y)`` (imitation), and the
  attention-transfer stage ``L_AT`` alone (``kdhpc.ops.attention_map_loss``);
- enhancement (Shou et al.): ``alpha * L1(S, T) + (1 - alpha) * (w1 L1 + ws (1 - SSIM) + wp P)``;
- segmentation (Cui et al.): ``sum_i w_i ((1 - W) (Dice + CE)_i + W * T^2 KL(T_i/T || S_i/T))``
  (the T^2 factor lives in ``kdhpc.ops.softmax_kl``; ``kl_t2_scaling=False`` divides it back out).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdhpc.config import ConfigError
from kdhpc.metrics import ssim_torch
from kdhpc.models import EDSR, SwinIR
from kdhpc.ops import attention_map_loss, softmax_kl

Terms = dict[str, torch.Tensor]


def _total(terms: Terms, weights: dict[str, float]) -> Terms:
    """Add ``loss = sum_k weights[k] * terms[k]`` (terms with weight 0 are logged, not added)."""
    total = None
    for name, weight in weights.items():
        if weight:
            part = weight * terms[name]
            total = part if total is None else total + part
    if total is None:
        raise ValueError(f"loss: every weight is zero ({weights}); nothing to optimise")
    terms["loss"] = total
    return terms


# ---------------------------------------------------------------------------------------------
# data terms

def ssim_loss(pred: torch.Tensor, target: torch.Tensor,
              data_range: torch.Tensor | float | None = None) -> torch.Tensor:
    """``1 - SSIM`` with fastMRI's window (7x7 uniform, K1 .01, K2 .03) on ``[B, 1, H, W]``.

    ``data_range`` defaults to each target's max, as the fastMRI SSIM loss does.
    """
    if data_range is None:
        data_range = target.detach().flatten(1).amax(1).clamp_min(1e-12)
    return 1.0 - ssim_torch(pred, target, data_range, reduction="mean")


class PerceptualLoss(nn.Module):
    """Mean L1 distance between frozen features: ``P(x, y) = mean |phi(x) - phi(y)|``.

    Nothing may be downloaded, so there is no ImageNet VGG here: ``phi`` is an MRI-trained network
    given by the recipe (by default the frozen teacher's early layers; or a user checkpoint), kept
    in eval mode with gradients off for its weights but flowing to the input.
    """

    def __init__(self, feature_net: nn.Module):
        super().__init__()
        self.net = feature_net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # the feature network never leaves eval mode
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.net(target)
        return (self.net(pred) - ref).abs().mean()


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> Terms:
    """nnU-Net's Dice + CE (weights 1, 1) on ``logits [B, K, H, W]`` and ``labels [B, H, W]``.

    Soft Dice over foreground classes only (background excluded), computed over the whole batch
    (nnU-Net's batch Dice), ``dice = (2 I + smooth) / (P + G + smooth)``; the loss term is
    ``-mean_k dice_k`` as in nnU-Net v2, and CE is the pixel mean.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0],) + logits.shape[2:]:
        raise ValueError(f"dice_ce_loss: expected logits [B, K, H, W] and labels [B, H, W], "
                         f"found {tuple(logits.shape)} and {tuple(labels.shape)}")
    ce = F.cross_entropy(logits.float(), labels)
    probs = logits.float().softmax(1)[:, 1:]                        # [B, K-1, H, W]
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = ((2 * inter + smooth) / (denom + smooth)).mean()
    return {"ce": ce, "dice": -dice}


def deep_supervision_weights(levels: int, weights: Sequence[float] = ()) -> list[float]:
    """nnU-Net's weights ``1 / 2^i`` (highest resolution first), the lowest level 0, normalised
    to sum 1; or the given ``weights`` normalised."""
    w = list(weights) if weights else [1.0 / 2**i for i in range(levels)]
    if len(w) != levels:
        raise ValueError(f"loss.ds_weights: expected {levels} weights, found {len(w)}: {w}")
    if not weights and levels > 1:
        w[-1] = 0.0
    total = sum(w)
    if total <= 0:
        raise ValueError(f"loss.ds_weights: expected a positive sum, found {w}")
    return [x / total for x in w]


def _labels_at(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of integer labels to a deep-supervision resolution."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


# ---------------------------------------------------------------------------------------------
# recipe losses

def imitation_loss(pred: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None,
                   alpha: float) -> Terms:
    """KD-MRI step 3: ``alpha * L1(S, T) + (1 - alpha) * L1(S, Y)``; with no teacher, plain L1."""
    terms = {"l1": F.l1_loss(pred, target)}
    if teacher is None:
        return _total(terms, {"l1": 1.0})
    terms["imitation"] = F.l1_loss(pred, teacher)
    return _total(terms, {"imitation": alpha, "l1": 1.0 - alpha})


def imitation_loss_with_unlabelled(pred: torch.Tensor, target: torch.Tensor,
                                   teacher: torch.Tensor, alpha: float,
                                   labelled: torch.Tensor) -> Terms:
    """:func:`imitation_loss` over a batch where some samples have no target (``labelled`` [B]
    is 0 there): per sample ``alpha L1(S, T) + (1 - alpha) L1(S, Y)`` when labelled, ``L1(S, T)``
    (the teacher, the only target) when not; the loss is the mean over samples, so an all-
    labelled batch gives :func:`imitation_loss` exactly. ``l1`` is logged over the labelled
    samples (0 without any)."""
    per_sample = lambda x: x.abs().flatten(1).mean(1)  # noqa: E731
    weight = labelled.to(pred.dtype).reshape(-1)
    imitation = per_sample(pred - teacher)
    data = per_sample(pred - target)
    loss = ((alpha * weight + (1.0 - weight)) * imitation + (1.0 - alpha) * weight * data).mean()
    return {"imitation": imitation.mean(), "l1": (weight * data).sum() / weight.sum().clamp_min(1),
            "unlabelled_share": (1.0 - weight).mean().detach(), "loss": loss}


def attention_transfer_loss(student_features: Sequence[torch.Tensor],
                            teacher: Sequence[torch.Tensor], p: float = 2.0,
                            mode: str = "paper") -> Terms:
    """KD-MRI step 2: attention transfer alone over the tapped layer pairs (teacher features or
    precomputed teacher maps, see ``kdhpc.ops.attention_map_loss``)."""
    return _total({"at": attention_map_loss(list(student_features), list(teacher), p=p,
                                            mode=mode)}, {"at": 1.0})


def enhancement_loss(pred: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None,
                     alpha: float, l1_weight: float = 1.0, ssim_weight: float = 0.0,
                     perceptual: PerceptualLoss | None = None,
                     perceptual_weight: float = 0.0,
                     data_range: torch.Tensor | float | None = None) -> Terms:
    """Shou et al.: ``alpha * L1(S, T) + (1 - alpha) * (w1 L1 + ws (1 - SSIM) + wp P)``.

    ``teacher=None`` gives the data term alone (the no-KD model). ``data_range`` (scalar or
    ``[B]``) is SSIM's R; pass the whole slice's maximum when training on patches, where a
    patch's own maximum (the default) would make a background patch's noise look like structure.
    """
    terms: Terms = {"l1": F.l1_loss(pred, target)}
    data_weights = {"l1": l1_weight}
    if ssim_weight:
        terms["ssim"] = ssim_loss(pred, target, data_range)
        data_weights["ssim"] = ssim_weight
    if perceptual_weight:
        if perceptual is None:
            raise ValueError("loss.perceptual_weight > 0 but no perceptual feature network given")
        terms["perceptual"] = perceptual(pred, target)
        data_weights["perceptual"] = perceptual_weight
    if teacher is None:
        return _total(terms, data_weights)
    terms["kd"] = F.l1_loss(pred, teacher)
    weights = {k: (1.0 - alpha) * w for k, w in data_weights.items()}
    weights["kd"] = alpha
    return _total(terms, weights)


def segmentation_kd_loss(student: Sequence[torch.Tensor], labels: torch.Tensor,
                         teacher: Sequence[torch.Tensor] | None, weight: float,
                         temperature: float, ds_weights: Sequence[float] = (),
                         t2_scaling: bool = True) -> Terms:
    """Cui et al.: ``sum_i w_i ((1 - W) (Dice + CE)_i + W * T^2 KL(T_i/T || S_i/T))``.

    ``student`` / ``teacher`` are deep-supervision logits, highest resolution first; labels are
    at the highest resolution and downsampled (nearest) to each level. The KL is summed over
    classes and averaged over pixels (``reduction="mean"`` of ``softmax_kl``) so that it is on
    the scale of the pixel-mean CE it is mixed with.
    """
    w = deep_supervision_weights(len(student), ds_weights)
    if teacher is not None and len(teacher) != len(student):
        raise ValueError(f"segmentation_kd_loss: {len(student)} student levels but "
                         f"{len(teacher)} teacher levels")
    terms: Terms = {}
    hard = kd = None
    for i, (wi, logits) in enumerate(zip(w, student)):
        if wi == 0:
            continue
        level = dice_ce_loss(logits, _labels_at(labels, logits.shape[-2:]))
        part = wi * (level["ce"] + level["dice"])
        hard = part if hard is None else hard + part
        if teacher is not None:
            kl = softmax_kl(logits, teacher[i], temperature, dim=1, reduction="mean")
            if not t2_scaling:
                kl = kl / temperature**2
            kd = wi * kl if kd is None else kd + wi * kl
    terms["dice_ce"] = hard
    if teacher is None:
        return _total(terms, {"dice_ce": 1.0})
    terms["kl"] = kd
    return _total(terms, {"dice_ce": 1.0 - weight, "kl": weight})


PERCEPTUAL_DEPTH = 1
"""Early layers of the perceptual feature network: the input conv plus this many Swin layers
(SwinIR) or residual blocks (EDSR)."""


class EarlyLayers(nn.Module):
    """Frozen early layers of a trained SwinIR or EDSR as a perceptual feature network.

    SwinIR: ``conv_first`` then the first ``depth`` Swin layers of its first RSTB, returned as
    ``[B, D, H, W]``; EDSR: ``head`` then the first ``depth`` residual blocks (no FiLM).
    """

    def __init__(self, model: nn.Module, depth: int = PERCEPTUAL_DEPTH):
        super().__init__()
        if isinstance(model, SwinIR):
            layers = [layer for block in model.blocks for layer in block.layers][:depth]
            self.stem, self.layers, self.window = model.conv_first, nn.ModuleList(layers), \
                model.window
        elif isinstance(model, EDSR):
            self.stem, self.layers, self.window = model.head, nn.ModuleList(
                list(model.blocks)[:depth]), None
        else:
            raise ConfigError(f"loss.perceptual_checkpoint: expected a SwinIR or EDSR feature "
                              f"network, found {type(model).__name__}")
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)  # [B, D, H, W]
        if self.window is None:
            for block in self.layers:
                f = block(f)
            return f
        from kdhpc.models.swinir import attention_mask

        b, d, h, w = f.shape
        shift = self.window // 2
        masks = {s: attention_mask(h, w, self.window, s, x.device) for s in (0, shift)}
        masks = {s: (m.to(f.dtype) if m is not None else None) for s, m in masks.items()}
        t = f.flatten(2).transpose(1, 2)  # [B, H*W, D]
        for layer in self.layers:
            t = layer(t, (h, w), masks)
        return t.transpose(1, 2).reshape(b, d, h, w)
