"""kdhpc.export: every student kdhpc trains exports to ONNX, TorchScript and torch.export and the
reloaded file matches the eager model (onnxruntime on the CPU for ONNX); a model that cannot
export says why in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdhpc.export import (PARITY_ATOL, PARITY_RTOL, ExportError, MatmulDataConsistency,
                          deployable, dft_matrix, export_model, interleaved_ms)
from kdhpc.models import build_model
from kdhpc.ops.data_consistency import data_consistency_reference



def _need_onnx() -> None:
    """ONNX cases need the export extra (CI installs it with the test extra)."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module)

# The trained students of configs/*.yaml, shrunk (fewer cascades / blocks, a small grid): the
# exporters' cost grows with the graph, and every layer kind is still there.
STUDENTS = [("dccnn_student", {"n_cascades": 2}, (16, 16)),
            ("vdsr_student", {"n_convs": 4, "channels": 8}, (16, 16)),
            ("edsr_small", {"n_blocks": 2, "features": 8}, (16, 16)),
            ("mobilenet_unet_student_small", {}, (32, 32))]


pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


def _independent_reference(name: str, model: nn.Module, inputs: tuple) -> torch.Tensor:
    """The deployed form's output computed without the deploy wrappers: DC-CNN by hand from its
    cascades and the reference DC with a complex k0; U-Net: first head; else the model."""
    if name.startswith("dccnn"):
        x, k0_pairs, mask = inputs
        k0 = torch.complex(k0_pairs[..., 0], k0_pairs[..., 1])
        for cascade in model.cascades:
            z, _ = cascade(x)
            x = data_consistency_reference(z, k0, mask)
        return x
    if name.startswith("mobilenet_unet"):
        return model(*inputs)[0]
    return model(*inputs)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("height, width, mask_shape", [
    (12, 10, (1, 1, 1, 10)), (9, 7, (1, 1, 9, 1)), (8, 11, (2, 1, 8, 11))])
def test_matmul_dc_matches_reference_values_and_gradients(centered, height, width, mask_shape):
    """The DFT-matrix DC step against the plain-torch reference (torch.fft), odd and even sizes,
    line masks along W or H and per-sample 2-D masks, both layouts, soft lam."""
    g = torch.Generator().manual_seed(height * width)
    z = torch.randn(2, 1, height, width, generator=g, dtype=torch.float64, requires_grad=True)
    k0 = torch.randn(2, 1, height, width, 2, generator=g, dtype=torch.float64)
    mask = (torch.rand(mask_shape, generator=g) < 0.5).double()
    dc = MatmulDataConsistency(height, width, centered, lam=0.7, dtype=torch.float64)
    out = dc(z, k0[..., 0], k0[..., 1], mask)
    expected = data_consistency_reference(z, torch.complex(k0[..., 0], k0[..., 1]), mask,
                                          lam=0.7, centered=centered)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad(out, z, grad)
    (theirs,) = torch.autograd.grad(expected, z, grad)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    # The stored matrices are float32 (the deployed dtype): the default module stays close.
    out32 = MatmulDataConsistency(height, width, centered, lam=0.7)(
        z.float(), k0[..., 0].float(), k0[..., 1].float(), mask.float())
    assert (out32.double() - expected).abs().max() < 1e-5


def test_dft_matrix_is_numpy_fft_in_both_layouts():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal(9) + 1j * rng.standard_normal(9)
    unshifted = dft_matrix(9, False).numpy() @ x
    centred = dft_matrix(9, True).numpy() @ x
    np.testing.assert_allclose(unshifted, np.fft.fft(x, norm="ortho"), atol=1e-12)
    np.testing.assert_allclose(centred, np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x),
                                                                     norm="ortho")), atol=1e-12)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
