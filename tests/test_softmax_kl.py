"""softmax_kl: the Triton kernels (Triton's interpreter on CPU) against the reference, and the
reference against independent computations (F.kl_div, float64 gradcheck)."""

import pytest
import torch
import torch.nn.functional as F

from kdhpc.ops import dispatch
from kdhpc.ops.softmax_kl import INTERPRETED, softmax_kl, softmax_kl_reference

# The whole module runs on CUDA where there is one (benchmarks/gpu_check.sh: pytest -m gpu).
pytestmark = pytest.mark.gpu

needs_fast = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRETED),
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 (set by conftest.py on CPU)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST_NODE = "_SoftmaxKLFunctionBackward"   # the autograd node of the Triton path

# gradient tolerance relative to the largest gradient entry: two roundings to the dtype
GRAD_TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# name -> (shape, class dim, tile): small for the interpreter, tiles small enough to repeat
COLUMNS = {"segmentation": ((2, 4, 16, 24), 1, None), "odd": ((3, 5, 7, 11), 1, 16)}
ROWS = {"vocabulary": ((6, 300), -1, 128), "odd": ((5, 129), 1, 64),
        "default_tile": ((2, 9000), -1, None)}

def _pair(shape, dtype, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)
    teacher = (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)
    return student, teacher


def _loss_and_grad(student, teacher, temperature, dim, reduction="batchmean",
                   teacher_is_logits=True, impl="fast", tile=None, seed=0):
    """Loss and student gradient for a fresh non-unit grad_output (per position for 'none')."""
    student = student.detach().requires_grad_(True)
    if impl == "fast":
        loss = softmax_kl(student, teacher, temperature, dim, reduction, teacher_is_logits,
                          impl="fast", tile=tile)
        assert type(loss.grad_fn).__name__ == FAST_NODE
    else:
        loss = softmax_kl_reference(student, teacher, temperature, dim, reduction,
                                    teacher_is_logits)
    generator = torch.Generator().manual_seed(seed + 1)
    grad_output = (torch.rand(loss.shape, generator=generator) + 0.5).to(loss.device, loss.dtype)
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    return loss.detach(), grad


def _assert_matches_reference(student, teacher, temperature, dim, reduction="batchmean",
                              teacher_is_logits=True, tile=None, grad_rtol=None):
    grad_rtol = grad_rtol or GRAD_TOLERANCES[student.dtype]
    fast = _loss_and_grad(student, teacher, temperature, dim, reduction, teacher_is_logits,
                          "fast", tile)
    ref = _loss_and_grad(student, teacher, temperature, dim, reduction, teacher_is_logits,
                         "reference")
    assert fast[0].dtype == ref[0].dtype == torch.float32
    # The loss is a sum of terms p (log p - log q) whose log-probabilities are far larger than
    # a small KL, so the float32 reference is itself off by many ulps of the result: allow
    # the fast path a few times the reference's own error against float64 (same inputs).
    truth = _loss_and_grad(student.double(), teacher.double(), temperature, dim, reduction,
                           teacher_is_logits, "reference")[0]
    reference_error = (ref[0].double() - truth).abs().max().item()
    loss_atol = 3 * reference_error + 1e-6 * truth.abs().max().item()
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=loss_atol)
    assert fast[1].dtype == student.dtype and fast[1].shape == student.shape
    grad_atol = grad_rtol * ref[1].float().abs().max().item() + 1e-12
    torch.testing.assert_close(fast[1].float(), ref[1].float(), rtol=grad_rtol, atol=grad_atol)
    return fast, ref


@needs_fast
@pytest.mark.parametrize("dtype, temperature", [
    *((torch.float32, t) for t in (0.5, 1.0, 4.0, 20.0)),
    (torch.bfloat16, 0.5), (torch.bfloat16, 4.0), (torch.float16, 1.0), (torch.float16, 20.0)],
    ids=str)
@pytest.mark.parametrize("case", [COLUMNS["odd"], ROWS["vocabulary"]], ids=["columns", "rows"])
def test_kernels_match_reference(case, dtype, temperature):
    shape, dim, tile = case
    student, teacher = _pair(shape, dtype, seed=int(temperature * 10) + len(shape))
    _assert_matches_reference(student, teacher, temperature, dim, tile=tile)


