"""Temperature-softmax KL divergence, the distillation term of classification and segmentation.

Formula, with ``p = softmax(teacher / T)`` and ``q = softmax(student / T)`` over the class
dimension ``dim``, at every position (every index of the other dimensions)::

    kl[pos]     = T^2 * sum_k p_k * (log p_k - log q_k)           terms with p_k = 0 count 0
    d kl / d s_k = T * (q_k * sum_j p_j - p_k)                     (= T * (q_k - p_k) for logits)

The T^2 factor (Hinton et al.) keeps the gradient's size independent of T.

Reductions of the per-position ``kl``: ``"none"`` returns it (shape of ``student`` without
``dim``), ``"sum"`` its sum, ``"mean"`` its mean over positions and ``"batchmean"`` its sum
divided by the batch size ``student.shape[0]``. Note that ``F.kl_div(reduction="mean")`` also
divides by the class count; our ``"mean"`` does not (it is ``F.kl_div``'s ``"mean"`` times K).

Teacher: logits (``teacher_is_logits=True``) or cached log-probabilities that already include
the temperature, ``log_softmax(teacher_logits / T)`` (``teacher_is_logits=False``; they are used
as given, not divided by T again, and need not sum to exactly one after a low-precision round
trip: the gradient above uses their actual sum). The teacher is a target, a constant: a
teacher that requires grad is refused (pass ``teacher.detach()``); no gradient flows to it.

Layouts, both fused into one kernel each that computes the loss and the student gradient
in a single launch, in fp32 whatever the input dtype (float32, bfloat16, float16):

- *columns* (K <= 64 classes, e.g. segmentation logits ``[B, K, H, W]`` with ``dim=1``): the
  class dimension is not innermost, so a program takes a tile of contiguous positions and keeps
  all K classes of it in registers: one read of each input, one write of the gradient.
- *rows* (more classes, e.g. language-model logits ``[N, V]`` with ``dim=-1`` and V up to 256k):
  a program per row walks the classes in tiles (4096 by default, at most 8192) with an online
  max / logsumexp for student and teacher, then walks them again to write the gradient (and,
  for a log-prob teacher, to sum the loss: the second walk runs even for a forward alone).
  The second read comes from L2 where the row still sits there, from memory otherwise. A
  non-innermost class dimension with K > 64 is first moved last (one copy).

Scalars: 1/T, T^2 and the reduction's 1/N are folded into the kernel. The gradient is formed
in fp32 and rounded once to the student's dtype in the forward pass; ``grad_output`` is known
only in backward, which multiplies that saved gradient by it in place, on the device, without a
host sync: a scalar ``grad_output`` is read by a small kernel that leaves the gradient untouched
(no memory traffic) when it equals 1, the usual ``loss.backward()``; ``"none"`` scales per
position. Saving the gradient in the input dtype rather than fp32 halves its memory and traffic
for bf16/fp16 at the price of one extra rounding when ``grad_output != 1``. Scalar reductions
sum per-program partials in a second, deterministic pass (no atomics). Because the backward
hands out the precomputed gradient, the fast path allows one backward per forward: a second
backward through the same graph (after ``retain_graph=True``) raises.

Paths (:mod:`kdhpc.ops.dispatch`): ``impl="auto"`` runs Triton on CUDA tensors and the
reference elsewhere; on CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``
before import) only when the fast path is forced (``impl="fast"`` or a process-wide "fast").

Bytes-moved floor (B = bytes of one logit tensor): forward alone reads student and teacher,
2 B; fused forward + backward also writes the student gradient once, 3 B (the columns kernel
moves exactly that when grad_output is 1; the rows kernel re-reads the inputs, up to 5 B when
L2 misses; a grad_output other than 1 adds a read and a write of the gradient). Benchmarks:
``python benchmarks/softmax_kl.py``.
"""

from __future__ import annotations

import contextlib
import math

import torch

from kdhpc.ops import dispatch

