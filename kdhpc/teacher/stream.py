"""Streamed teacher: the frozen teacher runs on exactly the views the student sees.

``StreamTeacher(model, extract)`` is a plain module replicated on every rank, never handed to
DeepSpeed (ZeRO-3 partitioning a frozen teacher is a known source of DeepSpeed crashes).
Its parameters are frozen, it stays in eval mode and runs under ``torch.inference_mode()``,
optionally under bf16 autocast; it moves itself to the device of the batch it is given.

``extract(model, batch) -> dict[str, Tensor]`` is the recipe's: it runs the teacher on the
batch's input and returns what the distillation loss needs, each entry with a leading batch
dimension, e.g. ``{"output": [B, 1, H, W], "attention_0": [B, 1, H, W], "logits_0": [B, K, H,
W]}`` (attention maps as ``kdhpc.ops.attention_map`` makes them, one normalised channel per
tapped layer; logits per deep-supervision level so a temperature can be swept later). The same
function fills the teacher cache (:mod:`kdhpc.teacher.cache`), which is why a cached target
equals the streamed one up to the stored dtype.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

Extract = Callable[[nn.Module, dict], dict]


def check_targets(targets, batch_size: int, where: str) -> dict[str, torch.Tensor]:
    """Raise unless ``targets`` maps names to floating tensors with leading dim ``batch_size``."""
    if not isinstance(targets, dict) or not targets:
        raise TypeError(f"{where}: expected a non-empty dict of tensors, found "
                        f"{type(targets).__name__ if not isinstance(targets, dict) else '{}'}")
    for name, value in targets.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{where}: '{name}': expected a floating-point tensor, found "
                            f"{getattr(value, 'dtype', type(value).__name__)}")
        if value.dim() == 0 or value.shape[0] != batch_size:
            raise ValueError(f"{where}: '{name}': expected shape [{batch_size}, ...], found "
                             f"{list(value.shape)}")
    return targets


class StreamTeacher:
    """Teacher targets computed on the fly: ``targets(batch) -> dict[str, Tensor]`` (float32)."""

    def __init__(self, model: nn.Module, extract: Extract, bf16: bool = False):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.extract = extract
        self.bf16 = bf16

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        device = batch["index"].device
        first = next(self.model.parameters(), None)
        if first is not None and first.device != device:
            self.model.to(device)
        self.model.eval()  # a recipe may have toggled it; a teacher must never train
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            out = self.extract(self.model, batch)
        out = check_targets(out, batch["index"].shape[0], "extract(teacher, batch)")
        # Inference tensors cannot be saved for backward; a clone outside inference mode can.
        return {name: value.float().clone() for name, value in out.items()}
