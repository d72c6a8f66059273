"""EDSR for same-grid MRI enhancement, and its multi-task form (Shou et al.'s students).

Architecture (Lim et al. 2017, without the upsampler because input and output share one grid):

    f0 = head(x)                                   # conv3x3, in -> F
    f  = f0 + tail_conv(B_n(...B_1(f0)))           # global feature skip
    B(h) = h + res_scale * conv(ReLU(conv(h)))     # residual block, no BatchNorm
    y  = x + out_conv(f)                           # conv3x3, F -> in; image residual

EDSR's RGB mean shift has no meaning for normalised MRI magnitudes; the image residual takes its
place (the network predicts a correction of its degraded input, as SwinIR's same-grid variant
does). Published baseline (``edsr_baseline``): 16 blocks x 64 features, res_scale 1.

Multi-task EDSR: one network for several degradations (denoising, super-resolution), told which
one by an integer task id per sample. Conditioning is FiLM with a learned per-task embedding:
after the head and after the first conv of every residual block, channel c of task t becomes
``(1 + gamma[t, c]) * h_c + beta[t, c]``. Chosen over an extra constant input channel because
(a) a constant channel only reaches the first conv, where it is a per-task bias that zero padding
turns into a border artefact, and the body must carry the task signal through 16 blocks by
itself; (b) FiLM lets every block re-weight its channels per task for ``2 F (n_blocks + 1)``
parameters per task and two elementwise ops per block, nothing next to the 3x3 convs.
The embeddings start small and random (std ``film_init_std``), so tasks differ from step 0 but
the network starts close to a plain EDSR.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdhpc.models.dccnn import Conv3x3  # the F -> 1 output conv as a GEMM


class ResidualBlock(nn.Module):
    """``h + res_scale * conv2(ReLU(film(conv1(h))))`` (EDSR block; FiLM only when given)."""

    def __init__(self, features: int, res_scale: float):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        self.res_scale = res_scale

    def forward(self, h: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        r = self.conv1(h)  # [B, F, H, W]
        if film is not None:
            scale, shift = film  # [B, F, 1, 1] each
            r = torch.addcmul(shift, r, scale)
        r = self.conv2(self.act(r))
        return h + self.res_scale * r if self.res_scale != 1 else h + r


class EDSR(nn.Module):
    """Same-grid EDSR: ``y = x + out_conv(head(x) + body(head(x)))``.

    Args:
        n_blocks: residual blocks (16 in the published baseline).
        features: width F (64 in the published baseline).
        res_scale: scale of each block's residual branch (1 for the baseline, 0.1 for the
            32 x 256 EDSR).
        in_channels: image channels (1: a magnitude image).
    """

    def __init__(self, n_blocks: int = 16, features: int = 64, res_scale: float = 1.0,
                 in_channels: int = 1):
        super().__init__()
        if n_blocks < 1 or features < 1:
            raise ValueError(f"EDSR: expected n_blocks >= 1 and features >= 1, found "
                             f"n_blocks={n_blocks}, features={features}")
        self.head = Conv3x3(in_channels, features)
        self.blocks = nn.ModuleList(ResidualBlock(features, res_scale) for _ in range(n_blocks))
        self.body_conv = nn.Conv2d(features, features, 3, padding=1)
        self.out_conv = Conv3x3(features, in_channels)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.head.in_channels:
            raise ValueError(f"{type(self).__name__} input: expected [B, "
                             f"{self.head.in_channels}, H, W], found {tuple(x.shape)}")

    def _run(self, x: torch.Tensor, films: list | None) -> torch.Tensor:
        f0 = self.head(x)  # [B, F, H, W]
        if films is not None:
            scale, shift = films[0]
            f0 = torch.addcmul(shift, f0, scale)
        h = f0
        for i, block in enumerate(self.blocks):
            h = block(h, films[i + 1] if films is not None else None)
        f = f0 + self.body_conv(h)  # [B, F, H, W]
        return x + self.out_conv(f)  # [B, in, H, W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, H, W] -> enhanced image [B, C, H, W]."""
        self._check_input(x)
        return self._run(x, None)