@pytest.mark.parametrize("name, overrides, size", STUDENTS, ids=[s[0] for s in STUDENTS])
def test_every_student_exports_and_matches_eager(tmp_path, name, overrides, size, fmt):
    if fmt == "onnx":
        _need_onnx()
    torch.manual_seed(0)
    model = build_model(name, **overrides).eval()
    path = tmp_path / f"model.{fmt}"
    result = export_model(model, fmt, path, size, rounds=2)
    assert result["dft"] == ("matmul" if fmt == "onnx" else "fft")
    if fmt == "onnx" and name.startswith("dccnn"):  # the default ONNX form: MatMuls, no DFT
        import onnx

        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert "MatMul" in ops and "DFT" not in ops
    assert path.is_file() and not list(tmp_path.glob(".tmp*"))
    _, inputs, _, _ = deployable(model, *size)
    with torch.inference_mode():
        expected = _independent_reference(name, model, inputs)
    check = result["parity"]
    # export_model compared the reloaded file with its own eager run; the reference here is
    # computed independently, and the stated tolerance must hold against it too.
    assert check["max_abs_eager"] == pytest.approx(float(expected.abs().max()), rel=1e-6)
    assert check["tolerance"] == pytest.approx(PARITY_RTOL * check["max_abs_eager"] + PARITY_ATOL)
    assert check["max_abs_diff"] <= check["tolerance"]
    # Reload independently of export_model and compare with the independent reference.
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))
        out = loaded(*inputs)
    elif fmt == "exported":
        out = torch.export.load(str(path)).module()(*inputs)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
        out = torch.from_numpy(session.run(None, feeds)[0])
    assert (out - expected).abs().max() <= check["tolerance"]
    assert set(result["latency_ms"]) >= {"eager", "exported"}
    assert all(0 < t["min"] <= t["median"] for t in result["latency_ms"].values())


def test_dccnn_onnx_through_onnx_dft(tmp_path):
    """The FFT form through ONNX's DFT operator (the non-default ONNX path) also passes."""
    _need_onnx()
    import onnx

    model = build_model("dccnn_student", n_cascades=1).eval()
    path = tmp_path / "fft.onnx"
    result = export_model(model, "onnx", path, (16, 12), rounds=1, dft="fft")
    assert result["dft"] == "fft" and result["parity"]["max_abs_diff"] <= result["parity"][
        "tolerance"]
    assert "DFT" in {node.op_type for node in onnx.load(str(path)).graph.node}


def test_dccnn_export_keeps_measured_lines(tmp_path):
    """The exported DC step is real data consistency: at sampled lines the output's spectrum is
    the given k0 (an independent property, not a comparison with the eager model)."""
    model = build_model("dccnn_student", n_cascades=1).eval()
    path = tmp_path / "dc.pt2"
    export_model(model, "exported", path, (16, 16), rounds=1)
    _, (x, k0_pairs, mask), _, _ = deployable(model, 16, 16)
    k0 = torch.complex(k0_pairs[..., 0], k0_pairs[..., 1])
    out = torch.export.load(str(path)).module()(x, k0_pairs, mask)
    # Re(ifft2(k)) has spectrum (k(f) + conj(k(-f))) / 2; compare on lines sampled at f and -f.
    spectrum = torch.fft.fft2(out, norm="ortho")
    sym = (k0 + torch.conj(torch.roll(torch.flip(k0, (-2, -1)), (1, 1), (-2, -1)))) / 2
    lines = (mask * torch.roll(torch.flip(mask, (-1,)), 1, -1)).bool().expand_as(out)
    assert lines.any()
    assert torch.allclose(spectrum[lines], sym[lines], atol=1e-5)


class DataDependentBranch(nn.Module):
    """A user module whose control flow depends on the data: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0.5:
            return self.conv(x)
        return -self.conv(x)


def test_unexportable_model_says_why_in_one_line(tmp_path):
    path = tmp_path / "branch.pt2"
    with pytest.raises(ExportError) as info:
        export_model(DataDependentBranch(), "exported", path, (8, 8), rounds=1)
    message = str(info.value)
    assert "\n" not in message
    assert "DataDependentBranch: cannot export to exported" in message
    assert "data-dependent" in message.lower() or "guard" in message.lower()
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_bad_format_is_refused(tmp_path):
    with pytest.raises(ExportError, match="--format: expected one of onnx, torchscript, "
                                          "exported, found 'tflite'"):
        export_model(build_model("edsr_small"), "tflite", tmp_path / "x", (8, 8))


def test_interleaved_rounds_call_each_form_once_per_round():
    order = []
    times = interleaved_ms({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                           rounds=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert set(times) == {"a", "b"} and all(t["min"] <= t["median"] for t in times.values())
