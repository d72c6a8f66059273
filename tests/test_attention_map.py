"""Attention maps and the AT loss: Triton kernels against the reference, the reference against
an independent float64 NumPy computation, gradcheck, dispatch and errors.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.
"""

import importlib

import numpy as np
import pytest
import torch

from kdhpc.ops import dispatch
from kdhpc.ops.attention_map import (attention_map, attention_map_loss,
                                     attention_map_loss_reference, attention_map_reference)

at = importlib.import_module("kdhpc.ops.attention_map")  # the package exports a same-named op

# The whole module runs on CUDA where there is one (benchmarks/gpu_check.sh: pytest -m gpu).
pytestmark = pytest.mark.gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    at.triton is None or not (torch.cuda.is_available() or at.INTERPRETED),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")

# Both paths compute in fp32 from the same low-precision inputs, so the loss agrees to fp32
# rounding; the gradient is rounded once to the input dtype by both (one ulp apart at most).
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
LOSS_RTOL = 2e-5
MODES = ("paper", "kdmri_code")
# (student [B, C_S, H, W], teacher channels): a realistic small shape, an odd one, and one with
# several pixel tiles and channel chunks per program.
SHAPES = [((2, 3, 8, 8), 4), ((3, 5, 7, 9), 2), ((2, 40, 13, 11), 33)]


def _features(shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype)


def _loss_and_grad(student, teacher, grad_output, **kwargs):
    student = student.detach().requires_grad_(True)
    loss = attention_map_loss(student, teacher, **kwargs)
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    return loss.detach(), grad


def _assert_grads_close(fast, reference, dtype, atol=None):
    """``atol`` defaults to the tolerance times the largest reference gradient."""
    tolerance = GRAD_TOLERANCE[dtype]
    assert fast.dtype == reference.dtype == dtype
    assert torch.isfinite(fast).all()
    if atol is None:
        atol = tolerance * reference.float().abs().max().item()
    torch.testing.assert_close(fast.float(), reference.float(), rtol=tolerance, atol=atol)


def _assert_fast_matches_reference(student, teacher, grad_atol=None, **kwargs):
    grad_output = torch.randn((), device=DEVICE) + 2.0      # non-unit, either sign possible
    loss_fast, grad_fast = _loss_and_grad(student, teacher, grad_output, impl="fast", **kwargs)
    loss_ref, grad_ref = _loss_and_grad(student, teacher, grad_output, impl="reference",
                                        **kwargs)
    assert loss_fast.dtype == loss_ref.dtype == torch.float32
    assert torch.isfinite(loss_fast)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=LOSS_RTOL, atol=1e-7)
    _assert_grads_close(grad_fast, grad_ref, student.dtype, grad_atol)
    return loss_fast, grad_fast


def _numpy_loss(student, teacher, p, mode):
    """The loss of one pair in float64 NumPy, written from the formulas, not from the code."""
    def raw(x):
        x = x.detach().double().cpu().numpy()
        return (np.abs(x) ** p).sum(axis=1).reshape(x.shape[0], -1) if x.ndim == 4 else \
            x.reshape(x.shape[0], -1)

    axis = 1 if mode == "paper" else 0
    q_s, q_t = raw(student), raw(teacher)
    q_s = q_s / np.maximum(np.sqrt((q_s ** 2).sum(axis=axis, keepdims=True)), 1e-12)
    q_t = q_t / np.maximum(np.sqrt((q_t ** 2).sum(axis=axis, keepdims=True)), 1e-12)
    if mode == "paper":
        return np.sqrt(((q_s - q_t) ** 2).sum(axis=1)).mean()
    return np.abs(q_s - q_t).mean()


# ------------------------------------------------------------------------ reference, the spec

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [1, 2, 3.5])
def test_reference_matches_numpy_formula(mode, p):
    student, teacher = _features((3, 4, 5, 6)), _features((3, 7, 5, 6))
    loss = attention_map_loss_reference(student, teacher, p=p, mode=mode)
    assert loss.item() == pytest.approx(_numpy_loss(student, teacher, p, mode), rel=1e-5)


