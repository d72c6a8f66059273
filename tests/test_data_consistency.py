"""Tests of kdhpc.ops.data_consistency: reference and C++/CUDA fast path against numpy's FFT.

The fast-path tests need the extension (pip install --no-build-isolation -e .); they skip with
that reason when no kdhpc/_C*.so was built, and fail when one was built but does not load.
With ``KDHPC_REQUIRE_EXT=1`` (CI) they never skip: a missing extension fails them. The CUDA tests
carry the ``gpu`` marker (``pytest -m gpu``, run by benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import kdhpc
from kdhpc.ops.data_consistency import (BUILD_COMMAND, data_consistency,
                                        data_consistency_reference)

# kdhpc.ops exports a function of the same name, so fetch the module itself.
dc_module = importlib.import_module("kdhpc.ops.data_consistency")
BUILT = list(Path(kdhpc.__file__).parent.glob("_C*.so"))
if BUILT:
    assert dc_module._fast_available(torch.zeros(1)) is True, dc_module._Extension.error
REQUIRE_EXT = os.environ.get("KDHPC_REQUIRE_EXT", "") == "1"
requires_ext = pytest.mark.skipif(not BUILT and not REQUIRE_EXT,
                                  reason=f"kdhpc._C is not built: run {BUILD_COMMAND} "
                                         f"(KDHPC_REQUIRE_EXT=1 makes this a failure)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.skipif(not REQUIRE_EXT, reason="KDHPC_REQUIRE_EXT=1 is not set")
def test_extension_is_there_when_required():
    assert dc_module._fast_available(torch.zeros(1)) is True, (
        f"KDHPC_REQUIRE_EXT=1 but the C++ extension is unusable: {dc_module._Extension.error}")


def numpy_dc(x, k0, mask, lam, centered, output):
    """Independent spec: numpy FFTs in complex128, shifts spelled out."""
    axes = (-2, -1)
    x, k0, mask = (np.asarray(t.detach().cpu().numpy(), dtype=np.complex128) for t in (x, k0, mask))
    lam = float(lam)
    if centered:
        k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)
    else:
        k = np.fft.fft2(x, norm="ortho")
    k = k + lam * mask.real * (k0 - k)
    if centered:
        image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), norm="ortho"),
                                axes=axes)
    else:
        image = np.fft.ifft2(k, norm="ortho")
    return {"real": image.real, "magnitude": np.abs(image), "complex": image}[output]


def make_mask(kind: str, H: int, W: int, generator, lead=()):
    """Random 0/1 mask: 'cols' [1, W], 'rows' [H, 1], '2d' [H, W], with optional leading dims."""
    shape = {"cols": (1, W), "rows": (H, 1), "2d": (H, W)}[kind]
    return (torch.rand(*lead, *shape, generator=generator) < 0.4).double()


def make_inputs(shape, complex_x, dtype, generator):
    real = torch.float64 if dtype == torch.float64 else torch.float32
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    x = torch.randn(shape, generator=generator, dtype=cplx if complex_x else real)
    k0 = torch.randn(shape, generator=generator, dtype=cplx)
    return x, k0


def assert_close_np(actual, expected, rtol):
    expected = np.asarray(expected)
    scale = max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(actual.detach().cpu().numpy(), expected, rtol=0, atol=rtol * scale)


IMPLS = ["reference", pytest.param("fast", marks=requires_ext)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("kind", ["cols", "rows", "2d"])
@pytest.mark.parametrize("output", ["real", "magnitude", "complex"])
def test_matches_numpy_odd_and_even_sizes(impl, centered, kind, output):
    gen = torch.Generator().manual_seed(hash((centered, kind, output)) % 2**31)
    for shape, complex_x in (((2, 3, 9, 7), True), ((3, 1, 8, 6), False)):
        x, k0 = make_inputs(shape, complex_x, torch.float64, gen)
        mask = make_mask(kind, *shape[-2:], gen)
        lam = float(torch.rand((), generator=gen)) * 0.8 + 0.1
        out = data_consistency(x, k0, mask, lam, centered, output, impl=impl)
        assert_close_np(out, numpy_dc(x, k0, mask, lam, centered, output), 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("centered", [False, True])
def test_kdmri_size_641x367_float32(impl, centered):
    gen = torch.Generator().manual_seed(1)
    x, k0 = make_inputs((2, 1, 641, 367), False, torch.float32, gen)
    for kind, lam in (("cols", 1.0), ("rows", 0.3), ("2d", 1.0)):
        mask = make_mask(kind, 641, 367, gen).float()
        out = data_consistency(x, k0, mask, lam, centered, "real", impl=impl)
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert_close_np(out, numpy_dc(x, k0, mask, lam, centered, "real"), 2e-5)


@requires_ext
def test_per_sample_masks_and_coils_pass_through():
    gen = torch.Generator().manual_seed(2)
    x, k0 = make_inputs((3, 4, 10, 12), True, torch.float64, gen)
    for kind in ("cols", "2d"):
        mask = make_mask(kind, 10, 12, gen, lead=(3, 1))                    # [B, 1, ., .]
        out = data_consistency(x, k0, mask, 0.7, True, "complex", impl="fast")
        assert_close_np(out, numpy_dc(x, k0, mask, 0.7, True, "complex"), 1e-12)
        # Coil c of the output only depends on coil c of the input.
        x2 = x.clone()
        x2[:, 1] += 1.0
        changed = (data_consistency(x2, k0, mask, 0.7, True, "complex", impl="fast") - out)
        assert changed[:, [0, 2, 3]].abs().max() == 0 and changed[:, 1].abs().max() > 0.1


@requires_ext
def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    x_big = torch.randn(2, 1, 12, 20, generator=gen, dtype=torch.float64)
    x = x_big.transpose(-1, -2)[..., ::2, :]                                # [2, 1, 10, 12]
    k0 = torch.randn(2, 1, 12, 10, generator=gen, dtype=torch.complex128).transpose(-1, -2)
    mask = make_mask("cols", 12, 24, gen)[..., ::2]                        # [1, 12] strided
    assert not (x.is_contiguous() or k0.is_contiguous() or mask.is_contiguous())
    for centered in (False, True):
        out = data_consistency(x, k0, mask, 0.3, centered, "real", impl="fast")
        assert_close_np(out, numpy_dc(x, k0, mask, 0.3, centered, "real"), 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_negative_zero(impl):
    # irfft(rfft(-0.0)) is -0.0: with nothing measured the output must still be +0.0.
    x = -torch.zeros(2, 1, 6, 8)
    k0 = torch.zeros(2, 1, 6, 8, dtype=torch.complex64)
    for mask in (torch.zeros(1, 8), torch.ones(6, 8)):
        for output in ("real", "complex"):
            out = data_consistency(x, k0, mask, 1.0, False, output, impl=impl)
            parts = torch.view_as_real(out) if out.is_complex() else out
            assert (parts == 0).all() and not torch.signbit(parts).any()


@requires_ext
@pytest.mark.parametrize("shape,kind,centered,complex_x,output", [
    ((4, 1, 64, 48), "cols", False, False, "real"),        # KD-MRI
    ((2, 3, 33, 21), "rows", True, True, "complex"),       # odd, multi-coil, [H, 1] mask
    ((2, 1, 17, 24), "2d", True, False, "magnitude"),
])
def test_fast_gradients_match_reference(shape, kind, centered, complex_x, output):
    gen = torch.Generator().manual_seed(4)
    x, k0 = make_inputs(shape, complex_x, torch.float32, gen)
    mask = make_mask(kind, *shape[-2:], gen).float()
    results = []
    for impl in ("reference", "fast"):
        xs, k0s = x.clone().requires_grad_(), k0.clone().requires_grad_()
        lam = torch.tensor(0.6, requires_grad=True)
        out = data_consistency(xs, k0s, mask, lam, centered, output, impl=impl)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                               dtype=out.dtype) * 3.0
        (out * grad_out.conj()).real.sum().backward()
        results.append((out, xs.grad, k0s.grad, lam.grad))
    for name, ref, fast in zip(("out", "x", "k0", "lam"), *results):
        scale = ref.abs().max().item()
        assert (fast - ref).abs().max().item() <= 1e-4 * scale, name


GRADCHECK_CASES = [  # (mask kind, centered, output, complex x)
    ("cols", False, "real", False),
    ("cols", True, "complex", True),
    ("rows", True, "real", False),
    ("2d", False, "real", True),
    ("2d", True, "magnitude", False),
]


@pytest.mark.parametrize("impl,kind,centered,output,complex_x", [
    *[pytest.param("fast", *case, marks=requires_ext) for case in GRADCHECK_CASES],
    *[("reference", *case) for case in GRADCHECK_CASES[::2]],
])
def test_gradcheck_float64(impl, kind, centered, output, complex_x):
    gen = torch.Generator().manual_seed(6)
    x, k0 = make_inputs((1, 1, 5, 4), complex_x, torch.float64, gen)
    mask = make_mask(kind, 5, 4, gen)
    if output == "magnitude":   # |z| is not differentiable at 0: keep the output away from it
        x = x + 3.0
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    inputs = (x.requires_grad_(), k0.requires_grad_(), lam)
    assert torch.autograd.gradcheck(
        lambda a, b, c: data_consistency(a, b, mask, c, centered, output, impl=impl), inputs)


@requires_ext
def test_opcheck_each_op():
    gen = torch.Generator().manual_seed(7)
    ops = torch.ops.kdhpc
    for hermitian, kind, centered in ((True, "cols", False), (False, "2d", True)):
        x, k0 = make_inputs((2, 6, 5), not hermitian, torch.float64, gen)
        mask = make_mask(kind, 6, 5, gen)[None]                              # [1, Hm, Wm]
        q = ops.data_consistency_k0_term(k0, mask, centered, hermitian)
        lam = torch.tensor(0.4, dtype=torch.float64)
        torch.library.opcheck(ops.data_consistency_k0_term,
                              (k0.requires_grad_(), mask, centered, hermitian))
        torch.library.opcheck(ops.data_consistency_k0_term_backward,
                              (torch.randn_like(q), mask, centered, hermitian, 6, 5))
        torch.library.opcheck(ops.data_consistency_apply,
                              (x.requires_grad_(), q.requires_grad_(), mask,
                               lam.requires_grad_(), centered, hermitian))
        out = ops.data_consistency_apply(x.detach(), q.detach(), mask, lam.detach(), centered,
                                         hermitian)
        torch.library.opcheck(ops.data_consistency_apply_backward,
                              (torch.randn_like(out), x.detach(), q.detach(), mask,
                               lam.detach(), centered, hermitian, [True, True, True]))


@requires_ext
def test_k0_term_cache_sees_in_place_edits():
    gen = torch.Generator().manual_seed(8)
    x, k0 = make_inputs((2, 1, 8, 10), False, torch.float64, gen)
    mask = make_mask("cols", 8, 10, gen)
    first = data_consistency(x, k0, mask, 1.0, impl="fast")
    again = data_consistency(x, k0, mask, 1.0, impl="fast")
    assert torch.equal(first, again)
    k0.mul_(2.0)
    mask[0, :3] = 1.0 - mask[0, :3]
    edited = data_consistency(x, k0, mask, 1.0, impl="fast")
    assert_close_np(edited, numpy_dc(x, k0, mask, 1.0, False, "real"), 1e-12)


@requires_ext
def test_lam_gradient_independent_of_thread_count():
    gen = torch.Generator().manual_seed(9)
    x, k0 = make_inputs((4, 1, 128, 256), False, torch.float32, gen)   # > 2^16 bins: threaded
    mask = make_mask("cols", 128, 256, gen).float()
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            lam = torch.tensor(0.5, requires_grad=True)
            data_consistency(x, k0, mask, lam, impl="fast").sum().backward()
            grads.append(lam.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


@requires_ext
@pytest.mark.parametrize("shape,kind,complex_x,output", [
    ((8, 1, 320, 320), "cols", False, "real"),       # 3.3 MB of half spectrum: row blocks
    ((2, 4, 160, 368), "rows", True, "complex"),     # 3.8 MB of spectrum: one image per block
])
def test_large_batches_in_cache_sized_blocks(shape, kind, complex_x, output):
    # Spectra above 2 MiB are cut into blocks shared by pool threads; compare with the reference.
    gen = torch.Generator().manual_seed(13)
    x, k0 = make_inputs(shape, complex_x, torch.float32, gen)
    mask = make_mask(kind, *shape[-2:], gen).float()
    results = []
    for impl in ("reference", "fast"):
        xs = x.clone().requires_grad_()
        lam = torch.tensor(0.7, requires_grad=True)
        out = data_consistency(xs, k0, mask, lam, True, output, impl=impl)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(14),
                             dtype=out.dtype)
        (out * weight).real.sum().backward()
        results.append((out.detach(), xs.grad, lam.grad))
    for name, ref, fast in zip(("out", "x", "lam"), *results):
        assert (fast - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), name
    # The blocks' copy out of the FFT buffers turns -0.0 into +0.0 as well.
    zeros = data_consistency(-torch.zeros_like(x), torch.zeros_like(k0), torch.zeros_like(mask),
                             0.7, True, output, impl="fast")
    parts = torch.view_as_real(zeros) if zeros.is_complex() else zeros
    assert (parts == 0).all() and not torch.signbit(parts).any()


@requires_ext
def test_concurrent_calls_from_python_threads():
    # Calls from several threads at once (each threading its FFTs and passes) must not mix; the
    # size is above the 2^16-bin threshold under which the op keeps MKL on the calling thread.
    gen = torch.Generator().manual_seed(12)
    cases = []
    for _ in range(4):
        x, k0 = make_inputs((2, 1, 256, 256), False, torch.float32, gen)
        cases.append((x, k0, make_mask("cols", 256, 256, gen).float()))
    expected = [numpy_dc(x, k0, m, 0.8, True, "real") for x, k0, m in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(lambda c: [data_consistency(*c, 0.8, True, impl="fast")
                                        for _ in range(5)], cases))
    for runs, ref in zip(outs, expected):
        for out in runs:
            assert_close_np(out, ref, 2e-5)


def test_bad_input_errors():
    x = torch.randn(2, 1, 8, 6)
    k0 = torch.randn(2, 1, 8, 6, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"mask of shape \(8, 5\) does not broadcast.*\[8, 1\]"):
        data_consistency(x, k0, torch.ones(8, 5))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 1, 6\) does not broadcast"):
        data_consistency(x, k0, torch.ones(3, 1, 6))
    with pytest.raises(TypeError, match="k0: expected torch.complex64 to match x"):
        data_consistency(x, k0.to(torch.complex128), torch.ones(1, 6))
    with pytest.raises(TypeError, match="x: expected a float32/float64"):
        data_consistency(x.half(), k0, torch.ones(1, 6))
    with pytest.raises(ValueError, match="k0: expected x's shape"):
        data_consistency(x, k0[:1], torch.ones(1, 6))
    with pytest.raises(ValueError, match="k0 is on meta but x is on cpu"):
        data_consistency(x, k0.to("meta"), torch.ones(1, 6))
    with pytest.raises(ValueError, match="mask is on meta but x is on cpu"):
        data_consistency(x, k0, torch.ones(1, 6, device="meta"))
    with pytest.raises(ValueError, match="lam: expected a float or a one-element"):
        data_consistency(x, k0, torch.ones(1, 6), lam=torch.ones(2))
    with pytest.raises(ValueError, match="output: expected one of"):
        data_consistency(x, k0, torch.ones(1, 6), output="imag")


@requires_ext
def test_op_level_errors_name_the_argument():
    x = torch.randn(2, 8, 6)
    mask = torch.ones(1, 1, 6)
    k0 = torch.randn(2, 8, 6, dtype=torch.complex64)
    q = torch.ops.kdhpc.data_consistency_k0_term(k0, mask, False, True)
    lam = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match=r"mask of shape \[1, 1, 5\] does not broadcast"):
        torch.ops.kdhpc.data_consistency_apply(x, q, torch.ones(1, 1, 5), lam, False, True)
    with pytest.raises(RuntimeError, match="q: expected dtype ComplexFloat to match x"):
        torch.ops.kdhpc.data_consistency_apply(x, q.to(torch.complex128), mask, lam, False, True)
    with pytest.raises(RuntimeError, match=r"q: expected the spectrum shape \[2, 8, 4\]"):
        torch.ops.kdhpc.data_consistency_apply(x, q[:, :4], mask, lam, False, True)
    with pytest.raises(RuntimeError, match="hermitian=True needs a real x"):
        torch.ops.kdhpc.data_consistency_apply(k0, q, mask, lam, False, True)


def _pretend_extension_missing(monkeypatch, how: str):
    """Reset the loader's state so that the next call loads (or fails to load) again."""
    monkeypatch.setattr(dc_module._Extension, "module", None)
    monkeypatch.setattr(dc_module._Extension, "tried", False)
    monkeypatch.setattr(dc_module._Extension, "warned", set())
    monkeypatch.delenv("KDHPC_JIT", raising=False)
    monkeypatch.delenv("KDHPC_IMPL", raising=False)
    if how == "missing":
        monkeypatch.delattr(kdhpc, "_C", raising=False)
        monkeypatch.setitem(sys.modules, "kdhpc._C", None)
    else:
        monkeypatch.setattr(kdhpc._C, "torch_version", "0.0.1")