@needs_fast
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, case", [("segmentation", COLUMNS["segmentation"]),
                                        ("odd_rows", ROWS["odd"]),
                                        ("default_tile", ROWS["default_tile"])])
def test_kernels_match_reference_on_more_shapes(name, case, dtype):
    """A segmentation batch and rows of 9000 classes (three 4096 tiles) with the default tiles,
    and rows whose class count is one past a power of two."""
    shape, dim, tile = case
    student, teacher = _pair(shape, dtype, seed=len(name))
    _assert_matches_reference(student, teacher, 4.0, dim, tile=tile)


@needs_fast
@pytest.mark.parametrize("teacher_is_logits", [True, False])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("case", [COLUMNS["odd"], ROWS["vocabulary"]], ids=["columns", "rows"])
def test_every_reduction_and_teacher_form(case, reduction, teacher_is_logits):
    shape, dim, tile = case
    student, teacher = _pair(shape, torch.float32, seed=7)
    if not teacher_is_logits:
        teacher = torch.log_softmax(teacher / 2.0, dim=dim)
    _assert_matches_reference(student, teacher, 2.0, dim, reduction, teacher_is_logits, tile)


@needs_fast
@pytest.mark.parametrize("case", ["columns", "columns_rows_as_positions", "rows",
                                  "rows_class_dim_not_last"])
def test_non_contiguous_inputs(case):
    generator = torch.Generator().manual_seed(3)
    if case == "columns":        # class stride 1 (channels-last-like) and a strided teacher
        student = torch.randn(2, 9, 8, 4, generator=generator).permute(0, 3, 2, 1)
        teacher = torch.randn(2, 4, 8, 18, generator=generator)[..., ::2]
        dim, tile = 1, 16
    elif case == "columns_rows_as_positions":   # [N, K] with K innermost and small
        student = torch.randn(40, 6, generator=generator)[::2]
        teacher = torch.randn(6, 20, generator=generator).t()
        dim, tile = -1, 16
    elif case == "rows":         # class stride != 1 and a row stride != V
        student = torch.randn(300, 6, generator=generator).t()
        teacher = torch.randn(6, 400, generator=generator)[:, :300]
        dim, tile = -1, 128
    else:                        # many classes, not innermost: moved last by the op
        student = torch.randn(2, 3, 100, 5, generator=generator).transpose(1, 2)
        teacher = torch.randn(2, 100, 3, 5, generator=generator)
        dim, tile = 1, 128
    assert not student.is_contiguous()
    _assert_matches_reference(student.to(DEVICE), teacher.to(DEVICE), 3.0, dim, tile=tile)


