"""Export a trained student for deployment: ``python -m kdhpc.export``.

Run::

    python -m kdhpc.export RUN_DIR --format onnx|torchscript|exported [--out PATH]
                           [--model student_kd|student|teacher] [--size H W] [--rounds N]

Every student kdhpc trains exports to all three formats: DC-CNN (its FFT data-consistency
layers included), VDSR, EDSR and the MobileNetV2 / nnU-Net-style U-Nets. The file goes to
``--out`` (default ``RUN_DIR/export/<model>.onnx``, ``.torchscript.pt`` or ``.pt2``; the
TorchScript default is the file ``python -m kdhpc.segment`` loads), written under a temporary
name and renamed when complete. Then the exported file is reloaded and run on a seeded random
input beside the eager model: the largest absolute difference must be at most
``PARITY_RTOL * max|eager output| + PARITY_ATOL`` (``1e-4`` relative, ``1e-5`` absolute; both
compute in float32, different kernels and summation orders), and CPU milliseconds per call of
eager and exported are measured in interleaved rounds (each form once per round), minimum and
median printed. A model that cannot be exported is a one-line :class:`ExportError` naming the
model, the format and why.

Deployed call conventions (:func:`deployable`), all float32, fixed shapes (batch 1, ``H x W``
from ``--size``, default the run's ``data.crop``):

- DC-CNN: ``(x_zf [1, 1, H, W], k0 [1, 1, H, W, 2], mask [1, 1, 1, W]) -> [1, 1, H, W]``; ``k0``
  is the measured k-space as (real, imaginary) pairs (``torch.view_as_real``; ONNX has no
  complex inputs) in the model's layout, ``mask`` its 1-D line mask (any mask broadcastable to
  ``[1, 1, H, W]`` works at run time in the FFT form). Two forms of the DC step (``--dft``):
  ``fft``, the plain-torch reference
  (:func:`kdhpc.ops.data_consistency.data_consistency_reference`, ``torch.fft``), which all
  three exporters translate (ONNX: the ``DFT`` operator, opset 20, through the
  ``torch.export``-based exporter, which needs ``onnxscript``); and ``matmul``
  (:class:`MatmulDataConsistency`), the exact 2-D DFT as real matrix products for the fixed
  ``H x W``, the ONNX default: onnxruntime runs it faster and closer to ``torch.fft`` than its
  own DFT kernel.
- segmentation U-Nets: ``image [1, 1, S, S] -> full-resolution logits [1, K, S, S]`` (the first
  deep-supervision head, :func:`kdhpc.models.segment`).
- VDSR, EDSR: ``image [1, 1, H, W] -> image [1, 1, H, W]``; multi-task EDSR also takes
  ``task`` int64 ``[1]``.

ONNX parity uses onnxruntime's CPU provider when it is installed; without it the model is only
checked with ``onnx.checker`` and the result says so. ``pip install kdhpc[export]`` installs
onnx, onnxruntime and onnxscript.

The segmentation recipe's export stage (:func:`export_segmenter`) writes the files
``python -m kdhpc.segment`` loads: the network's full-resolution logits as TorchScript (always)
and ONNX (when onnx and onnxscript are installed), each exported by :func:`export_model`, then
reloaded and run on real test slices one at a time beside the eager network: max |logit
difference| (at most :data:`LOGIT_PARITY_TOLERANCE`, else :class:`ExportError`) and the
fraction of pixels with the same label.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from kdhpc.data.fastmri import atomic_output
from kdhpc.models import DCCNN, MobileNetUNet, MultiTaskEDSR, UNet
from kdhpc.models.external import full_resolution_logits
from kdhpc.ops.dispatch import force_impl
from kdhpc.segment import EXPORT_FOLDER, ONNX_FILE, TORCHSCRIPT_FILE

FORMATS = ("onnx", "torchscript", "exported")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported": ".pt2"}
PARITY_RTOL = 1e-4
PARITY_ATOL = 1e-5
DFT_FORMS = ("fft", "matmul")
DEFAULT_DFT = {"onnx": "matmul", "torchscript": "fft", "exported": "fft"}
ONNX_OPSET = 20  # DFT-20: the opset whose DFT the torch.export-based exporter emits


class ExportError(RuntimeError):
    """A model or format that cannot be exported, or an export that fails its parity check."""


# ---------------------------------------------------------------------------------------------
# deployable forms

class DCCNNDeploy(nn.Module):
    """DC-CNN with real inputs only: ``(x_zf, k0 as [..., 2] real pairs, mask)``."""

    def __init__(self, model: DCCNN):
        super().__init__()
        self.model = model

    def forward(self, x_zf: torch.Tensor, k0_pairs: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        return self.model(x_zf, torch.view_as_complex(k0_pairs), mask)


def dft_matrix(n: int, centered: bool) -> torch.Tensor:
    """complex128 ``[n, n]`` matrix ``A`` of the orthonormal 1-D DFT in the given layout:
    ``A @ x`` equals :func:`kdhpc.data.degrade.fft2`'s transform along one axis (centred:
    ``fftshift(fft(ifftshift(x)))``)."""
    eye = torch.eye(n, dtype=torch.complex128)
    if centered:
        return torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(eye, dim=0), dim=0,
                                                norm="ortho"), dim=0)
    return torch.fft.fft(eye, dim=0, norm="ortho")


class MatmulDataConsistency(nn.Module):
    """The DC step ``Re(IFFT2(K + lam * M * (k0 - K)))``, ``K = FFT2(z)`` for a real ``z``, with
    the 2-D DFT as real matrix products for a fixed ``height x width`` (``K = A_H z A_W^T``;
    inverse ``A_H^H k conj(A_W)``). Real tensors only, so every exporter and runtime takes it
    as plain MatMuls; twiddles are computed in float64 and stored in ``dtype``. Cost ``O(HW(H +
    W))`` per image: meant for the few hundred pixels of MRI slices.

    ``forward(z [B, 1, H, W], k0_re, k0_im [B, 1, H, W], mask broadcastable) -> [B, 1, H, W]``.
    """

    def __init__(self, height: int, width: int, centered: bool, lam: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        a_h, a_w = dft_matrix(height, centered), dft_matrix(width, centered)
        for name, value in (("h_re", a_h.real), ("h_im", a_h.imag),
                            ("w_re_t", a_w.real.t()), ("w_im_t", a_w.imag.t())):
            self.register_buffer(name, value.to(dtype).contiguous())
        self.lam = float(lam)

    def forward(self, z: torch.Tensor, k0_re: torch.Tensor, k0_im: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        y_re, y_im = z @ self.w_re_t, z @ self.w_im_t                       # z A_W^T
        k_re = self.h_re @ y_re - self.h_im @ y_im                          # A_H (z A_W^T)
        k_im = self.h_re @ y_im + self.h_im @ y_re
        weight = self.lam * mask
        k_re = k_re + weight * (k0_re - k_re)
        k_im = k_im + weight * (k0_im - k_im)
        # k conj(A_W) = k (A_W^T)^T conj: (A_W^T)^T = A_W, conj flips the imaginary sign.
        z_re = k_re @ self.w_re_t.t() + k_im @ self.w_im_t.t()
        z_im = k_im @ self.w_re_t.t() - k_re @ self.w_im_t.t()
        return self.h_re.t() @ z_re + self.h_im.t() @ z_im                  # Re(A_H^H Z)


class DCCNNMatmulDeploy(nn.Module):
    """DC-CNN with real inputs whose DC steps are :class:`MatmulDataConsistency`: the model's
    own cascade CNNs, the FFTs replaced by exact DFT matrix products of a fixed size."""

    def __init__(self, model: DCCNN, height: int, width: int):
        super().__init__()
        self.cascades = model.cascades
        self.dc = MatmulDataConsistency(height, width, model.centered, model.dc_lam)

    def forward(self, x_zf: torch.Tensor, k0_pairs: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        k0_re, k0_im = k0_pairs[..., 0], k0_pairs[..., 1]
        x = x_zf
        for cascade in self.cascades:
            z, _ = cascade(x)
            x = self.dc(z, k0_re, k0_im, mask)
        return x


class FullResolution(nn.Module):
    """A deep-supervision segmentation model's first (full-resolution) logits only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return full_resolution_logits(self.model, x)