@pytest.mark.parametrize("how", ["missing", pytest.param("other_torch", marks=requires_ext)])
def test_fallback_says_so_once_and_uses_reference(monkeypatch, how):
    _pretend_extension_missing(monkeypatch, how)
    gen = torch.Generator().manual_seed(10)
    x, k0 = make_inputs((1, 1, 6, 8), False, torch.float64, gen)
    mask = make_mask("cols", 6, 8, gen)
    with pytest.warns(RuntimeWarning) as record:
        first = data_consistency(x, k0, mask, 0.5)
        second = data_consistency(x, k0, mask, 0.5)
    messages = [str(w.message) for w in record if "data_consistency" in str(w.message)]
    assert len(messages) == 1
    assert BUILD_COMMAND in messages[0] and "KDHPC_JIT=1" in messages[0]
    assert ("not built" in messages[0]) if how == "missing" else ("torch 0.0.1" in messages[0])
    expected = numpy_dc(x, k0, mask, 0.5, False, "real")
    assert_close_np(first, expected, 1e-12)
    assert torch.equal(first, second)
    with pytest.raises(RuntimeError, match="impl='fast' requested but unavailable"):
        data_consistency(x, k0, mask, 0.5, impl="fast")


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_kernels_compile_without_torch(tmp_path):
    # The raw kernels have a plain C++ launcher interface, so they build with nvcc alone, also
    # where torch has no CUDA headers; the torch glue is compiled only by CUDA builds.
    source = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "data_consistency_kernels.cu"
    result = subprocess.run(["nvcc", "-std=c++17", "-O1", "-c", str(source), "-o",
                             str(tmp_path / "kernels.o")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kernels.o").stat().st_size > 0


@pytest.mark.gpu
@requires_ext
@requires_cuda
@pytest.mark.parametrize("kind,centered,complex_x,output", [
    ("cols", False, False, "real"), ("cols", True, True, "complex"), ("rows", True, True, "complex"),
    ("rows", False, False, "magnitude"), ("2d", True, False, "real"), ("2d", False, True, "real")])
def test_cuda_matches_cpu_values_and_gradients(kind, centered, complex_x, output):
    gen = torch.Generator().manual_seed(11)
    x, k0 = make_inputs((2, 3, 33, 20), complex_x, torch.float32, gen)
    mask = make_mask(kind, 33, 20, gen).float()
    results = []
    for device in ("cpu", "cuda"):
        xs = x.to(device).requires_grad_()
        lam = torch.tensor(0.7, device=device, requires_grad=True)
        stream = torch.cuda.Stream() if device == "cuda" else None
        with torch.cuda.stream(stream) if stream else torch.autograd.profiler.record_function(""):
            out = data_consistency(xs, k0.to(device), mask.to(device), lam, centered, output,
                                   impl="fast")
            (out.abs() ** 2).sum().backward()
        if stream:
            torch.cuda.synchronize()
        results.append((out.detach().cpu(), xs.grad.cpu(), lam.grad.cpu()))
    for ref, got in zip(*results):
        assert (got - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1.0)


@pytest.mark.gpu
@requires_ext
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind,centered,complex_x,output", [
    ("cols", False, False, "real"), ("cols", True, True, "complex"), ("rows", True, False, "real"),
    ("2d", False, True, "magnitude")])
