"""Networks kdhpc has never seen: factories, foreign checkpoints and frozen programs.

A *model spec* is either a registry name (``"dccnn_student"``, :data:`kdhpc.models.MODEL_NAMES`)
or a factory ``"package.module:callable"`` (``callable`` may be dotted, ``pkg.mod:Class.build``),
called with keyword arguments from the config::

    build_from_spec("dccnn_student")                              # registry, named size
    build_from_spec("dccnn_student", {"channels": 16})            # registry, overridden argument
    build_from_spec("my_lab.nets:VarNet", {"num_cascades": 4})    # any importable nn.Module

Checkpoints (:func:`read_state_dict`, :func:`load_state_dict_file`) are read with
``torch.load(weights_only=True)`` (no pickled code runs). Accepted layouts: a plain state dict;
a dict holding it under ``state_dict`` (PyTorch Lightning), ``model_state_dict`` or ``model``;
keys prefixed by a wrapper: ``model.`` (a LightningModule's attribute), ``module.`` (DDP /
DataParallel), ``_orig_mod.`` (``torch.compile``). ``prefix="auto"`` strips those wrapper
prefixes while every key carries one (repeatedly: Lightning around DDP gives
``model.module.``); ``prefix="net."`` keeps only the keys under ``net.`` and strips it (a
Lightning module holding teacher and student); ``prefix=""`` strips nothing.

A teacher that is only run may also be a frozen program (:func:`load_program`): a TorchScript
archive (``torch.jit.save``) or a ``torch.export`` archive (``.pt2``, ``torch.export.save``),
recognised by its content (:func:`checkpoint_kind`). Frozen programs cannot be trained, and
forward hooks (:mod:`kdhpc.models.taps`) do not reach inside them: feature transfer from such a
teacher needs the eager module. A ``torch.export`` program is called one sample at a time
(:class:`FrozenProgram`), because an export fixes its example's batch size.

A run's networks (:func:`build_run_network`, :func:`load_run_network`): every recipe builds
``model.teacher`` / ``model.student`` (and networks derived from them) through these, so a
factory, its ``model.<role>_kwargs``, the teacher checkpoint's layouts (``checkpoint_strict``,
``checkpoint_prefix``) and program teachers work alike in reconstruction, enhancement and
segmentation, and in ``kdhpc.predict`` / ``kdhpc.export`` / ``kdhpc.segment``.

Every failure is a :class:`ModelSpecError` (a ``ValueError``) naming the spec or file, what was
expected and what was found (missing / unexpected keys listed, shape mismatches with both
shapes).
"""

from __future__ import annotations

import importlib
import inspect
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from kdhpc.config import ConfigError

WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.")
"""Key prefixes that ``prefix="auto"`` strips: Lightning attribute, DDP, torch.compile."""

NESTED_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which a checkpoint dict may hold the state dict (Lightning first)."""

PROGRAM_KINDS = ("torchscript", "exported")
LISTED_KEYS = 8  # keys named in an error before "... (N more)"


class ModelSpecError(ValueError):
    """A model spec, checkpoint or program that cannot be used; one line naming what and why."""


def _listed(keys, limit: int = LISTED_KEYS) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---------------------------------------------------------------------------------------------
# specs

def is_factory_spec(spec: str) -> bool:
    """True for ``"package.module:callable"``, False for a registry name."""
    return ":" in spec


def resolve_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:attr[.attr...]"`` (imported, not called)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(f"model spec {spec!r}: expected 'package.module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {module_name!r}: "
                             f"{err}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            raise ModelSpecError(f"model spec {spec!r}: {getattr(target, '__name__', target)!r} "
                                 f"has no attribute {part!r}; found {_listed(public, 20)}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelSpecError(f"model spec {spec!r}: expected a callable, found "
                             f"{type(target).__name__}")
    return target


def build_from_spec(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The network named by ``spec`` (registry name or factory), built with ``kwargs``.

    A registry name takes ``kwargs`` as constructor overrides (:func:`kdhpc.models.build_model`);
    a factory is called as ``factory(**kwargs)`` and must return an ``nn.Module``. Unknown
    keyword arguments of a factory with a fixed signature are refused with the accepted names.
    """
    kwargs = dict(kwargs or {})
    if not is_factory_spec(spec):
        from kdhpc.models import build_model  # the registry imports this module's siblings

        return build_model(spec, **kwargs)
    factory = resolve_factory(spec)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        signature = None
    if signature is not None and not any(p.kind is p.VAR_KEYWORD
                                         for p in signature.parameters.values()):
        accepted = [n for n, p in signature.parameters.items()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ModelSpecError(f"model spec {spec!r}: unknown keyword argument(s) {unknown}; "
                                 f"expected some of {accepted}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: expected the factory to return a "
                             f"torch.nn.Module, found {type(model).__name__}")
    return model


# ---------------------------------------------------------------------------------------------
# state dicts

def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "auto"
                 ) -> dict[str, torch.Tensor]:
    """``state`` with a key prefix removed (module docstring: ``"auto"``, ``"x."`` or ``""``)."""
    state = dict(state)
    if prefix == "":
        return state
    if prefix != "auto":
        kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not kept:
            raise ModelSpecError(f"checkpoint prefix {prefix!r}: no key starts with it; found "
                                 f"keys {_listed(state)}")
        return kept
    changed = True
    while changed:
        changed = False
        for candidate in WRAPPER_PREFIXES:
            if state and all(k.startswith(candidate) for k in state):
                state = {k[len(candidate):]: v for k, v in state.items()}
                changed = True
    return state