def deployable(model: nn.Module, height: int, width: int, seed: int = 0, dft: str = "fft"
               ) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], list[str]]:
    """(module in eval mode, example inputs, input names, output names) of ``model``'s deployed
    form (module docstring) for ``height x width`` images; inputs drawn with ``seed``.
    ``dft``: a DC-CNN's transforms as ``torch.fft`` (``"fft"``) or as DFT matrix products
    (``"matmul"``, :class:`DCCNNMatmulDeploy`); other models ignore it."""
    if dft not in DFT_FORMS:
        raise ExportError(f"dft: expected one of {', '.join(DFT_FORMS)}, found {dft!r}")
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 1, height, width, generator=g)
    if isinstance(model, DCCNN):
        k0 = torch.randn(1, 1, height, width, 2, generator=g)
        mask = (torch.rand(1, 1, 1, width, generator=g) < 0.3).float()
        mask[..., 0] = 1.0  # the DC line of either layout region stays sampled
        k0 = k0 * mask[..., None]
        module = DCCNNDeploy(model) if dft == "fft" else DCCNNMatmulDeploy(model, height, width)
        return module.eval(), (image, k0, mask), ["x_zf", "k0", "mask"], ["image"]
    if isinstance(model, (UNet, MobileNetUNet, FullResolution)):
        module = model if isinstance(model, FullResolution) else FullResolution(model)
        return module.eval(), (image,), ["image"], ["logits"]
    if isinstance(model, MultiTaskEDSR):
        return model.eval(), (image, torch.zeros(1, dtype=torch.int64)), ["image", "task"], [
            "image_out"]
    return model.eval(), (image,), ["image"], ["image_out"]