class MultiTaskEDSR(EDSR):
    """EDSR conditioned on a task id by FiLM (see the module docstring).

    Args:
        n_tasks: number of tasks (ids ``0 .. n_tasks - 1``); ``task_names`` names them.
        task_names: optional names, e.g. ``("denoise", "superres")``; forward accepts either.
        film_init_std: std of the initial gamma / beta embeddings.
        other args: as :class:`EDSR`.
    """

    def __init__(self, n_blocks: int = 16, features: int = 64, res_scale: float = 1.0,
                 in_channels: int = 1, n_tasks: int = 2,
                 task_names: tuple[str, ...] = ("denoise", "superres"),
                 film_init_std: float = 0.02):
        super().__init__(n_blocks, features, res_scale, in_channels)
        task_names = tuple(task_names)
        if n_tasks < 1 or (task_names and len(task_names) != n_tasks):
            raise ValueError(f"MultiTaskEDSR: expected n_tasks >= 1 and len(task_names) == "
                             f"n_tasks, found n_tasks={n_tasks}, task_names={task_names}")
        self.n_tasks = n_tasks
        self.task_names = task_names
        # [T, (n_blocks + 1) * 2 * F]: per FiLM site, gamma then beta.
        self.film = nn.Embedding(n_tasks, (n_blocks + 1) * 2 * features)
        nn.init.normal_(self.film.weight, std=film_init_std)

    def task_ids(self, task, batch: int, device: torch.device) -> torch.Tensor:
        """Normalise ``task`` (int, name, sequence of either, or LongTensor [B]) to ids [B]."""
        if isinstance(task, str):
            task = [task]
        if isinstance(task, (list, tuple)):
            task = [self.task_names.index(t) if isinstance(t, str) and t in self.task_names
                    else t for t in task]
            if any(isinstance(t, str) for t in task):
                raise ValueError(f"MultiTaskEDSR task: unknown name in {task}; expected one of "
                                 f"{self.task_names}")
        ids = torch.as_tensor(task, device=device)
        if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"MultiTaskEDSR task: expected integer task ids, found {ids.dtype}")
        ids = ids.long().reshape(-1)
        if ids.numel() == 1:
            ids = ids.expand(batch)
        if ids.numel() != batch:
            raise ValueError(f"MultiTaskEDSR task: expected one id or {batch} ids (the batch), "
                             f"found {ids.numel()}")
        if bool(((ids < 0) | (ids >= self.n_tasks)).any()):
            raise ValueError(f"MultiTaskEDSR task: expected ids in 0..{self.n_tasks - 1}, "
                             f"found {ids.tolist()}")
        return ids

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:  # type: ignore[override]
        """``x`` [B, C, H, W] and the task of each sample -> enhanced image [B, C, H, W]."""
        self._check_input(x)
        ids = self.task_ids(task, x.shape[0], x.device)
        features = self.head.out_channels
        film = self.film(ids).view(x.shape[0], -1, 2, features, 1, 1)  # [B, sites, 2, F, 1, 1]
        films = [(1 + film[:, s, 0], film[:, s, 1]) for s in range(film.shape[1])]
        return self._run(x, films)


class TaskExperts(nn.Module):
    """Task-based teacher: sample b is enhanced by ``experts[task[b]]``."""

    def __init__(self, experts: Sequence[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)  # [B, 1, H, W]
        for t, expert in enumerate(self.experts):
            chosen = (task == t).nonzero().flatten()
            if chosen.numel():
                out[chosen] = expert(x[chosen])
        unknown = (task < 0) | (task >= len(self.experts))
        if bool(unknown.any()):
            raise ValueError(f"TaskExperts: task ids expected in 0..{len(self.experts) - 1}, "
                             f"found {task.tolist()}")
        return out