def read_state_dict(path: str | os.PathLike, prefix: str = "auto") -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (module docstring: layouts), prefix stripped.

    Loaded with ``weights_only=True`` onto the CPU; a file that holds no tensors under a known
    key, a TorchScript / ``torch.export`` archive, or a file ``torch.load`` cannot read in
    weights-only mode is a :class:`ModelSpecError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"{path}: checkpoint file not found")
    kind = checkpoint_kind(path)
    if kind != "state_dict":
        raise ModelSpecError(f"{path}: expected a state dict, found a {kind} program (load it "
                             f"with kdhpc.models.external.load_program; it cannot be trained)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or truncated files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSpecError(f"{path}: cannot load as a weights-only checkpoint (expected "
                             f"tensors in plain dicts): {first}") from None
    if not _is_state_dict(obj):
        nested = [k for k in NESTED_KEYS if isinstance(obj, Mapping) and _is_state_dict(obj.get(k))]
        if not nested:
            found = (f"a dict with keys {_listed(map(str, obj))}" if isinstance(obj, Mapping)
                     else type(obj).__name__)
            raise ModelSpecError(f"{path}: expected a state dict (name -> tensor) or one under "
                                 f"{' / '.join(repr(k) for k in NESTED_KEYS)}, found {found}")
        obj = obj[nested[0]]
    return strip_prefix(obj, prefix)


@dataclass
class LoadReport:
    """What :func:`load_state_dict_file` did: keys the model lacks values for / did not use."""

    path: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_state_dict_file(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                         prefix: str = "auto") -> LoadReport:
    """Load the checkpoint ``path`` into ``model`` (in place) and report the key differences.

    ``strict``: missing or unexpected keys are an error listing them (after prefix stripping);
    with ``strict=False`` they are only reported. A shape mismatch is always an error naming
    each key with the model's and the file's shapes.
    """
    state = read_state_dict(path, prefix)
    own = model.state_dict()
    shapes = [f"{k} (model {tuple(own[k].shape)}, file {tuple(v.shape)})"
              for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shapes:
        raise ModelSpecError(f"{path}: shape mismatch for {type(model).__name__}: "
                             f"{_listed(shapes)}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        raise ModelSpecError(f"{path}: expected the weights of {type(model).__name__} "
                             f"({len(own)} keys, e.g. {_listed(list(own)[:3], 3)}), found "
                             f"{'; '.join(parts)} (prefix={prefix!r}; strict=False skips them)")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadReport(str(path), missing, unexpected)


# ---------------------------------------------------------------------------------------------
# frozen programs

def checkpoint_kind(path: str | os.PathLike) -> str:
    """``"exported"`` (a ``torch.export`` archive), ``"torchscript"`` or ``"state_dict"``.

    Both archives are zip files like a ``torch.save`` file; TorchScript ones hold ``code/``
    entries, ``torch.export`` ones a ``serialized_exported_program`` / ``models/`` entry (and
    conventionally the ``.pt2`` suffix).
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return "state_dict"  # legacy (pre-1.6) torch.save format
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if path.suffix == ".pt2" or any("serialized_exported_program" in n or "/models/" in n
                                    for n in names):
        return "exported"
    if any("/code/" in n for n in names):
        return "torchscript"
    return "state_dict"


def load_program(path: str | os.PathLike) -> nn.Module:
    """A frozen teacher: a TorchScript or ``torch.export`` archive as a callable module in eval
    mode on the CPU (no gradients needed; the caller freezes it)."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"{path}: program file not found")
    kind = checkpoint_kind(path)
    try:
        if kind == "exported":
            module = torch.export.load(str(path)).module()
        elif kind == "torchscript":
            module = torch.jit.load(str(path), map_location="cpu")
        else:
            raise ModelSpecError(f"{path}: expected a TorchScript or torch.export archive, found "
                                 f"a state dict (build the network and load it with "
                                 f"load_state_dict_file)")
    except ModelSpecError:
        raise
    except Exception as err:  # damaged archives raise several types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSpecError(f"{path}: cannot load the {kind} program: {first}") from None
    if kind == "torchscript":
        module.eval()  # an exported GraphModule has no train/eval switch to set
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return FrozenProgram(module, kind, path)


def _batch_parts(output: Any, parts: list) -> Any:
    """Per-sample outputs joined along dim 0: tensors, or lists / tuples of tensors (deep
    supervision levels)."""
    if isinstance(output, torch.Tensor):
        return torch.cat(parts)
    return type(output)(torch.cat([part[i] for part in parts]) for i in range(len(output)))


class FrozenProgram(nn.Module):
    """A loaded TorchScript / ``torch.export`` program as a frozen ``nn.Module``.

    ``train()`` / ``eval()`` only set this wrapper's flag (the program was loaded in eval mode
    and an exported module refuses the switch). A ``torch.export`` program is called once per
    sample: every tensor argument whose first dim is the batch is split, the others (a mask
    shared by the batch) are passed whole, and the outputs are concatenated.
    """

    def __init__(self, program: nn.Module, kind: str, path: str | os.PathLike):
        super().__init__()
        self.program, self.kind, self.path = program, kind, str(path)

    def train(self, mode: bool = True) -> FrozenProgram:
        self.training = mode
        return self

    def forward(self, *args: Any) -> Any:
        if self.kind != "exported" or not args or not isinstance(args[0], torch.Tensor):
            return self.program(*args)
        batch = args[0].shape[0]
        parts = [self.program(*[a[i:i + 1] if isinstance(a, torch.Tensor) and a.dim()
                                and a.shape[0] == batch else a for a in args])
                 for i in range(batch)]
        return _batch_parts(parts[0], parts)


def load_teacher(spec: str, kwargs: Mapping[str, Any] | None = None,
                 checkpoint: str | os.PathLike | None = None, *, strict: bool = True,
                 prefix: str = "auto") -> nn.Module:
    """A frozen teacher in eval mode: a program file alone (``checkpoint`` a TorchScript /
    ``.pt2`` archive: ``spec`` is not built), or ``spec`` built with ``kwargs`` and the state
    dict ``checkpoint`` loaded (none: the freshly built network)."""
    if checkpoint is not None and checkpoint_kind(checkpoint) in PROGRAM_KINDS:
        return load_program(checkpoint)
    model = build_from_spec(spec, kwargs)
    if checkpoint is not None:
        load_state_dict_file(model, checkpoint, strict=strict, prefix=prefix)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# a run's networks (every recipe and command builds through these)

def role_of(model_cfg: Any, arch: str) -> str:
    """Which ``model.*`` fields configure ``arch``: ``"teacher"`` or ``"student"`` (a recipe's
    derived network, e.g. a multi-task sibling of the student, counts as a student)."""
    return "teacher" if arch == model_cfg.teacher else "student"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def probe(key: str, name: str, call: Callable[[], Any], contract: str) -> Any:
    """A user network's trial call, made before anything is written: any exception becomes a
    ``ConfigError`` naming the config key, the network and the call this recipe makes."""
    try:
        with torch.no_grad():
            return call()
    except Exception as err:  # any failure of a user network's call: name the contract
        raise ConfigError(f"{key}: {name!r} failed on a probe batch (this recipe calls "
                          f"{contract}): {type(err).__name__}: {_first_line(err)}") from None


def expect_output(key: str, name: str, output: Any, shape: tuple, contract: str,
                  what: str = "a tensor") -> None:
    """Refuse a probe output that is not a tensor of ``shape``, naming the key and the call."""
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != tuple(shape):
        found = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(f"{key}: expected {name!r} to return {what} of shape {tuple(shape)} "
                          f"(this recipe calls {contract}), found {found}")


def build_run_network(model_cfg: Any, arch: str) -> nn.Module:
    """``arch`` (registry name or factory) built with ``model.<role>_kwargs`` when it is
    ``model.teacher`` / ``model.student`` itself, else with no arguments. Every failure is a
    :class:`~kdhpc.config.ConfigError` naming ``model.<role>``."""
    role = role_of(model_cfg, arch)
    kwargs = getattr(model_cfg, f"{role}_kwargs") if arch == getattr(model_cfg, role) else {}
    try:
        return build_from_spec(arch, kwargs)
    except ModelSpecError as err:  # names the spec already
        raise ConfigError(f"model.{role}: {_first_line(err)}") from None
    except (KeyError, ValueError, TypeError) as err:  # a registry name, or the factory's own
        raise ConfigError(f"model.{role}: {arch!r}: {_first_line(err).strip(chr(39))}") from None


def check_distinct_roles(model_cfg: Any) -> None:
    """Refuse one spec for teacher and student configured differently: :func:`role_of` could
    not tell which keyword arguments a stage's network was built with."""
    if model_cfg.teacher == model_cfg.student and (
            model_cfg.teacher_kwargs != model_cfg.student_kwargs
            or model_cfg.teacher_layers != model_cfg.student_layers):
        raise ConfigError(f"model.student: expected a spec other than model.teacher when their "
                          f"kwargs or layers differ, found {model_cfg.student!r} for both (name "
                          f"a second factory, e.g. a function returning the smaller network)")


def teacher_program(model_cfg: Any) -> Path | None:
    """``model.teacher_checkpoint`` when it names a TorchScript or ``torch.export`` file (a
    teacher that is only run), else None (a state dict, ``pretrained:<name>``, or none)."""
    checkpoint = model_cfg.teacher_checkpoint
    if not checkpoint or checkpoint.startswith("pretrained:") or not Path(checkpoint).is_file():
        return None
    return Path(checkpoint) if checkpoint_kind(checkpoint) in PROGRAM_KINDS else None


def load_run_network(model_cfg: Any, arch: str, weights: str | os.PathLike,
                     build: Callable[[str], nn.Module] | None = None,
                     foreign: bool | None = None) -> nn.Module:
    """``arch`` with the weights file ``weights``, in eval mode.

    ``foreign`` (default: ``arch`` is the teacher and ``model.teacher_checkpoint`` is set): the
    user's teacher checkpoint, a program file run as it is (:func:`load_program`; ``arch`` is
    not built) or a state dict read with ``model.checkpoint_strict`` and
    ``model.checkpoint_prefix``; otherwise weights a stage trained (a plain state dict, every
    key matching). ``build`` (default :func:`build_run_network`) makes the network, so a recipe
    can add its own checks or taps. Failures are a ConfigError naming the file.
    """
    if foreign is None:
        foreign = role_of(model_cfg, arch) == "teacher" and bool(model_cfg.teacher_checkpoint)
    try:
        if foreign and checkpoint_kind(weights) in PROGRAM_KINDS:
            return load_program(weights)
        model = (build or (lambda a: build_run_network(model_cfg, a)))(arch)
        load_state_dict_file(model, weights, strict=model_cfg.checkpoint_strict if foreign
                             else True, prefix=model_cfg.checkpoint_prefix if foreign else "")
    except ModelSpecError as err:
        where = "model.teacher_checkpoint: " if foreign else ""
        raise ConfigError(f"{where}{_first_line(err)}") from None
    return model.eval()


def logit_levels(output: Any) -> list[torch.Tensor]:
    """A segmentation network's output as deep-supervision levels, highest resolution first:
    a tensor is one level, a list or tuple is taken as it is."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)) and output and all(
            isinstance(level, torch.Tensor) for level in output):
        return list(output)
    raise ValueError(f"expected logits [B, K, H, W] or a list of them (deep-supervision levels, "
                     f"highest resolution first), found {type(output).__name__}")


def full_resolution_logits(model: Callable, x: torch.Tensor) -> torch.Tensor:
    """The first (full-resolution) logits ``[B, K, H, W]`` of a segmentation network."""
    return logit_levels(model(x))[0]


def takes_task(model: nn.Module) -> bool:
    """Whether ``model`` (or the module a training engine wraps) is a multi-task network: its
    ``forward`` has a parameter named ``task`` (the enhancement recipe passes each sample's task
    id there)."""
    net = getattr(model, "module", model)
    try:
        return "task" in inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False


def enhance(model: nn.Module, batch: dict) -> torch.Tensor:
    """Run ``model`` (a module or its DeepSpeed engine) on ``batch["input"]``, passing the
    batch's task to multi-task networks."""
    if takes_task(model):  # MultiTaskEDSR, TaskExperts, a user's multi-task network
        return model(batch["input"], batch["task"])
    return model(batch["input"])