def test_reference_attention_map_matches_numpy():
    features = _features((2, 3, 5, 4))
    raw = (features.double().cpu().numpy() ** 2).sum(axis=1).reshape(2, -1)
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(attention_map_reference(features).cpu().numpy(), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(attention_map_reference(features, normalize=False).cpu().numpy(),
                               raw, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("teacher_kind", ["features", "map"])
@pytest.mark.parametrize("p", [2, 3])
def test_reference_gradcheck_float64(mode, teacher_kind, p):
    student = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    if teacher_kind == "map":
        teacher = attention_map_reference(teacher, p, normalize=False).reshape(2, 4, 5)
    assert torch.autograd.gradcheck(
        lambda s: attention_map_loss_reference(s, teacher, p=p, mode=mode), (student,))


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_attention_map_gradcheck_float64(normalize):
    features = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: attention_map_reference(x, 3, normalize),
                                    (features,))


# ------------------------------------------------------------------ kernels against reference

@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,teacher_channels", SHAPES[:2])
@pytest.mark.parametrize("mode", MODES)
def test_loss_kernel_matches_reference(mode, shape, teacher_channels, dtype):
    student = _features(shape, dtype)
    teacher = _features((shape[0], teacher_channels, *shape[2:]), dtype)   # C_T != C_S
    _assert_fast_matches_reference(student, teacher, mode=mode)


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [1, 3, 2.5])
def test_loss_kernel_other_exponents(mode, p):
    student, teacher = _features((2, 3, 6, 5)), _features((2, 4, 6, 5))
    _assert_fast_matches_reference(student, teacher, mode=mode, p=p)


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_loss_kernel_several_tiles_and_channel_chunks(mode):
    shape, teacher_channels = SHAPES[2]
    student, teacher = _features(shape), _features((shape[0], teacher_channels, *shape[2:]))
    _assert_fast_matches_reference(student, teacher, mode=mode)
    # One channel, 2304 pixels: several map tiles and several sweeps of the paper finish.
    _assert_fast_matches_reference(_features((2, 1, 48, 48)), _features((2, 1, 48, 48)),
                                   mode=mode)


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_loss_kernel_non_contiguous_inputs(mode):
    base = _features((3, 6, 7, 10))
    channels_last = base.contiguous(memory_format=torch.channels_last)
    w_slice = base[:, :, :, 1:8]                          # pixels no longer n * stride
    channel_slice = _features((3, 9, 7, 7))[:, ::2]       # strided channels, flat planes
    teacher = _features((3, 2, 7, 7)).contiguous(memory_format=torch.channels_last)
    _assert_fast_matches_reference(w_slice, channel_slice, mode=mode)
    _assert_fast_matches_reference(channel_slice, w_slice, mode=mode)
    _assert_fast_matches_reference(channels_last[:, :, :, :7], teacher, mode=mode)
    _, grad = _assert_fast_matches_reference(channels_last, _features((3, 2, 7, 10)), mode=mode)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    transposed_map = attention_map_reference(_features((3, 2, 10, 7)), normalize=False)
    transposed_map = transposed_map.reshape(3, 10, 7).transpose(1, 2)       # [B, H, W] strided
    _assert_fast_matches_reference(channels_last, transposed_map, mode=mode)


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_loss_kernel_all_zero_activations(mode):
    shape = (2, 3, 5, 6)
    zeros, random = torch.zeros(shape, device=DEVICE), _features(shape)
    for student, teacher in ((zeros, random), (random, zeros), (zeros, zeros)):
        # Against a zero teacher the paper loss is 1 whatever the student: its exact gradient
        # is 0 and both paths return rounding noise, compared on the scale of a typical gradient.
        loss, grad = _assert_fast_matches_reference(student, teacher, grad_atol=1e-6, mode=mode)
        expected = _numpy_loss(student, teacher, 2, mode)
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
        if student is zeros:
            assert torch.count_nonzero(grad) == 0


@needs_kernels
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float16, 2e4),
                                         (torch.bfloat16, 1e6)])