@needs_fast
@pytest.mark.parametrize("temperature", [0.5, 20.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [COLUMNS["odd"], ROWS["vocabulary"]], ids=["columns", "rows"])
def test_logits_of_1e4(case, dtype, temperature):
    shape, dim, tile = case
    generator = torch.Generator().manual_seed(11)
    signs = [torch.randint(0, 2, shape, generator=generator) * 2 - 1 for _ in range(2)]
    student, teacher = (
        (sign * 1e4 + torch.randn(shape, generator=generator)).to(DEVICE, dtype) for sign in signs)
    # One ulp of a logit of 1e4 / T moves the probabilities by 1e4 / T * 2^-24 relative:
    # a difference the kernel (x * (1/T)) and torch (x / T) are entitled to.
    conditioning = 4 * 1e4 / temperature * 2.0 ** -24
    grad_rtol = max(GRAD_TOLERANCES[dtype], conditioning)
    fast, ref = _assert_matches_reference(student, teacher, temperature, dim, tile=tile,
                                          grad_rtol=grad_rtol)
    assert torch.isfinite(fast[0]).all() and torch.isfinite(fast[1]).all()
    assert fast[0] > 0  # the teacher's winners differ from the student's at many positions


@needs_fast
@pytest.mark.parametrize("case", [COLUMNS["odd"], ROWS["vocabulary"]], ids=["columns", "rows"])
def test_all_zero_inputs_give_zero_loss_and_gradient(case):
    shape, dim, tile = case
    zeros = torch.zeros(shape, device=DEVICE)
    loss, grad = _loss_and_grad(zeros, zeros, 4.0, dim, "sum", tile=tile)
    assert loss.item() == 0.0 and not grad.any()   # the kernel forms q - p: exactly zero
    loss, grad = _loss_and_grad(zeros, zeros, 4.0, dim, "sum", impl="reference")
    assert loss.item() == 0.0 and grad.abs().max() < 1e-6   # autograd: q * sum(p) - p


@needs_fast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradient_is_rounded_once_from_fp32(dtype):
    """Where q ~ p the gradient T (q - p) is far smaller than q and p. Formed in fp32 and then
    rounded, each entry stays within two roundings of the float64 truth relative to itself,
    up to fp32 noise on q and p; forming q - p in bf16/fp16 (the Liger bug) would leave errors
    of a unit of q + p (2^-8 or 2^-11), far above the fp32 allowance (2^-16) used here."""
    shape, dim, tile = ROWS["vocabulary"]
    student, teacher = _pair(shape, dtype, seed=5, scale=1.0)
    teacher = (student.float() + 0.01 * teacher.float()).to(dtype)   # q ~ p almost everywhere
    _, fast = _loss_and_grad(student, teacher, 1.0, dim, "sum", tile=tile)
    _, truth = _loss_and_grad(student.double(), teacher.double(), 1.0, dim, "sum",
                              impl="reference")
    # Largest relative error of one rounding to the dtype. Triton's interpreter converts
    # fp32 -> bf16 by truncation (a GPU rounds to nearest), which doubles it there.
    unit = {torch.bfloat16: 2.0 ** (-7 if INTERPRETED else -8), torch.float16: 2.0 ** -11}[dtype]
    q_plus_p = (torch.softmax(student.double(), dim) + torch.softmax(teacher.double(), dim))
    fp32_noise = 1.5 * 2.0 ** -16 * q_plus_p    # measured ~2^-22; grad_output <= 1.5
    error = (fast.double() - truth).abs()
    spacing = 2.0 ** -24 if dtype == torch.float16 else 0.0   # fp16's subnormal step
    assert (error <= 2.5 * unit * truth.abs() + 2 * spacing + fp32_noise).all()
    assert (truth.abs() < 0.05 * q_plus_p).float().mean() > 0.5    # the hard case dominates


@needs_fast
@pytest.mark.parametrize("case", [COLUMNS["segmentation"], ROWS["odd"]], ids=["columns", "rows"])
def test_teacher_as_log_probs_equals_teacher_as_logits(case):
    shape, dim, tile = case
    student, teacher = _pair(shape, torch.float32, seed=13)
    temperature = 4.0
    log_probs = torch.log_softmax(teacher / temperature, dim=dim)
    for impl in ("fast", "reference"):
        from_logits = _loss_and_grad(student, teacher, temperature, dim, impl=impl, tile=tile)
        from_log_probs = _loss_and_grad(student, log_probs, temperature, dim,
                                        teacher_is_logits=False, impl=impl, tile=tile)
        torch.testing.assert_close(from_log_probs[0], from_logits[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_log_probs[1], from_logits[1], rtol=1e-5,
                                   atol=2e-5 * from_logits[1].abs().max().item())


@pytest.mark.parametrize("shape, dim", [((3, 5, 4, 2), 1), ((4, 7), -1)])
def test_reference_matches_kl_div_and_reductions(shape, dim):
    student, teacher = _pair(shape, torch.float64, seed=17)
    temperature = 3.0
    log_q = F.log_softmax(student / temperature, dim=dim)
    log_p = F.log_softmax(teacher / temperature, dim=dim)
    pointwise = F.kl_div(log_q, log_p, reduction="none", log_target=True) * temperature ** 2
    per_position = pointwise.sum(dim)
    args = (student, teacher, temperature, dim)
    torch.testing.assert_close(softmax_kl_reference(*args, "none"), per_position)
    torch.testing.assert_close(softmax_kl_reference(*args, "sum"), per_position.sum())
    torch.testing.assert_close(softmax_kl_reference(*args, "mean"), per_position.mean())
    torch.testing.assert_close(softmax_kl_reference(*args, "batchmean"),
                               per_position.sum() / shape[0])
    # F.kl_div's "mean" averages over every element, classes included; ours is K times that.
    torch.testing.assert_close(softmax_kl_reference(*args, "mean"),
                               pointwise.mean() * shape[dim])


@pytest.mark.parametrize("teacher_is_logits", [True, False])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("shape, dim", [((2, 3, 2, 3), 1), ((3, 6), -1)])
def test_reference_gradcheck_float64(shape, dim, reduction, teacher_is_logits):
    student, teacher = _pair(shape, torch.float64, seed=19)
    if not teacher_is_logits:
        teacher = torch.log_softmax(teacher / 1.5, dim=dim)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: softmax_kl_reference(s, teacher, 1.5, dim, reduction, teacher_is_logits),
        (student,))


@needs_fast
def test_dispatch_picks_paths():
    student, teacher = _pair((2, 4, 3, 5), torch.float32, seed=23)
    student.requires_grad_(True)
    forced = softmax_kl(student, teacher, 2.0, impl="fast")
    assert type(forced.grad_fn).__name__ == FAST_NODE
    reference = softmax_kl(student, teacher, 2.0, impl="reference")
    assert type(reference.grad_fn).__name__ != FAST_NODE
    auto = softmax_kl(student, teacher, 2.0)
    assert (type(auto.grad_fn).__name__ == FAST_NODE) == torch.cuda.is_available()
    with dispatch.force_impl("fast"):
        assert type(softmax_kl(student, teacher, 2.0).grad_fn).__name__ == FAST_NODE
        assert type(softmax_kl(student, teacher, 2.0, impl="reference").grad_fn).__name__ \
            != FAST_NODE
    with dispatch.force_impl("reference"):
        assert type(softmax_kl(student, teacher, 2.0).grad_fn).__name__ != FAST_NODE
    torch.testing.assert_close(forced, reference)
    # float64 has no kernel: "auto" quietly uses the reference, "fast" says why it cannot.
    assert softmax_kl(student.double(), teacher.double(), 2.0).dtype == torch.float64
    with pytest.raises(RuntimeError, match="float64"):
        softmax_kl(student.double(), teacher.double(), 2.0, impl="fast")


@needs_fast
def test_forward_without_grad_matches_reference():
    shape, dim, tile = ROWS["vocabulary"]
    student, teacher = _pair(shape, torch.float32, seed=29)
    with torch.no_grad():
        fast = softmax_kl(student, teacher, 2.0, dim, "none", impl="fast", tile=tile)
    torch.testing.assert_close(fast, softmax_kl_reference(student, teacher, 2.0, dim, "none"))


@needs_fast
def test_unit_grad_output_and_one_backward_per_forward():
    shape, dim, tile = COLUMNS["odd"]
    student, teacher = _pair(shape, torch.float32, seed=31)
    student.requires_grad_(True)
    softmax_kl(student, teacher, 2.0, dim, impl="reference").backward()
    expected, student.grad = student.grad, None
    loss = softmax_kl(student, teacher, 2.0, dim, impl="fast", tile=tile)
    loss.backward(retain_graph=True)   # grad_output == 1: the device-side skip
    torch.testing.assert_close(student.grad, expected)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()
    again = softmax_kl(student, teacher, 2.0, dim, impl="fast", tile=tile)
    assert torch.equal(again.detach(), loss.detach())   # deterministic partial sums


@pytest.mark.parametrize("impl", ["reference", pytest.param("fast", marks=needs_fast)])
def test_bad_arguments_are_refused_clearly(impl):
    student, teacher = _pair((2, 4, 3, 5), torch.float32, seed=37)

    def call(s=student, t=teacher, temperature=2.0, **kwargs):
        return softmax_kl(s, t, temperature, impl=impl, **kwargs)

    with pytest.raises(ValueError, match=r"teacher: expected the student's shape"):
        call(t=teacher[:, :3])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature: expected a finite value > 0"):
            call(temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        call(temperature=torch.tensor(2.0))
    with pytest.raises(TypeError, match="student: expected dtype"):
        call(s=student.long(), t=teacher.long())
    with pytest.raises(TypeError, match="teacher: expected dtype"):
        call(t=teacher.to(torch.complex64))
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="average")
    with pytest.raises(ValueError, match="dim"):
        call(dim=0)
    with pytest.raises(ValueError, match="dim"):
        call(dim=4)
    with pytest.raises(ValueError, match=r"teacher requires grad.*teacher.detach\(\)"):
        call(t=teacher.clone().requires_grad_(True))
    if impl == "fast":
        with pytest.raises(ValueError, match="tile"):
            call(tile=24)