try:  # the reference must keep working where Triton is missing or broken
    import triton
    import triton.language as tl
    _TRITON_IMPORT_ERROR = None
except Exception as error:  # noqa: BLE001 - any import failure means "no fast path"
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"

OP = "softmax_kl"
REDUCTIONS = ("none", "sum", "mean", "batchmean")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
COLUMNS_MAX_CLASSES = 64      # above this the K x tile block no longer fits in registers
ROWS_MAX_TILE = 8192          # largest class tile of the rows kernel
# Default tiles and warps, chosen from ptxas register counts for sm_90 (no spills, >= 24
# resident warps per SM), not yet from GPU timings: a columns program holds 4096 K_pad x
# position values (16 per thread with 8 warps), a rows program 4096 classes (8 per thread).
_COLUMNS_TILE_ELEMENTS = 4096
_ROWS_DEFAULT_TILE = 4096


def _check_arguments(student, teacher, temperature, dim, reduction, teacher_is_logits) -> int:
    """Validate the arguments shared by the reference and the fast path; return ``dim`` >= 0."""
    for name, tensor in (("student", student), ("teacher", teacher)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{OP}: {name}: expected a tensor, found {type(tensor).__name__}")
        if tensor.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"{OP}: {name}: expected dtype in "
                            f"{[str(d) for d in REFERENCE_DTYPES]}, found {tensor.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"{OP}: teacher: expected the student's shape {tuple(student.shape)}, "
                         f"found {tuple(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{OP}: teacher is on {teacher.device} but student is on "
                         f"{student.device}")
    if student.dim() < 2:
        raise ValueError(f"{OP}: student: expected at least 2 dims (batch first, then classes "
                         f"at dim), found shape {tuple(student.shape)}")
    if student.numel() == 0:
        raise ValueError(f"{OP}: student: expected a non-empty tensor, found shape "
                         f"{tuple(student.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{OP}: dim: expected an int, found {type(dim).__name__}")
    if not -student.dim() <= dim < student.dim() or dim % student.dim() == 0:
        raise ValueError(f"{OP}: dim: expected the class dimension in 1..{student.dim() - 1} "
                         f"(or its negative; dim 0 is the batch), found {dim}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{OP}: temperature: expected a Python float, found "
                        f"{type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{OP}: temperature: expected a finite value > 0, found {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction: expected one of {REDUCTIONS}, found {reduction!r}")
    if not isinstance(teacher_is_logits, bool):
        raise TypeError(f"{OP}: teacher_is_logits: expected a bool, found "
                        f"{type(teacher_is_logits).__name__}")
    if teacher.requires_grad:
        raise ValueError(f"{OP}: teacher requires grad, but the teacher is a constant target "
                         f"here and receives no gradient: pass teacher.detach()")
    return dim % student.dim()