@pytest.mark.parametrize("mode", MODES)
def test_loss_kernel_large_activations(mode, dtype, scale):
    shape = (2, 4, 6, 7)
    student = _features(shape, scale=scale).clamp(-6e4, 6e4).to(dtype)
    teacher = _features(shape, scale=scale).clamp(-6e4, 6e4).to(dtype)
    loss, _ = _assert_fast_matches_reference(student, teacher, mode=mode)
    assert loss.item() == pytest.approx(_numpy_loss(student, teacher, 2, mode), rel=1e-4)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_attention_map_kernel_matches_reference(normalize, dtype):
    features = _features((3, 5, 7, 9), dtype).requires_grad_(True)
    weights = torch.randn(3, 63, device=DEVICE)           # a non-uniform upstream gradient
    fast = attention_map(features, normalize=normalize, impl="fast")
    reference = attention_map(features, normalize=normalize, impl="reference")
    torch.testing.assert_close(fast, reference, rtol=1e-5,
                               atol=1e-7 * reference.abs().max().item())
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), features)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), features)
    _assert_grads_close(grad_fast, grad_ref, dtype)


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_loss_kernel_without_grad_and_with_retained_graph(mode):
    student, teacher = _features((2, 3, 6, 6)), _features((2, 3, 6, 6))
    expected = attention_map_loss_reference(student, teacher, mode=mode)
    with torch.no_grad():
        torch.testing.assert_close(attention_map_loss(student, teacher, mode=mode, impl="fast"),
                                   expected, rtol=LOSS_RTOL, atol=0)
    student.requires_grad_(True)
    loss = attention_map_loss(student, teacher, mode=mode, impl="fast")
    loss.backward(retain_graph=True)
    once = student.grad.clone()
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * once)


# --------------------------------------------------------------- teacher forms, lists of pairs

@pytest.mark.parametrize("impl", ["reference", pytest.param("fast", marks=needs_kernels)])
@pytest.mark.parametrize("mode", MODES)
def test_teacher_maps_give_the_same_loss_as_teacher_features(mode, impl):
    student, teacher = _features((3, 4, 6, 5)), _features((3, 6, 6, 5), torch.bfloat16)
    grad_output = torch.randn((), device=DEVICE)
    loss, grad = _loss_and_grad(student, teacher, grad_output, mode=mode, impl=impl)
    raw = attention_map(teacher, normalize=False, impl="reference")            # [B, N]
    maps = [raw, raw.reshape(3, 6, 5), raw.half()]
    if mode == "paper":  # per-sample renormalisation is idempotent
        maps.append(attention_map(teacher, impl="reference").reshape(3, 6, 5))
    for teacher_map in maps:
        map_loss, map_grad = _loss_and_grad(student, teacher_map, grad_output, mode=mode,
                                            impl=impl)
        rtol = 2e-3 if teacher_map.dtype == torch.float16 else 1e-5
        torch.testing.assert_close(map_loss, loss, rtol=rtol, atol=1e-7)
        torch.testing.assert_close(map_grad, grad, rtol=rtol,
                                   atol=rtol * grad.abs().max().item())


@pytest.mark.parametrize("impl", ["reference", pytest.param("fast", marks=needs_kernels)])
@pytest.mark.parametrize("mode", MODES)
def test_list_of_pairs_sums_or_averages(mode, impl):
    students = [_features((2, 3, 6, 6)), _features((2, 2, 4, 5))]
    teachers = [_features((2, 5, 6, 6)), attention_map_reference(_features((2, 4, 4, 5)),
                                                                 normalize=False)]
    total = attention_map_loss(students, teachers, mode=mode, impl=impl)
    singles = [attention_map_loss_reference(s, t, mode=mode) for s, t in zip(students, teachers)]
    expected = sum(singles) / (1 if mode == "paper" else len(singles))
    torch.testing.assert_close(total, expected, rtol=LOSS_RTOL, atol=0)
    numpy_total = sum(_numpy_loss(s, t, 2, mode) for s, t in zip(students, teachers))
    assert total.item() == pytest.approx(numpy_total / (1 if mode == "paper" else 2), rel=1e-5)
    if impl == "fast":
        leaves = [s.detach().requires_grad_(True) for s in students]
        grads_fast = torch.autograd.grad(attention_map_loss(leaves, teachers, mode=mode,
                                                            impl="fast"), leaves)
        grads_ref = torch.autograd.grad(attention_map_loss_reference(leaves, teachers, mode=mode),
                                        leaves)
        for grad_fast, grad_ref in zip(grads_fast, grads_ref):
            _assert_grads_close(grad_fast, grad_ref, torch.float32)


# ----------------------------------------------------------------------------------- dispatch

def _ran_kernel(loss: torch.Tensor) -> bool:
    return "AttentionMapLossFunction" in type(loss.grad_fn).__name__