def test_cuda_matches_reference_values_and_gradients(dtype, kind, centered, complex_x, output):
    # The CUDA kernels against the plain-torch composite on the GPU itself: odd sizes, per-sample
    # masks, a non-contiguous x and a soft lam, values and every gradient.
    gen = torch.Generator().manual_seed(5)
    x, k0 = make_inputs((3, 2, 21, 17), complex_x, dtype, gen)
    mask = make_mask(kind, 21, 17, gen, lead=(3, 1)).to(dtype).cuda()
    x = x.cuda().transpose(-2, -1).contiguous().transpose(-2, -1)   # same values, strided
    k0 = k0.cuda()
    results = {}
    for impl in ("fast", "reference"):
        xs, ks = x.clone().requires_grad_(), k0.clone().requires_grad_()
        lam = torch.tensor(0.6, dtype=dtype, device="cuda", requires_grad=True)
        out = data_consistency(xs, ks, mask, lam, centered, output, impl=impl)
        (out.abs() ** 2 * torch.linspace(0.5, 1.5, out.shape[-1], device="cuda")).sum().backward()
        results[impl] = (out.detach(), xs.grad, ks.grad, lam.grad)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    for got, ref in zip(results["fast"], results["reference"]):
        assert (got - ref).abs().max().item() <= rtol * max(ref.abs().max().item(), 1.0)


def test_extension_version_check_ignores_build_suffixes():
    # Vendor and source builds of torch ("2.6.0a0+ecf3bae") compile TORCH_VERSION without the
    # suffix; the check compares major.minor.patch only, and still refuses another release.
    assert dc_module._release("2.6.0a0+ecf3bae") == dc_module._release("2.6.0") == "2.6.0"
    assert dc_module._release("2.13.0+cpu") == "2.13.0" != dc_module._release("2.12.1")
    assert dc_module._release(None) is None and dc_module._release("?") is None
