"""Every network kdhpc distils, by registry name: ``build_model(name, **overrides)``.

Names (``MODEL_NAMES``) and what they build:

- ``dccnn_teacher`` / ``dccnn_student``: :class:`DCCNN`, 5 cascades x 5 / x 3 convs,
  141,765 / 49,285 parameters (KD-MRI).
- ``vdsr_teacher`` / ``vdsr_student``: :class:`VDSR`, 11 / 7 convs, 333,569 / 185,857 parameters.
- ``swinir_denoise``: :class:`SwinIR`, published grey-denoising size (D 180, depths [6]*6,
  heads [6]*6, window 8, mlp_ratio 2); ``swinir_lightweight_sr``: the published lightweight-SR
  body (D 60, depths [6]*4), on the same grid; ``swinir_small``: D 48, depths [4, 4], for CPU.
- ``edsr_baseline``: :class:`EDSR`, published 16 blocks x 64 features, res_scale 1;
  ``edsr_small``: 8 x 32. ``edsr_multitask_baseline`` / ``edsr_multitask_small``: the same
  with FiLM task conditioning (:class:`MultiTaskEDSR`, ``forward(x, task)``), 2 tasks.
- ``unet_teacher``: :class:`UNet`, nnU-Net-style, 6 stages, base 32, max 512, 4 heads;
  ``unet_teacher_small``: 5 stages, base 8, max 64.
- ``mobilenet_unet_student``: :class:`MobileNetUNet`, channels (8, 16, 32, 64, 128),
  expansion 8; ``mobilenet_unet_student_small``: channels (8, 8, 16, 16, 24), expansion 4.
- ``varnet_e2e``: :class:`VarNet`, the published E2E-VarNet (12 cascades, U-Nets of 18 channels
  and 4 pools, sensitivity U-Net 8 channels, 4 pools); ``varnet_e2e_student``: 6 cascades,
  9 channels. ``varnet_teacher`` / ``varnet_student``: the CPU default sizes (8 cascades x 8
  channels / 4 x 4, 2 pools, sensitivity 4 channels).

``overrides`` are constructor keyword arguments of the class (e.g.
``build_model("dccnn_teacher", centered=True)`` for fastMRI's centred k-space); an unknown name or
argument is an error that lists the valid ones.

Call conventions:

- reconstruction: ``DCCNN(x_zf [B,1,H,W] real, k0 [B,1,H,W] complex, mask)``; SR / enhancement:
  ``model(x [B,1,H,W])``; multi-task EDSR: ``model(x, task)`` (ids or names).
- segmentation: ``model(x [B,1,H,W])`` returns the list of 4 deep-supervision logits, highest
  resolution first, in train and eval mode alike; the prediction is ``model(x)[0]``.

Feature distillation convention: a distillable model has an attribute ``feature_layers``, the
tuple of its module names (``model.get_submodule(name)``) whose outputs it exposes, and
``forward(..., return_features=True)`` returns ``(output, features)`` where ``features[i]`` is the
output of ``feature_layers[i]`` in that same call. A teacher and its student expose the same number
of layers and pair them by position: pair i = (teacher ``features[i]``, student ``features[i]``).
DC-CNN: ReLU(conv3) of the teacher <-> ReLU(conv2) of the student in each of the 5 cascades
(5 pairs); VDSR: ReLU(conv6) <-> ReLU(conv4) (1 pair). Models without feature taps
(SwinIR, EDSR, U-Nets) have no ``feature_layers``; :func:`feature_layers` returns ``()`` for them.

Any network, by module path: :class:`kdhpc.models.taps.LayerTaps` catches the outputs of modules
named by path (``cascades.0.acts.1``) with forward hooks, for registry networks and user modules
alike (on a registry network, tapping ``feature_layers(model)`` gives exactly the
``return_features`` tensors); :class:`~kdhpc.models.taps.ChannelProjection` maps a student
feature to the teacher's width where they differ.

Networks kdhpc has never seen (:mod:`kdhpc.models.external`): :func:`build_from_spec` takes a
registry name or a factory ``"package.module:callable"`` with keyword arguments;
:func:`load_state_dict_file` loads plain, Lightning (``state_dict`` / ``model.``) and DDP
(``module.``) checkpoints with ``weights_only=True``; :func:`load_teacher` also accepts a frozen
TorchScript or ``torch.export`` (``.pt2``) teacher.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from kdhpc.models.dccnn import DCCNN
from kdhpc.models.edsr import EDSR, MultiTaskEDSR
from kdhpc.models.mobilenet_unet import MobileNetUNet
from kdhpc.models.swinir import SwinIR
from kdhpc.models.unet import UNet, segment
from kdhpc.models.varnet import VarNet
from kdhpc.models.vdsr import VDSR

# name -> (class, the named size's constructor arguments)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    "dccnn_teacher": (DCCNN, dict(n_cascades=5, n_convs=5, channels=32)),
    "dccnn_student": (DCCNN, dict(n_cascades=5, n_convs=3, channels=32)),
    "vdsr_teacher": (VDSR, dict(n_convs=11, channels=64)),
    "vdsr_student": (VDSR, dict(n_convs=7, channels=64)),
    "swinir_denoise": (SwinIR, dict(embed_dim=180, depths=[6] * 6, heads=[6] * 6, window=8,
                                    mlp_ratio=2.0)),
    "swinir_lightweight_sr": (SwinIR, dict(embed_dim=60, depths=[6] * 4, heads=[6] * 4,
                                           window=8, mlp_ratio=2.0)),
    "swinir_small": (SwinIR, dict(embed_dim=48, depths=[4, 4], heads=[4, 4], window=8,
                                  mlp_ratio=2.0)),
    "edsr_baseline": (EDSR, dict(n_blocks=16, features=64, res_scale=1.0)),
    "edsr_small": (EDSR, dict(n_blocks=8, features=32, res_scale=1.0)),
    "edsr_multitask_baseline": (MultiTaskEDSR, dict(n_blocks=16, features=64, res_scale=1.0,
                                                    n_tasks=2)),
    "edsr_multitask_small": (MultiTaskEDSR, dict(n_blocks=8, features=32, res_scale=1.0,
                                                 n_tasks=2)),
    "unet_teacher": (UNet, dict(base_features=32, max_features=512, n_stages=6, n_heads=4)),
    "unet_teacher_small": (UNet, dict(base_features=8, max_features=64, n_stages=5, n_heads=4)),
    "mobilenet_unet_student": (MobileNetUNet, dict(channels=(8, 16, 32, 64, 128), expansion=8,
                                                   blocks_per_level=(1, 2, 2, 2),
                                                   decoder_expansion=2, n_heads=4)),
    "mobilenet_unet_student_small": (MobileNetUNet, dict(channels=(8, 8, 16, 16, 24),
                                                         expansion=4, blocks_per_level=1,
                                                         n_heads=4)),
    "varnet_e2e": (VarNet, dict(num_cascades=12, chans=18, pools=4, sens_chans=8, sens_pools=4)),
    "varnet_e2e_student": (VarNet, dict(num_cascades=6, chans=9, pools=4, sens_chans=4,
                                        sens_pools=4)),
    "varnet_teacher": (VarNet, dict(num_cascades=8, chans=8, pools=2, sens_chans=4,
                                    sens_pools=2)),
    "varnet_student": (VarNet, dict(num_cascades=4, chans=4, pools=2, sens_chans=4,
                                    sens_pools=2)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

__all__ = ["MODEL_NAMES", "build_model", "count_parameters", "feature_layers", "segment",
           "DCCNN", "VDSR", "VarNet", "EDSR", "MultiTaskEDSR", "SwinIR", "UNet", "MobileNetUNet",
           "build_from_spec", "load_state_dict_file", "load_teacher", "LayerTaps",
           "ChannelProjection"]


def build_model(name: str, **overrides) -> nn.Module:
    """Build the network registered as ``name`` with its named size, ``overrides`` replacing
    constructor arguments."""
    if name not in _REGISTRY:
        raise ValueError(f"model name: expected one of {', '.join(MODEL_NAMES)}, found {name!r}")
    cls, defaults = _REGISTRY[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} ({cls.__name__}): unknown argument(s) {unknown}; "
                         f"expected some of {accepted}")
    return cls(**{**defaults, **overrides})


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def feature_layers(model: nn.Module) -> tuple[str, ...]:
    """Module names whose outputs ``model`` returns with ``return_features=True`` (in order);
    ``()`` for a model without feature taps."""
    return tuple(getattr(model, "feature_layers", ()))


# After the registry: external.build_from_spec resolves registry names through build_model.
from kdhpc.models.external import build_from_spec, load_state_dict_file, load_teacher  # noqa: E402
from kdhpc.models.taps import ChannelProjection, LayerTaps  # noqa: E402