# ---------------------------------------------------------------------------------------------
# exporters: write, then load back as a callable taking torch tensors

def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _quiet():
    """Exporter chatter (deprecations, tracer warnings about Python-side shape checks, the
    ONNX exporter's progress lines and its registry's log warnings) would bury the one line
    that matters."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)


def _write_torchscript(module: nn.Module, inputs: tuple, path: Path, names) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs, check_trace=False)
    torch.jit.save(traced, str(path))


def _load_torchscript(path: Path) -> Callable:
    return torch.jit.load(str(path), map_location="cpu").eval()


def _write_exported(module: nn.Module, inputs: tuple, path: Path, names) -> None:
    program = torch.export.export(module, inputs)
    torch.export.save(program, str(path))


def _load_exported(path: Path) -> Callable:
    return torch.export.load(str(path)).module()


def _write_onnx(module: nn.Module, inputs: tuple, path: Path, names) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (the torch.export-based exporter's translator)
    except ImportError as err:
        raise ExportError(f"ONNX export needs onnx and onnxscript ({err}); pip install "
                          f"kdhpc[export]") from None
    input_names, output_names = names
    torch.onnx.export(module, inputs, str(path), input_names=input_names,
                      output_names=output_names, opset_version=ONNX_OPSET, dynamo=True,
                      external_data=False)
    onnx.checker.check_model(onnx.load(str(path)))


def _load_onnx(path: Path) -> Callable | None:
    """A callable over torch tensors running the ONNX file in onnxruntime (CPU), or None when
    onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Spinning worker threads would steal the cores the interleaved eager rounds run on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feeds = {n: x.numpy() for n, x in zip(names, inputs)}
        return torch.from_numpy(session.run(None, feeds)[0])
    return run


WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "exported": _write_exported}
LOADERS = {"onnx": _load_onnx, "torchscript": _load_torchscript, "exported": _load_exported}


# ---------------------------------------------------------------------------------------------
# parity and latency

def parity(reference: torch.Tensor, exported: torch.Tensor) -> dict[str, float]:
    """Max |difference|, the allowed bound (module docstring) and the max |reference|."""
    if tuple(exported.shape) != tuple(reference.shape):
        raise ExportError(f"exported output: expected shape {tuple(reference.shape)}, found "
                          f"{tuple(exported.shape)}")
    peak = float(reference.abs().max())
    return {"max_abs_diff": float((reference.float() - exported.float()).abs().max()),
            "tolerance": PARITY_RTOL * peak + PARITY_ATOL, "max_abs_eager": peak}