def _reduction_scale(shape: torch.Size, dim: int, reduction: str) -> float:
    """The factor that turns the sum over positions into the requested reduction."""
    if reduction == "mean":
        return 1.0 / (math.prod(shape) // shape[dim])
    if reduction == "batchmean":
        return 1.0 / shape[0]
    return 1.0


def softmax_kl_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                         dim: int = 1, reduction: str = "batchmean",
                         teacher_is_logits: bool = True) -> torch.Tensor:
    """Plain-PyTorch :func:`softmax_kl` (the spec, the CPU fallback; same arguments).

    Computes in float32 (float64 for float64 inputs) and returns the loss in that dtype; the
    student gradient is formed in that precision by autograd and rounded once to its dtype.
    """
    dim = _check_arguments(student, teacher, temperature, dim, reduction, teacher_is_logits)
    compute = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype),
                                  torch.float32)
    log_q = torch.log_softmax(student.to(compute) / temperature, dim=dim)   # [..., K, ...]
    log_p = teacher.to(compute)
    if teacher_is_logits:
        log_p = torch.log_softmax(log_p / temperature, dim=dim)
    p = log_p.exp()
    # A class the teacher rules out (p = 0, log p = -inf) contributes 0, not 0 * inf = nan.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=compute,
                                                                 device=p.device))
    per_position = terms.sum(dim) * temperature ** 2                     # [...] without dim
    if reduction == "none":
        return per_position
    return per_position.sum() * _reduction_scale(student.shape, dim, reduction)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _softmax_kl_columns_kernel(
            student_ptr,    # [outer, K, inner] strided
            teacher_ptr,    # [outer, K, inner] strided
            grad_ptr,       # [outer, K, inner] strided, student dtype
            loss_ptr,       # [outer * inner] per position, or [programs] partial sums
            s_outer_stride, s_class_stride, s_inner_stride,
            t_outer_stride, t_class_stride, t_inner_stride,
            g_outer_stride, g_class_stride, g_inner_stride,
            num_classes, inner, tiles_per_outer,
            inv_temperature, loss_scale, grad_scale,
            TEACHER_IS_LOGITS: tl.constexpr, PER_POSITION: tl.constexpr,
            COMPUTE_GRAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
        program = tl.program_id(0)
        outer_index = (program // tiles_per_outer).to(tl.int64)
        tile = program % tiles_per_outer
        classes = tl.arange(0, BLOCK_K)
        positions = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        class_ok = classes < num_classes
        position_ok = positions < inner
        ok = class_ok[:, None] & position_ok[None, :]
        classes_2d = classes[:, None].to(tl.int64)
        positions_2d = positions[None, :].to(tl.int64)

        # Padding is loaded as 0 so that every difference below stays finite; padded classes
        # enter the statistics as -inf (weight 0) and the teacher weights as p = 0.
        s_offsets = (outer_index * s_outer_stride + classes_2d * s_class_stride
                     + positions_2d * s_inner_stride)
        b = tl.load(student_ptr + s_offsets, mask=ok, other=0.0).to(tl.float32) * inv_temperature
        b_masked = tl.where(class_ok[:, None], b, float("-inf"))           # [BLOCK_K, BLOCK_P]
        b_max = tl.max(b_masked, axis=0)                                   # [BLOCK_P]
        # Shift by the max before anything else: b_max + log(sum) rounded at the size of b
        # (1e4 / T) would cost the probabilities several digits.
        b_weights = tl.exp(b_masked - b_max[None, :])
        b_sum = tl.sum(b_weights, axis=0)

        t_offsets = (outer_index * t_outer_stride + classes_2d * t_class_stride
                     + positions_2d * t_inner_stride)
        t = tl.load(teacher_ptr + t_offsets, mask=ok, other=0.0).to(tl.float32)
        if TEACHER_IS_LOGITS:
            a = t * inv_temperature
            a_masked = tl.where(class_ok[:, None], a, float("-inf"))
            a_max = tl.max(a_masked, axis=0)
            a_weights = tl.exp(a_masked - a_max[None, :])
            a_sum = tl.sum(a_weights, axis=0)
            p = a_weights / a_sum[None, :]
            # sum p (log p - log q) with sum p = 1, the normalisers as one log-ratio: far less
            # cancellation than subtracting two log-sum-exps per class.
            kl = (tl.sum(p * (a - b), axis=0) + (b_max - a_max) + tl.log(b_sum / a_sum))
        else:
            p = tl.where(class_ok[:, None], tl.exp(t), 0.0)
            p_total = tl.sum(p, axis=0)
            log_q = (b - b_max[None, :]) - tl.log(b_sum)[None, :]
            # a class ruled out by the teacher (log p = -inf) contributes 0, not nan
            kl = tl.sum(tl.where(p > 0, p * (t - log_q), 0.0), axis=0)
        kl = tl.where(position_ok, kl, 0.0) * loss_scale                   # [BLOCK_P]
        if PER_POSITION:
            tl.store(loss_ptr + outer_index * inner + positions, kl, mask=position_ok)
        else:
            tl.store(loss_ptr + program, tl.sum(kl, axis=0))

        if COMPUTE_GRAD:
            q = b_weights / b_sum[None, :]
            if TEACHER_IS_LOGITS:
                grad = (q - p) * grad_scale    # sum p = 1 exactly, not to rounding
            else:
                grad = (q * p_total[None, :] - p) * grad_scale
            g_offsets = (outer_index * g_outer_stride + classes_2d * g_class_stride
                         + positions_2d * g_inner_stride)
            tl.store(grad_ptr + g_offsets, grad.to(grad_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _softmax_kl_rows_kernel(
            student_ptr,    # [rows, K] strided
            teacher_ptr,    # [rows, K] strided
            grad_ptr,       # [rows, K] contiguous, student dtype
            loss_ptr,       # [rows]
            s_row_stride, s_class_stride, t_row_stride, t_class_stride,
            num_classes, inv_temperature, loss_scale, grad_scale,
            TEACHER_IS_LOGITS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
            BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_row = student_ptr + row * s_row_stride
        t_row = teacher_ptr + row * t_row_stride
        lanes = tl.arange(0, BLOCK_V)
        # Per-lane running statistics, merged across lanes once at the end. A finite floor
        # for the running maxima keeps exp(old_max - new_max) away from exp(-inf + inf) = nan.
        b_max = tl.full([BLOCK_V], -3.0e38, tl.float32)
        b_sum = tl.zeros([BLOCK_V], tl.float32)
        a_max = tl.full([BLOCK_V], -3.0e38, tl.float32)
        a_sum = tl.zeros([BLOCK_V], tl.float32)
        cross = tl.zeros([BLOCK_V], tl.float32)   # logits: sum exp(a - a_max) (a - b)
        p_lanes = tl.zeros([BLOCK_V], tl.float32)  # log-probs: sum p
        for start in range(0, num_classes, BLOCK_V):
            classes = start + lanes
            ok = classes < num_classes
            # Padding loads as 0 (differences stay finite) and enters the sums as -inf.
            b = tl.load(s_row + classes * s_class_stride, mask=ok,
                        other=0.0).to(tl.float32) * inv_temperature
            b_masked = tl.where(ok, b, float("-inf"))
            new_b_max = tl.maximum(b_max, b_masked)
            b_sum = b_sum * tl.exp(b_max - new_b_max) + tl.exp(b_masked - new_b_max)
            b_max = new_b_max
            t = tl.load(t_row + classes * t_class_stride, mask=ok, other=0.0).to(tl.float32)
            if TEACHER_IS_LOGITS:
                a = t * inv_temperature
                a_masked = tl.where(ok, a, float("-inf"))
                new_a_max = tl.maximum(a_max, a_masked)
                rescale = tl.exp(a_max - new_a_max)
                weight = tl.exp(a_masked - new_a_max)
                a_sum = a_sum * rescale + weight
                cross = cross * rescale + weight * (a - b)
                a_max = new_a_max
            else:
                p_lanes += tl.where(ok, tl.exp(t), 0.0)

        row_b_max = tl.max(b_max, axis=0)
        b_total = tl.sum(b_sum * tl.exp(b_max - row_b_max), axis=0)
        row_a_max = 0.0
        a_total = 1.0
        kl = 0.0
        if TEACHER_IS_LOGITS:
            row_a_max = tl.max(a_max, axis=0)
            lane_rescale = tl.exp(a_max - row_a_max)
            a_total = tl.sum(a_sum * lane_rescale, axis=0)
            p_total = 1.0
            # sum_k p_k (a_k - b_k) + log Z_s - log Z_t, with p_k = exp(a_k - log Z_t) and the
            # normalisers as one log-ratio (less cancellation than two log-sum-exps)
            kl = (tl.sum(cross * lane_rescale, axis=0) / a_total + (row_b_max - row_a_max)
                  + tl.log(b_total / a_total))
        else:
            p_total = tl.sum(p_lanes, axis=0)

        # Second walk: the gradient, and for log-prob teachers the loss too, as
        # sum p (log p - log q) per class now that log Z_s is known (sum p log p - log Z_s
        # sum p would cancel two numbers of size log V). Values are shifted by the row max
        # first: max + log(sum) rounded at the size of the logits would cost digits.
        if COMPUTE_GRAD or not TEACHER_IS_LOGITS:
            g_row = grad_ptr + row * num_classes
            for start in range(0, num_classes, BLOCK_V):
                classes = start + lanes
                ok = classes < num_classes
                # Shifted values are <= 0 on real classes; the minimum only keeps padding
                # (loaded as 0, less a possibly very negative max) from overflowing exp.
                b = tl.minimum(tl.load(s_row + classes * s_class_stride, mask=ok, other=0.0)
                               .to(tl.float32) * inv_temperature - row_b_max, 0.0)
                t = tl.load(t_row + classes * t_class_stride, mask=ok, other=0.0).to(tl.float32)
                if TEACHER_IS_LOGITS:
                    p = tl.where(ok, tl.exp(tl.minimum(t * inv_temperature - row_a_max, 0.0))
                                 / a_total, 0.0)
                else:
                    p = tl.where(ok, tl.exp(t), 0.0)
                    # a class ruled out by the teacher (log p = -inf) contributes 0, not nan
                    kl += tl.sum(tl.where(p > 0, p * (t - (b - tl.log(b_total))), 0.0), axis=0)
                if COMPUTE_GRAD:
                    grad = (tl.exp(b) / b_total * p_total - p) * grad_scale
                    tl.store(g_row + classes, grad.to(grad_ptr.dtype.element_ty), mask=ok)
        tl.store(loss_ptr + row, kl * loss_scale)

    @triton.jit
    def _scale_by_device_scalar_kernel(
            values_ptr,     # [numel] contiguous, scaled in place
            factor_ptr,     # [] the scalar, on the device
            numel, BLOCK: tl.constexpr):
        factor = tl.load(factor_ptr).to(tl.float32)
        # grad_output == 1 (plain loss.backward()) needs no pass over memory at all.
        if factor != 1.0:
            offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            ok = offsets < numel
            values = tl.load(values_ptr + offsets, mask=ok).to(tl.float32)
            tl.store(values_ptr + offsets, (values * factor).to(values_ptr.dtype.element_ty),
                     mask=ok)

    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
    # TRITON_INTERPRET=1 at import time makes triton.jit build interpreted kernels: CPU only.
    INTERPRETED = isinstance(_softmax_kl_columns_kernel, _InterpretedFunction)
else:
    INTERPRETED = False


def _device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU, not whichever is current."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_tile(tile: int | None, largest: int) -> None:
    if tile is None:
        return
    if isinstance(tile, bool) or not isinstance(tile, int) or not 16 <= tile <= largest \
            or tile & (tile - 1):
        raise ValueError(f"{OP}: tile: expected None or a power of two in 16..{largest}, "
                         f"found {tile!r}")


def _launch_columns(student, teacher, dim, scales, reduction, teacher_is_logits,
                    compute_grad, tile):
    """Columns kernel on ``[outer, K, inner]`` views; returns (loss, grad or None)."""
    shape = student.shape
    num_classes = shape[dim]
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    student3 = student.reshape(outer, num_classes, inner)   # a view whenever strides allow
    teacher3 = teacher.reshape(outer, num_classes, inner)
    # Without COMPUTE_GRAD the kernel never touches grad_ptr: the student stands in for it.
    grad = (torch.empty((outer, num_classes, inner), dtype=student.dtype, device=student.device)
            if compute_grad else student3)
    grad3 = grad
    if inner == 1:
        # Class dim innermost with few classes ([N, K]): tile over the N rows instead.
        student3, teacher3, grad3 = (x.permute(2, 1, 0) for x in (student3, teacher3, grad))
        outer, inner = 1, outer
    block_k = _next_power_of_2(num_classes)
    block_p = tile or max(16, min(_COLUMNS_TILE_ELEMENTS // block_k, _next_power_of_2(inner)))
    tiles_per_outer = triton.cdiv(inner, block_p)
    programs = outer * tiles_per_outer
    per_position = reduction == "none"
    loss = torch.empty(outer * inner if per_position else programs, dtype=torch.float32,
                       device=student.device)
    with _device_guard(student):
        _softmax_kl_columns_kernel[(programs,)](
            student3, teacher3, grad3, loss,
            *student3.stride(), *teacher3.stride(), *grad3.stride(),
            num_classes, inner, tiles_per_outer, *scales,
            TEACHER_IS_LOGITS=teacher_is_logits, PER_POSITION=per_position,
            COMPUTE_GRAD=compute_grad, BLOCK_K=block_k, BLOCK_P=block_p,
            num_warps=min(8, max(1, block_k * block_p // 512)))
    return loss, grad.view(shape) if compute_grad else None


def _launch_rows(student, teacher, dim, scales, teacher_is_logits, compute_grad, tile):
    """Rows kernel on ``[rows, K]`` views (class dim moved last if needed); returns
    (per-row loss, grad or None)."""
    shape = student.shape
    num_classes = shape[dim]
    student2 = student.movedim(dim, -1).reshape(-1, num_classes)   # copies only if dim < last
    teacher2 = teacher.movedim(dim, -1).reshape(-1, num_classes)
    rows = student2.shape[0]
    block_v = tile or min(_ROWS_DEFAULT_TILE, _next_power_of_2(num_classes))
    num_warps = min(32, max(1, block_v // 256))
    grad = (torch.empty((rows, num_classes), dtype=student.dtype, device=student.device)
            if compute_grad else student2)   # never written without COMPUTE_GRAD
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    with _device_guard(student):
        _softmax_kl_rows_kernel[(rows,)](
            student2, teacher2, grad, loss,
            *student2.stride(), *teacher2.stride(), num_classes, *scales,
            TEACHER_IS_LOGITS=teacher_is_logits, COMPUTE_GRAD=compute_grad,
            BLOCK_V=block_v, num_warps=num_warps)
    if not compute_grad:
        return loss, None
    moved_shape = shape[:dim] + shape[dim + 1:] + (num_classes,)
    return loss, grad.view(moved_shape).movedim(-1, dim)


def _softmax_kl_fast(student, teacher, temperature, dim, reduction, teacher_is_logits,
                     compute_grad, tile):
    """Run the fitting kernel; return (loss as the public op returns it, student grad or None).

    The gradient already carries T and the reduction's 1/N; backward multiplies it by
    grad_output.
    """
    scale = _reduction_scale(student.shape, dim, reduction)
    scales = (1.0 / temperature, temperature * temperature * scale, temperature * scale)
    num_classes = student.shape[dim]
    if num_classes <= COLUMNS_MAX_CLASSES:
        _check_tile(tile, 1 << 16)
        loss, grad = _launch_columns(student, teacher, dim, scales, reduction,
                                     teacher_is_logits, compute_grad, tile)
    else:
        _check_tile(tile, ROWS_MAX_TILE)
        loss, grad = _launch_rows(student, teacher, dim, scales, teacher_is_logits,
                                  compute_grad, tile)
    if reduction == "none":
        loss = loss.view(student.shape[:dim] + student.shape[dim + 1:])
    else:
        loss = loss.sum()   # fixed-order reduction of the partials: deterministic
    return loss, grad


# --------------------------------------------------------------------------- autograd.Function

class _SoftmaxKLFunction(torch.autograd.Function):
    """Forward runs the fused kernel and keeps its student gradient; backward only scales it."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, dim, reduction, teacher_is_logits, tile):
        loss, grad = _softmax_kl_fast(student, teacher, temperature, dim, reduction,
                                      teacher_is_logits, True, tile)
        ctx.grad = grad
        ctx.dim = dim
        ctx.reduction = reduction
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(f"{OP}: the fast path hands its precomputed student gradient to "
                               f"the first backward; a second backward through the same graph "
                               f"(retain_graph=True) is not supported: recompute the loss, or "
                               f"use impl='reference'")
        ctx.grad = None   # scaled in place below and owned by autograd from here on
        if ctx.reduction == "none":
            grad.mul_(grad_output.unsqueeze(ctx.dim))    # per position, computed in fp32
        else:
            # grad is a dense block in memory (possibly viewed with the class dim moved), so
            # the kernel can walk its storage flat.
            block = 4096
            with _device_guard(grad):
                _scale_by_device_scalar_kernel[(triton.cdiv(grad.numel(), block),)](
                    grad, grad_output.reshape(()), grad.numel(), BLOCK=block)
        return grad, None, None, None, None, None, None


# ------------------------------------------------------------------------------ public op

def _fast_unavailable_reason(student: torch.Tensor, teacher: torch.Tensor,
                             interpreter_ok: bool = False) -> str | None:
    """Why the Triton path cannot take these inputs, or None when it can. ``interpreter_ok``
    admits CPU tensors when the kernels were built by Triton's interpreter."""
    if triton is None:
        return f"triton could not be imported ({_TRITON_IMPORT_ERROR})"
    for name, tensor in (("student", student), ("teacher", teacher)):
        if tensor.dtype not in KERNEL_DTYPES:
            return (f"{name} is {tensor.dtype}; the Triton kernels take "
                    f"{[str(d) for d in KERNEL_DTYPES]}")
    if student.is_cuda or (interpreter_ok and INTERPRETED and student.device.type == "cpu"):
        return None
    return (f"inputs on {student.device}: the Triton kernels run on CUDA tensors (CPU tensors "
            f"only under Triton's interpreter, TRITON_INTERPRET=1 set before import, with "
            f"impl='fast' or a process-wide 'fast')")


def _choose_path(student: torch.Tensor, teacher: torch.Tensor, impl: str) -> str:
    """``"fast"`` or ``"reference"``: Triton on CUDA for ``auto``; on CPU the interpreter only
    when the fast path is asked for explicitly (argument or process-wide override)."""
    return dispatch.resolve(
        OP, impl, lambda explicit: _fast_unavailable_reason(student, teacher,
                                                            interpreter_ok=explicit) or True)


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
               dim: int = 1, reduction: str = "batchmean", teacher_is_logits: bool = True,
               impl: str = "auto", *, tile: int | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over class dim ``dim``.

    See the module docstring for the formula, the reductions (``"mean"`` is over positions,
    unlike ``F.kl_div``'s, which also divides by K), the teacher forms and the bytes-moved
    floor. ``student`` and ``teacher``: same shape, float32 / bfloat16 / float16 (float64 only
    on the reference path), e.g. ``[B, K, H, W]`` with ``dim=1`` or ``[N, V]`` with ``dim=-1``.
    The loss is returned in float32 (float64 for float64 inputs). ``impl``: ``"auto"`` (Triton
    on CUDA, the reference elsewhere), ``"fast"`` or ``"reference"``, see
    :mod:`kdhpc.ops.dispatch`. ``tile``: length of the Triton tile along positions (columns
    kernel) or classes (rows kernel, at most 8192); None picks it from the shape, tests shrink
    it to exercise several tiles.
    """
    dim = _check_arguments(student, teacher, temperature, dim, reduction, teacher_is_logits)
    temperature = float(temperature)
    if _choose_path(student, teacher, impl) == "reference":
        return softmax_kl_reference(student, teacher, temperature, dim, reduction,
                                    teacher_is_logits)
    if torch.is_grad_enabled() and student.requires_grad:
        return _SoftmaxKLFunction.apply(student, teacher, temperature, dim, reduction,
                                        teacher_is_logits, tile)
    loss, _ = _softmax_kl_fast(student, teacher, temperature, dim, reduction,
                               teacher_is_logits, False, tile)
    return loss
