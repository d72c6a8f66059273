"""Named-layer taps: the outputs of modules named by path, caught with forward hooks.

Feature and attention transfer pair teacher layers with student layers by module path
(``model.get_submodule(path)``, e.g. ``cascades.0.acts.1``), so any ``nn.Module`` can take part,
registry network or not::

    with LayerTaps(teacher, ["cascades.0.acts.2"]) as t_taps, \\
         LayerTaps(student, ["cascades.0.acts.1"]) as s_taps:
        teacher(x, k0, mask); student(x, k0, mask)
        pairs = zip(t_taps.outputs(), s_taps.outputs())

or persistent, across many forwards: ``taps = LayerTaps(model, names).attach()`` ...
``taps.remove()``. ``outputs()`` returns the outputs of the *latest* forward in the order of
``names`` and raises when a named layer did not run. Outputs stay in the autograd graph (a
student's features carry gradients). For the registry networks, tapping
``kdhpc.models.feature_layers(model)`` gives the same tensors as ``forward(...,
return_features=True)`` (tested).

A path that names no module raises :class:`LayerPathError` listing the closest real names first
(``difflib``) and then the others, so a typo (``conv`` for ``convs``) shows its fix.

:class:`ChannelProjection` maps student features to the teacher's width (a 1x1 convolution,
trained with the student) where the paired layers' channel counts differ;
:func:`projections_for` builds one per pair (``nn.Identity`` where they agree).
"""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence

import torch
from torch import nn

SHOWN_LAYERS = 40  # layer names an error lists before "... (N more)"


class LayerPathError(ValueError):
    """A layer path that names no module of the model; the message lists real layer names."""


def layer_names(model: nn.Module) -> list[str]:
    """Every submodule path of ``model`` (``named_modules`` order, the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``; a wrong path is a :class:`LayerPathError` naming the
    closest real paths first, then the others."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    names = layer_names(model)
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    rest = [n for n in names if n not in close]
    shown = rest[:SHOWN_LAYERS]
    more = f" ... ({len(rest) - len(shown)} more)" if len(rest) > len(shown) else ""
    raise LayerPathError(
        f"layer {path!r}: {type(model).__name__} has no such module; closest: "
        f"{', '.join(close) if close else '(none)'}; layers: {', '.join(shown)}{more}")


class LayerTaps:
    """Capture the outputs of ``model``'s modules named by ``paths`` (module docstring).

    Args:
        model: an eager ``nn.Module`` (hooks do not reach into TorchScript / exported programs).
        paths: module paths, each resolved (and checked) at construction.
        detach: store ``output.detach()`` (a frozen teacher's features need no graph).
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], detach: bool = False):
        if isinstance(model, torch.jit.ScriptModule):
            raise LayerPathError(f"LayerTaps: {type(model).__name__} is a TorchScript program; "
                                 f"forward hooks need the eager module")
        self.model, self.paths, self.detach = model, list(paths), bool(detach)
        self.modules = [resolve_layer(model, p) for p in self.paths]
        self._handles: list = []
        self._outputs: dict[int, torch.Tensor] = {}

    def _hook(self, index: int):
        def hook(module: nn.Module, args, output) -> None:
            if not isinstance(output, torch.Tensor):
                raise LayerPathError(f"layer {self.paths[index]!r} ({type(module).__name__}): "
                                     f"expected a tensor output to tap, found "
                                     f"{type(output).__name__}; tap one of its submodules")
            self._outputs[index] = output.detach() if self.detach else output
        return hook

    def attach(self) -> LayerTaps:
        """Register the hooks (idempotent) and return ``self``."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(i))
                             for i, m in enumerate(self.modules)]
        return self

    def remove(self) -> None:
        """Remove the hooks and forget captured outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = {}

    def clear(self) -> None:
        """Forget captured outputs (hooks stay)."""
        self._outputs = {}

    def outputs(self) -> list[torch.Tensor]:
        """The latest output of every tapped layer, in the order of ``paths``."""
        absent = [p for i, p in enumerate(self.paths) if i not in self._outputs]
        if absent:
            raise LayerPathError(f"LayerTaps: layer(s) {absent} of {type(self.model).__name__} "
                                 f"did not run in the latest forward (attached: "
                                 f"{bool(self._handles)})")
        return [self._outputs[i] for i in range(len(self.paths))]

    def __enter__(self) -> LayerTaps:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()


class ChannelProjection(nn.Module):
    """1x1 convolution ``student channels -> teacher channels`` (bias free), applied to a
    student feature map ``[B, C_s, H, W]`` before it is compared with the teacher's
    ``[B, C_t, H, W]``; its weights are trained with the student (FitNets' regressor)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        if min(student_channels, teacher_channels) < 1:
            raise ValueError(f"ChannelProjection: expected positive channel counts, found "
                             f"{student_channels} -> {teacher_channels}")
        self.proj = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def projections_for(student_channels: Iterable[int], teacher_channels: Iterable[int]
                    ) -> nn.ModuleList:
    """One module per layer pair: :class:`ChannelProjection` where the counts differ, else
    ``nn.Identity``. Register the list on the student's training module so that it trains."""
    student_channels, teacher_channels = list(student_channels), list(teacher_channels)
    if len(student_channels) != len(teacher_channels):
        raise ValueError(f"projections_for: expected as many student as teacher layers, found "
                         f"{len(student_channels)} and {len(teacher_channels)}")
    return nn.ModuleList(nn.Identity() if s == t else ChannelProjection(s, t)
                         for s, t in zip(student_channels, teacher_channels))


def tap_channels(model: nn.Module, paths: Sequence[str], *inputs, **kwargs) -> list[int]:
    """Channel count (dim 1) of each tapped layer's output, from one no-grad forward of
    ``model(*inputs, **kwargs)`` (a small input suffices for convolutional models)."""
    with torch.no_grad(), LayerTaps(model, paths, detach=True) as taps:
        model(*inputs, **kwargs)
        return [int(t.shape[1]) for t in taps.outputs()]