def interleaved_ms(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2
                   ) -> dict[str, dict[str, float]]:
    """Milliseconds per call of each named callable: every round calls each once, in turn (so
    all see the same background load); ``{"min", "median"}`` over ``rounds`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(warmup):
            for call in calls.values():
                call()
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: {"min": float(np.min(t)), "median": float(np.median(t))}
            for name, t in times.items()}


def export_model(model: nn.Module, fmt: str, path: str | Path, size: Sequence[int],
                 rounds: int = 20, name: str | None = None, threads: int | None = None,
                 dft: str | None = None) -> dict[str, Any]:
    """Export ``model`` (deployed form for ``size = (H, W)``) to ``path`` in format ``fmt``,
    reload it, check parity with eager and time both on the CPU (module docstring).

    ``dft`` (DC-CNN only): ``"fft"`` or ``"matmul"``; default ``"matmul"`` for ONNX
    (onnxruntime's DFT kernel is slower than MatMuls at MRI sizes and less exact: at 320 x 320
    its error is ~100x that of the matrix form), ``"fft"`` otherwise. Parity is always against
    the model's own eager form (``torch.fft``, the plain-torch DC). ``threads``: torch and
    onnxruntime intra-op threads while timing (default: torch's current count).

    Returns ``{"format", "file", "model", "dft", "inputs", "parity": {max_abs_diff, tolerance,
    max_abs_eager} or {"skipped": why}, "latency_ms": {"eager" (plain-torch DC), "eager (kdhpc
    fast ops)", "exported": {"min", "median"}}, "threads"}``; raises :class:`ExportError` when
    the export fails or the parity check does not pass.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected one of {', '.join(FORMATS)}, found {fmt!r}")
    name = name or type(model).__name__
    path = Path(path)
    dft = dft or DEFAULT_DFT[fmt]
    height, width = int(size[0]), int(size[1])
    eager, inputs, input_names, output_names = deployable(model, height, width)
    module = eager if dft == "fft" else deployable(model, height, width, dft=dft)[0]
    with torch.inference_mode(), force_impl("reference"):
        reference = eager(*inputs)  # the model's own form, plain-torch DC: what parity means
    try:
        # The C++ DC op exists only where kdhpc._C is built: exported files hold torch.fft.
        with force_impl("reference"), _quiet(), atomic_output(path) as tmp:
            WRITERS[fmt](module, inputs, tmp, (input_names, output_names))
    except ExportError:
        raise
    except Exception as err:  # the exporters raise many types; the first line says what failed
        raise ExportError(f"{name}: cannot export to {fmt}: {type(err).__name__}: "
                          f"{_first_line(err)}") from None
    with _threads(threads):
        return _check_and_time(eager, inputs, input_names, reference, fmt, path,
                               name, dft, rounds)


@contextlib.contextmanager
def _threads(count: int | None):
    """torch's intra-op threads set to ``count`` (None: unchanged) inside the block; onnxruntime
    sessions made inside take the same count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_and_time(eager: nn.Module, inputs: tuple, input_names: list[str],
                    reference: torch.Tensor, fmt: str, path: Path, name: str, dft: str,
                    rounds: int) -> dict[str, Any]:
    with _quiet():
        loaded = LOADERS[fmt](path)
    result: dict[str, Any] = {"format": fmt, "file": str(path), "model": name, "dft": dft,
                              "inputs": {n: list(x.shape) for n, x in zip(input_names, inputs)}}
    if loaded is None:
        result["parity"] = {"skipped": "onnxruntime is not installed; the model passed "
                                       "onnx.checker, outputs not compared"}
        return result
    with torch.inference_mode():
        check = parity(reference, loaded(*inputs))
    result["parity"] = check
    if not check["max_abs_diff"] <= check["tolerance"]:
        raise ExportError(f"{path}: {fmt} output differs from the eager {name} by "
                          f"{check['max_abs_diff']:.3g} > {check['tolerance']:.3g}")

    def eager_reference():
        with force_impl("reference"):
            return eager(*inputs)

    forms = {"eager": eager_reference, "exported": lambda: loaded(*inputs)}
    if isinstance(eager, DCCNNDeploy):  # the only student with a kdhpc fast op (its DC)
        forms["eager (kdhpc fast ops)"] = lambda: eager(*inputs)
    result["latency_ms"] = interleaved_ms(forms, rounds)
    result["threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------------------------------------
# a segmentation network for python -m kdhpc.segment (module docstring)

SEGMENTER_FILES = {"torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE}
"""What :func:`export_segmenter` writes into its folder (``python -m kdhpc.segment`` loads the
first)."""

SEGMENTER_LATENCY_ROUNDS = 10
"""Interleaved eager / exported latency rounds of :func:`export_segmenter` (the segmentation
recipe's speed stage, ``eval.latency_repeats``, gives the numbers its report uses; these are
recorded beside the files)."""

LOGIT_PARITY_TOLERANCE = 1e-3
"""Largest |logit difference| on real slices between an exported segmentation network and the
eager one that passes (:func:`export_segmenter`)."""


def onnx_missing() -> str | None:
    """Why ONNX export cannot run here (its optional packages are absent), or None."""
    import importlib.util

    absent = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    return (f"{' and '.join(absent)} not installed (pip install kdhpc[export]); TorchScript only"
            if absent else None)


def export_segmenter(model: nn.Module, slices: torch.Tensor, out_dir: Path,
                     repeats: int = SEGMENTER_LATENCY_ROUNDS,
                     log: Callable[[str], None] = print) -> dict:
    """``model``'s full-resolution logits exported by :func:`export_model` to TorchScript
    (always) and ONNX (when its packages are installed) in ``out_dir`` (:data:`SEGMENTER_FILES`),
    each checked on a seeded random input (and timed beside eager, ``repeats`` rounds), then
    reloaded and run on the real ``slices`` [N, 1, S, S] one at a time: max |logit difference|
    (at most :data:`LOGIT_PARITY_TOLERANCE`, else :class:`ExportError`) and the fraction of
    pixels with the same label."""
    size = int(slices.shape[-1])
    eager = FullResolution(model).eval()
    result: dict[str, Any] = {}
    for fmt, name in SEGMENTER_FILES.items():
        skipped = onnx_missing() if fmt == "onnx" else None
        if skipped:
            log(f"export: ONNX skipped: {skipped}")
            result[fmt] = {"skipped": skipped}
            continue
        exported = export_model(eager, fmt, out_dir / name, (size, size), rounds=repeats,
                                name=f"student_kd ({type(model).__name__})")
        run = LOADERS[fmt](out_dir / name)
        if run is None:  # onnxruntime absent: checked by onnx.checker only
            result[fmt] = {"file": exported["file"], "parity": exported["parity"]["skipped"]}
            continue
        with torch.inference_mode():
            reference = eager(slices)                                      # [N, K, S, S]
            outputs = torch.cat([run(x[None]) for x in slices])
        difference = float((reference - outputs).abs().max())
        if not difference <= LOGIT_PARITY_TOLERANCE:
            raise ExportError(f"export: {fmt} output differs from the eager student by "
                              f"{difference:.3g} > {LOGIT_PARITY_TOLERANCE} on test slices "
                              f"({exported['file']})")
        result[fmt] = {"file": exported["file"], "max_abs_diff": difference,
                       "label_agreement": float((reference.argmax(1) == outputs.argmax(1))
                                                .float().mean()),
                       "random_input": exported["parity"], "latency_ms": exported["latency_ms"]}
    return result


# ---------------------------------------------------------------------------------------------
# runs

def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None,
               which: str = "student_kd", size: Sequence[int] | None = None,
               rounds: int = 20, threads: int | None = None, dft: str | None = None
               ) -> dict[str, Any]:
    """Export network ``which`` of the run in ``run_dir`` (its weights and architecture from
    :func:`kdhpc.predict.load_run_model`); ``size`` defaults to the run's ``data.crop``."""
    from kdhpc.predict import load_run_model

    model, cfg = load_run_model(run_dir, which)
    size = tuple(size) if size else tuple(cfg.data.crop)
    if cfg.recipe == "segmentation":  # kdhpc.segment feeds S x S with S = data.crop[0]
        size = (size[0], size[0]) if not size[1:] else size
        model = FullResolution(model)  # full-resolution logits of any segmentation network
    path = Path(out) if out else Path(run_dir) / EXPORT_FOLDER / f"{which}{SUFFIXES[fmt]}"
    return export_model(model, fmt, path, size, rounds, name=f"{which} ({type(model).__name__})",
                        threads=threads, dft=dft)


def format_result(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} -> {result['file']} ({result['format']}); inputs "
             f"{result['inputs']}"]
    check = result["parity"]
    if "skipped" in check:
        lines.append(f"parity: skipped: {check['skipped']}")
    else:
        lines.append(f"parity: max |exported - eager| = {check['max_abs_diff']:.3g} "
                     f"(tolerance {check['tolerance']:.3g})")
        for name, t in result["latency_ms"].items():
            lines.append(f"CPU latency {name:<24} min {t['min']:8.3f} ms   median "
                         f"{t['median']:8.3f} ms   ({result['threads']} threads)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from kdhpc.config import ConfigError
    from kdhpc.predict import PredictError

    parser = argparse.ArgumentParser(prog="python -m kdhpc.export",
                                     description="Export a trained network to ONNX, TorchScript "
                                                 "or torch.export, with a parity check and CPU "
                                                 "latency beside eager.")
    parser.add_argument("run_dir", help="finished run folder (RUN_DIR)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", help="output file (default RUN_DIR/export/<model><suffix>)")
    parser.add_argument("--model", default="student_kd",
                        help="trained network (stage folder) of the run (default student_kd)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input image size (default: the run's data.crop)")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds (default 20)")
    parser.add_argument("--threads", type=int, help="CPU threads while timing (default: torch's)")
    parser.add_argument("--dft", choices=DFT_FORMS,
                        help="DC-CNN transforms: fft (torch.fft; ONNX DFT) or matmul (DFT "
                             "matrices; default for onnx)")
    args = parser.parse_args(argv)
    try:
        result = export_run(args.run_dir, args.format, args.out, args.model, args.size,
                            args.rounds, args.threads, args.dft)
    except (ExportError, PredictError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