@needs_kernels
def test_dispatch_auto_override_and_explicit_choice():
    student = _features((2, 3, 4, 4)).requires_grad_(True)
    teacher = _features((2, 3, 4, 4))
    assert _ran_kernel(attention_map_loss(student, teacher)) == torch.cuda.is_available()
    assert not _ran_kernel(attention_map_loss(student, teacher, impl="reference"))
    with dispatch.force_impl("fast"):
        assert _ran_kernel(attention_map_loss(student, teacher))
        assert not _ran_kernel(attention_map_loss(student, teacher, impl="reference"))
    with dispatch.force_impl("reference"):
        assert not _ran_kernel(attention_map_loss(student, teacher))
        assert _ran_kernel(attention_map_loss(student, teacher, impl="fast"))


@needs_kernels
def test_dispatch_falls_back_where_the_kernel_cannot_run(monkeypatch):
    student = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    teacher = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=DEVICE)
    assert not _ran_kernel(attention_map_loss(student, teacher))
    with pytest.raises(RuntimeError, match="float64"):
        attention_map_loss(student, teacher, impl="fast")
    # kdmri_code holds a pixel's batch column on chip: a batch above the limit falls back.
    monkeypatch.setattr(at, "BATCH_COLUMN_MAX", 2)
    student, teacher = student.float().detach().requires_grad_(True), teacher.float()
    with dispatch.force_impl("fast"):
        assert _ran_kernel(attention_map_loss(student, teacher, mode="paper"))
        with pytest.raises(RuntimeError, match="batch 3 > 2"):
            attention_map_loss(student, teacher, mode="kdmri_code")
    assert not _ran_kernel(attention_map_loss(student, teacher, mode="kdmri_code"))


# ------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("loss_fn", [attention_map_loss, attention_map_loss_reference])
def test_bad_arguments_are_refused_with_a_clear_message(loss_fn):
    student, teacher = _features((2, 3, 6, 6)), _features((2, 5, 6, 6))
    cases = [
        ((student, _features((2, 3, 6, 7))), {}, ValueError, r"teacher.*\(2, 3, 6, 7\).*spatial"),
        ((student, _features((3, 3, 6, 6))), {}, ValueError, "batch and spatial"),
        ((student, torch.randn(2, 35)), {}, ValueError, r"precomputed map \[B, H, W\]"),
        ((student[0], teacher[0]), {}, ValueError, r"student_features.*\[B, C, H, W\]"),
        ((student.int(), teacher), {}, TypeError, "student_features.*torch.int32"),
        ((student, teacher.to(torch.complex64)), {}, TypeError, "teacher.*complex64"),
        ((student, teacher), {"mode": "l2"}, ValueError, "mode.*'l2'"),
        ((student, teacher), {"p": 0.5}, ValueError, "p: expected a finite exponent >= 1"),
        ((student, teacher), {"p": float("nan")}, ValueError, "p: expected"),
        ((student, teacher), {"p": "2"}, TypeError, "p: expected a real number"),
        ((student, teacher.clone().requires_grad_(True)), {}, ValueError, r"teacher\.detach\(\)"),
        (([student, student], [teacher]), {}, ValueError, "list of 2 items.*found 1 items"),
        (([student], teacher), {}, ValueError, "teacher: expected a list of 1"),
        ((student, [teacher]), {}, ValueError, "teacher: expected a tensor"),
        (([], []), {}, ValueError, "at least one layer pair"),
        (([student, student], [teacher, student[:1]]), {}, ValueError,
         r"teacher\[1\]"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            loss_fn(*args, **kwargs)
    if loss_fn is attention_map_loss:
        with pytest.raises(ValueError, match="impl"):
            attention_map_loss(student, teacher, impl="triton")


def test_attention_map_refuses_bad_input():
    with pytest.raises(ValueError, match=r"features.*\[B, C, H, W\].*\(3, 4\)"):
        attention_map(torch.randn(3, 4))
    with pytest.raises(TypeError, match="features.*torch.int64"):
        attention_map(torch.ones(1, 2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        attention_map(torch.randn(0, 2, 3, 3))
    with pytest.raises(ValueError, match="p: expected"):
        attention_map_reference(torch.randn(1, 2, 3, 3), p=0)
