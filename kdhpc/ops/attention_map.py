"""Attention maps and the attention-transfer (AT) loss of KD-MRI, with a fused Triton path.

Formulas. ``A`` is a layer's activations ``[B, C, H, W]``, ``n = h * W + w`` runs over the
``N = H * W`` pixels, ``p >= 1`` (default 2)::

    Q[b, n] = sum_c |A[b, c, n]|^p                                  raw map      [B, N]
    attention_map(A, p) = Q[b] / max(||Q[b]||_2, eps)              per sample   [B, N]

``attention_map_loss`` for one (student, teacher) pair, ``q_S`` from the student's ``Q_S``
and ``q_T`` from the teacher's ``Q_T`` (``C_S != C_T`` is allowed: maps are compared)::

    mode="paper"       q = Q[b] / max(||Q[b]||_2, eps)              normalised per sample
                       L = (1/B) sum_b ||q_S[b] - q_T[b]||_2        (KD-MRI paper)
    mode="kdmri_code"  q[b, n] = Q[b, n] / max(sqrt(sum_b' Q[b', n]^2), eps)
                       L = (1/(B*N)) sum_{b,n} |q_S[b, n] - q_T[b, n]|
                       (the released KD-MRI code: F.normalize(dim=0) along the batch, then
                       F.l1_loss)

A list of pairs: "paper" sums the pair losses, "kdmri_code" averages them.
``eps = 1e-12`` as in ``F.normalize``: a norm below eps is replaced by eps, so all-zero
activations give ``q = 0`` and a finite loss and gradient, never NaN. ``||d||_2`` has
gradient ``d / ||d||_2``, taken as 0 where ``d = 0`` (as torch's norm backward does).

The teacher is a constant target: a teacher that requires grad is refused (pass
``teacher.detach()``). It is given either as activations ``[B, C_T, H, W]`` or as precomputed
maps ``[B, H, W]`` or ``[B, N]`` (a teacher cache stores these, one channel per layer). The
loss normalises a given map again in the mode's way, so in "paper" mode the raw map ``Q_T``
(``attention_map(t, p, normalize=False)``) and the normalised one (``attention_map(t, p)``)
give the same loss; "kdmri_code" normalises along the batch, which a per-sample normalised map
no longer allows: there the map must be the raw ``Q_T``.

Maps and losses are float32 (float64 for float64 inputs) whatever the activation dtype: ``Q``
sums C powers of activations, which overflows fp16 already at ``|A| ~ 256 / sqrt(C)``. The
squared norms are accumulated in fp32, so ``sum_n Q[b, n]^2`` must stay below 3.4e38 (for p = 2,
32 channels and 320 x 320 pixels: ``|A| < ~1e8``).

Gradient (``g`` = grad_output, ``w`` = 1 for "paper", 1/pairs for "kdmri_code")::

    dL/dA[b, c, n] = G[b, n] * p |A|^(p-1) sign(A)                    (0 at A = 0)
    paper:  s = ||Q_S[b]||, inv = 1/max(s, eps), m = [s >= eps], d = q_S - q_T, r = ||d[b]||
            G = k1[b] Q_S + k2[b] Q_T,  c = g w inv_S / (B r)  (0 where r = 0),
            k1 = c inv_S (1 - m (q_S . d)),  k2 = -c inv_T
    kdmri_code: per pixel column, with gq = g w sign(d) / (B N) and the column norms,
            G = inv_S (gq - m q_S sum_b (q_S gq))

Fast path (Triton; float32 / bfloat16 / float16; fp32 accumulation), three kernels:

1. ``_maps_kernel``, grid (B, pixel tiles): reads every activation once (student, and teacher
   activations or map) and writes ``Q_S`` (and ``Q_T``) ``[B, N]`` fp32, 1/C of the activation
   bytes, plus per-tile partial sums of ``Q^2``.
2. a finish kernel on the maps only: "paper" one program per sample computes ``r``, ``k1``,
   ``k2`` (``dL/dQ`` as two per-sample coefficients); "kdmri_code" one program per pixel tile
   holds the batch column and writes ``G`` and per-tile loss partials. The loss is the sum of
   these partials (deterministic, no atomics, no host sync).
3. ``_grad_kernel`` (backward): reads ``A_S`` again, the maps (or ``G``) and ``grad_output``
   from device memory, and writes ``dL/dA_S`` once, in the student's dtype and layout.

Why ``A_S`` is read twice: every gradient element needs the per-sample norms, reductions over
all of ``C x H x W`` that must finish before the first gradient element can be written, and one
sample's activations (13 MB for 32 x 320 x 320 fp32) do not fit on chip. The alternative, writing
``dL/dA`` in the forward and scaling it by ``grad_output`` in the backward, moves the same bytes
when ``grad_output == 1`` and two more activation passes otherwise, and holds an activation-sized
buffer from forward to backward; so the forward computes ``dL/dQ`` (recompute-free: no map or
norm is recomputed in backward) and the backward forms ``dL/dA``.

Bytes. ``S = B C_S N e_S`` and ``T = B C_T N e_T`` (e = element size), ``M = B N e_M`` a
precomputed map, ``F = 4 B N`` one fp32 map::

    floor, forward:           S + T          (map: S + M)
    floor, forward+backward:  2 S + T        (map: 2 S + M): read both once, write dA_S once
    Triton moves, fwd+bwd:    3 S + T + 6 F  (map: 3 S + 3 M + 3 F)     "paper"
                              3 S + T + 6 F  (map: 3 S + 2 M + 4 F)     "kdmri_code"

With C = 32 fp32 and a teacher of the same shape that is 4.19 S against a floor of 3 S: the fused
forward+backward can reach at most ~72% of copy bandwidth measured against the floor.
Benchmarks: ``python benchmarks/attention_map.py``.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

from kdhpc.ops import dispatch

try:  # the reference must keep working where Triton is missing (it ships for Linux only)
    import triton
    import triton.language as tl
    _TRITON_IMPORT_ERROR = None
except Exception as error:  # noqa: BLE001 - any import failure means "no fast path"
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"

MODES = ("paper", "kdmri_code")
EPS = 1e-12                   # F.normalize's default: norms below it are replaced by it
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
BATCH_COLUMN_MAX = 4096       # "kdmri_code" finish keeps a pixel's whole batch column on chip
_TILE_ELEMENTS = 4096         # channels x pixels held by one program of the activation kernels


# ------------------------------------------------------------------------- argument checks

def _check_p(op: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{op}: p: expected a real number, found {type(p).__name__}")
    if not (math.isfinite(p) and p >= 1):
        raise ValueError(f"{op}: p: expected a finite exponent >= 1 (below 1 the derivative of "
                         f"|A|^p is infinite at A = 0), found {p}")
    return float(p)


def _check_dtype(op: str, name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a tensor, found {type(tensor).__name__}")
    if tensor.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"{op}: {name}: expected dtype in {[str(d) for d in REFERENCE_DTYPES]}, "
                        f"found {tensor.dtype}")


def _check_features(op: str, name: str, features) -> None:
    _check_dtype(op, name, features)
    if features.dim() != 4:
        raise ValueError(f"{op}: {name}: expected activations [B, C, H, W], found shape "
                         f"{tuple(features.shape)}")
    if features.numel() == 0:
        raise ValueError(f"{op}: {name}: expected a non-empty tensor, found shape "
                         f"{tuple(features.shape)}")


def _check_pair(op: str, index: str, student, teacher) -> tuple[torch.Tensor, bool]:
    """Validate one pair; return the teacher (maps flattened to [B, N]) and whether it is a map."""
    s_name, t_name = f"student_features{index}", f"teacher{index}"
    _check_features(op, s_name, student)
    _check_dtype(op, t_name, teacher)
    batch, _, height, width = student.shape
    if teacher.dim() == 4:
        if teacher.shape[0] != batch or teacher.shape[2:] != student.shape[2:]:
            raise ValueError(f"{op}: {t_name}: teacher activations {tuple(teacher.shape)} do not "
                             f"match {s_name} {tuple(student.shape)}: batch and spatial size "
                             f"(H, W) must agree (channels may differ)")
        _check_features(op, t_name, teacher)
        is_map = False
    elif teacher.shape in ((batch, height, width), (batch, height * width)):
        teacher = teacher.reshape(batch, height * width)
        is_map = True
    else:
        raise ValueError(f"{op}: {t_name}: expected teacher activations [B, C_T, H, W] or a "
                         f"precomputed map [B, H, W] / [B, H*W] with B, H, W = {batch}, {height}, "
                         f"{width} from {s_name}, found shape {tuple(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{op}: {t_name} is on {teacher.device} but {s_name} is on "
                         f"{student.device}")
    if teacher.requires_grad:
        raise ValueError(f"{op}: {t_name} requires grad, but the teacher is a constant target "
                         f"here and receives no gradient: pass teacher.detach()")
    return teacher, is_map


def _check_pairs(op: str, student_features, teacher, p, mode):
    """Validate all arguments of the loss; return [(student, teacher, is_map, index)], p."""
    p = _check_p(op, p)
    if mode not in MODES:
        raise ValueError(f"{op}: mode: expected one of {MODES}, found {mode!r}")
    if isinstance(student_features, (list, tuple)):
        if not isinstance(teacher, (list, tuple)) or len(teacher) != len(student_features):
            found = (f"{len(teacher)} items" if isinstance(teacher, (list, tuple))
                     else type(teacher).__name__)
            raise ValueError(f"{op}: teacher: expected a list of {len(student_features)} items, "
                             f"one per student layer, found {found}")
        if not student_features:
            raise ValueError(f"{op}: student_features: expected at least one layer pair, "
                             f"found an empty list")
        indexed = [(s, t, f"[{i}]") for i, (s, t) in enumerate(zip(student_features, teacher))]
    elif isinstance(teacher, (list, tuple)):
        raise ValueError(f"{op}: teacher: expected a tensor like student_features, found a "
                         f"list of {len(teacher)}")
    else:
        indexed = [(student_features, teacher, "")]
    pairs = [(s, *_check_pair(op, index, s, t), index) for s, t, index in indexed]
    return pairs, p


# ------------------------------------------------------------------------------ references

def _raw_map_reference(features: torch.Tensor, p: float) -> torch.Tensor:
    """``Q = sum_c |A_c|^p`` flattened, ``[B, H*W]``, in float32 (float64 for float64)."""
    compute = torch.promote_types(features.dtype, torch.float32)
    return features.to(compute).abs().pow(p).sum(1).flatten(1)


def attention_map_reference(features: torch.Tensor, p: float = 2,
                            normalize: bool = True) -> torch.Tensor:
    """Plain-PyTorch :func:`attention_map` (the spec, the CPU fallback; same arguments)."""
    op = "attention_map_reference"
    _check_features(op, "features", features)
    q = _raw_map_reference(features, _check_p(op, p))
    return F.normalize(q, dim=1, eps=EPS) if normalize else q


def _pair_loss_reference(student: torch.Tensor, teacher: torch.Tensor, teacher_is_map: bool,
                         p: float, mode: str, weight: float) -> torch.Tensor:
    dim = 1 if mode == "paper" else 0         # per sample, or per pixel along the batch
    q_s = F.normalize(_raw_map_reference(student, p), dim=dim, eps=EPS)          # [B, N]
    q_t = teacher if teacher_is_map else _raw_map_reference(teacher, p)            # [B, N]
    diff = q_s - F.normalize(q_t.to(q_s.dtype), dim=dim, eps=EPS)                # [B, N]
    if mode == "paper":
        return torch.linalg.vector_norm(diff, dim=1).mean() * weight
    return diff.abs().mean() * weight


def _pair_weight(mode: str, pairs: int) -> float:
    return 1.0 if mode == "paper" else 1.0 / pairs


def attention_map_loss_reference(student_features, teacher, p: float = 2,
                                 mode: str = "paper") -> torch.Tensor:
    """Plain-PyTorch :func:`attention_map_loss` (the spec, the CPU fallback; same arguments)."""
    pairs, p = _check_pairs("attention_map_loss_reference", student_features, teacher, p, mode)
    weight = _pair_weight(mode, len(pairs))
    return sum(_pair_loss_reference(s, t, is_map, p, mode, weight) for s, t, is_map, _ in pairs)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _pixel_offsets(pixels, width, h_stride, w_stride, FLAT: tl.constexpr):
        # Element offsets of pixels n = h * W + w in one (sample, channel) plane. FLAT planes
        # (contiguous, channels-last, channel slices) step by w_stride per pixel, which lets
        # the compiler vectorise; others (a W slice) need the division.
        if FLAT:
            return pixels * w_stride
        else:
            return (pixels // width) * h_stride + (pixels % width) * w_stride

    @triton.jit
    def _abs_pow(a, P: tl.constexpr):
        if P == 2.0:
            return a * a
        elif P == 1.0:
            return tl.abs(a)
        else:
            magnitude = tl.abs(a)
            safe = tl.where(magnitude > 0, magnitude, 1.0)
            return tl.where(magnitude > 0, tl.exp2(P * tl.log2(safe)), 0.0)

    @triton.jit
    def _abs_pow_derivative(a, P: tl.constexpr):
        # p |a|^(p-1) sign(a), 0 at a = 0 (for p = 1 the subgradient torch.sign picks)
        if P == 2.0:
            return 2.0 * a
        else:
            sign = tl.where(a > 0, 1.0, tl.where(a < 0, -1.0, 0.0))
            if P == 1.0:
                return sign
            else:
                magnitude = tl.abs(a)
                safe = tl.where(magnitude > 0, magnitude, 1.0)
                return sign * P * tl.exp2((P - 1.0) * tl.log2(safe))

    @triton.jit
    def _channel_power_sum(plane_ptr,      # A[b, 0, 0, 0]
                           channels, c_stride, pixel_offsets, pixel_ok,
                           P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
        q = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c[:, None] < channels) & pixel_ok[None, :]
            a = tl.load(plane_ptr + c[:, None] * c_stride + pixel_offsets[None, :], mask=ok,
                        other=0.0).to(tl.float32)                       # [BLOCK_C, BLOCK_N]
            q += tl.sum(_abs_pow(a, P), axis=0)
        return q

    @triton.jit
    def _maps_kernel(
            s_ptr,            # [B, C_S, H, W] strided student activations
            t_ptr,            # [B, C_T, H, W] strided teacher activations, or map [B, N]
            qs_ptr,           # [B, N] fp32 out: Q_S
            qt_ptr,           # [B, N] fp32 out: Q_T (teacher activations only)
            partials_ptr,     # [B, tiles, 2] fp32 out: sum over the tile of Q_S^2, Q_T^2
            s_channels, s_b_stride, s_c_stride, s_h_stride, s_w_stride,
            t_channels, t_b_stride, t_c_stride, t_h_stride, t_w_stride,
            pixels, width, tiles,
            P: tl.constexpr, S_FLAT: tl.constexpr,
            TEACHER: tl.constexpr,  # 0 none, 1 activations, 2 map (t_w_stride = pixel stride)
            T_FLAT: tl.constexpr, BLOCK_CS: tl.constexpr, BLOCK_CT: tl.constexpr,
            BLOCK_N: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < pixels
        s_pixels = _pixel_offsets(n, width, s_h_stride, s_w_stride, S_FLAT)
        q_s = _channel_power_sum(s_ptr + b * s_b_stride, s_channels, s_c_stride, s_pixels, n_ok,
                                 P, BLOCK_CS, BLOCK_N)
        tl.store(qs_ptr + b * pixels + n, q_s, mask=n_ok)
        partial = partials_ptr + (b * tiles + tile) * 2
        tl.store(partial, tl.sum(q_s * q_s, axis=0))
        if TEACHER == 1:
            t_pixels = _pixel_offsets(n, width, t_h_stride, t_w_stride, T_FLAT)
            q_t = _channel_power_sum(t_ptr + b * t_b_stride, t_channels, t_c_stride, t_pixels,
                                     n_ok, P, BLOCK_CT, BLOCK_N)
            tl.store(qt_ptr + b * pixels + n, q_t, mask=n_ok)
            tl.store(partial + 1, tl.sum(q_t * q_t, axis=0))
        elif TEACHER == 2:
            q_t = tl.load(t_ptr + b * t_b_stride + n * t_w_stride, mask=n_ok,
                          other=0.0).to(tl.float32)
            tl.store(partial + 1, tl.sum(q_t * q_t, axis=0))

    @triton.jit
    def _paper_finish_kernel(
            qs_ptr,           # [B, N] fp32 Q_S
            qt_ptr,           # [B, N] strided Q_T (fp32 from _maps_kernel, or the given map)
            partials_ptr,     # [B, tiles, 2] fp32 from _maps_kernel
            stats_ptr,        # [B, 3] fp32 out: w r / B (the sample's loss term), k1, k2
            qt_b_stride, qt_n_stride, pixels, tiles, weight_over_batch, eps,
            BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        ss_lanes = tl.zeros([BLOCK_T], dtype=tl.float32)
        tt_lanes = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, tiles, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = t < tiles
            ss_lanes += tl.load(partials_ptr + (b * tiles + t) * 2, mask=ok, other=0.0)
            tt_lanes += tl.load(partials_ptr + (b * tiles + t) * 2 + 1, mask=ok, other=0.0)
        norm_s = tl.sqrt(tl.sum(ss_lanes, axis=0))
        inv_s = 1.0 / tl.maximum(norm_s, eps)
        inv_t = 1.0 / tl.maximum(tl.sqrt(tl.sum(tt_lanes, axis=0)), eps)
        dd_lanes = tl.zeros([BLOCK_N], dtype=tl.float32)
        qd_lanes = tl.zeros([BLOCK_N], dtype=tl.float32)
        for n0 in range(0, pixels, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            ok = n < pixels
            q_s = tl.load(qs_ptr + b * pixels + n, mask=ok, other=0.0) * inv_s
            q_t = tl.load(qt_ptr + b * qt_b_stride + n * qt_n_stride, mask=ok,
                          other=0.0).to(tl.float32) * inv_t
            d = q_s - q_t
            dd_lanes += d * d
            qd_lanes += q_s * d
        r = tl.sqrt(tl.sum(dd_lanes, axis=0))
        q_dot_d = tl.where(norm_s >= eps, tl.sum(qd_lanes, axis=0), 0.0)
        c = tl.where(r > 0, weight_over_batch * inv_s / tl.where(r > 0, r, 1.0), 0.0)
        tl.store(stats_ptr + b * 3, r * weight_over_batch)
        tl.store(stats_ptr + b * 3 + 1, c * inv_s * (1.0 - q_dot_d))
        tl.store(stats_ptr + b * 3 + 2, -c * inv_t)

    @triton.jit
    def _batch_finish_kernel(
            qs_ptr,           # [B, N] fp32 Q_S
            qt_ptr,           # [B, N] strided Q_T (fp32 from _maps_kernel, or the given map)
            grad_q_ptr,       # [B, N] fp32 out: dL/dQ_S without grad_output
            loss_parts_ptr,   # [tiles] fp32 out: this tile's share of the loss
            qt_b_stride, qt_n_stride, batch, pixels, scale, eps,
            BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
        tile = tl.program_id(0)
        rows = tl.arange(0, BLOCK_B).to(tl.int64)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (rows[:, None] < batch) & (n[None, :] < pixels)
        big_q_s = tl.load(qs_ptr + rows[:, None] * pixels + n[None, :], mask=ok, other=0.0)
        big_q_t = tl.load(qt_ptr + rows[:, None] * qt_b_stride + n[None, :] * qt_n_stride,
                          mask=ok, other=0.0).to(tl.float32)              # [BLOCK_B, BLOCK_N]
        norm_s = tl.sqrt(tl.sum(big_q_s * big_q_s, axis=0))               # [BLOCK_N]
        inv_s = 1.0 / tl.maximum(norm_s, eps)
        inv_t = 1.0 / tl.maximum(tl.sqrt(tl.sum(big_q_t * big_q_t, axis=0)), eps)
        q_s = big_q_s * inv_s[None, :]
        d = q_s - big_q_t * inv_t[None, :]
        tl.store(loss_parts_ptr + tile, tl.sum(tl.sum(tl.abs(d), axis=1), axis=0) * scale)
        grad_q = tl.where(d > 0, scale, tl.where(d < 0, -scale, 0.0))
        projection = tl.where(norm_s >= eps, tl.sum(q_s * grad_q, axis=0), 0.0)
        grad_q = (grad_q - q_s * projection[None, :]) * inv_s[None, :]
        tl.store(grad_q_ptr + rows[:, None] * pixels + n[None, :], grad_q, mask=ok)

    @triton.jit
    def _grad_kernel(
            a_ptr,            # [B, C, H, W] strided activations
            grad_ptr,         # [B, C, H, W] strided out: dL/dA, activation dtype
            u_ptr,            # [B, N] fp32: dL/dQ, or Q_S when COMBINE
            v_ptr,            # [B, N] strided Q_T when COMBINE
            stats_ptr,        # [B, 3] fp32 (_, k1, k2) when COMBINE
            scale_ptr,        # [] grad_output on the device when SCALED
            channels, a_b_stride, a_c_stride, a_h_stride, a_w_stride,
            g_b_stride, g_c_stride, g_h_stride, g_w_stride,
            v_b_stride, v_n_stride, pixels, width,
            P: tl.constexpr, A_FLAT: tl.constexpr, G_FLAT: tl.constexpr,
            COMBINE: tl.constexpr, SCALED: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < pixels
        grad_q = tl.load(u_ptr + b * pixels + n, mask=n_ok, other=0.0)        # [BLOCK_N]
        if COMBINE:
            q_t = tl.load(v_ptr + b * v_b_stride + n * v_n_stride, mask=n_ok,
                          other=0.0).to(tl.float32)
            grad_q = tl.load(stats_ptr + b * 3 + 1) * grad_q + tl.load(stats_ptr + b * 3 + 2) * q_t
        if SCALED:
            grad_q = grad_q * tl.load(scale_ptr).to(tl.float32)
        a_pixels = _pixel_offsets(n, width, a_h_stride, a_w_stride, A_FLAT)
        g_pixels = _pixel_offsets(n, width, g_h_stride, g_w_stride, G_FLAT)
        a_plane = a_ptr + b * a_b_stride
        g_plane = grad_ptr + b * g_b_stride
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c[:, None] < channels) & n_ok[None, :]
            a = tl.load(a_plane + c[:, None] * a_c_stride + a_pixels[None, :], mask=ok,
                        other=0.0).to(tl.float32)                       # [BLOCK_C, BLOCK_N]
            grad = grad_q[None, :] * _abs_pow_derivative(a, P)
            tl.store(g_plane + c[:, None] * g_c_stride + g_pixels[None, :],
                     grad.to(grad_ptr.dtype.element_ty), mask=ok)

    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
    # TRITON_INTERPRET=1 at import time makes triton.jit build interpreted kernels: CPU only.
    INTERPRETED = isinstance(_maps_kernel, _InterpretedFunction)
else:
    INTERPRETED = False


# ------------------------------------------------------------------------ kernel launchers

def _plane_layout(x: torch.Tensor) -> tuple[int, int, bool]:
    """(h_stride, w_stride, flat) of ``x`` [B, C, H, W]; flat: pixel n sits at n * w_stride."""
    _, _, height, width = x.shape
    h_stride, w_stride = x.stride(2), x.stride(3)
    if width == 1:
        return h_stride, h_stride, True
    return h_stride, w_stride, height == 1 or h_stride == width * w_stride


def _blocks(*channel_counts: int) -> tuple[list[int], int]:
    """Channel chunk per tensor and the pixel tile: about _TILE_ELEMENTS values per chunk."""
    block_c = [min(32, triton.next_power_of_2(c)) for c in channel_counts]
    return block_c, min(1024, max(64, _TILE_ELEMENTS // max(block_c)))


def _device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU, not whichever is current."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _maps_forward(student: torch.Tensor, teacher: torch.Tensor | None, teacher_is_map: bool,
                  p: float):
    """Pass 1: Q_S [B, N] fp32, Q_T [B, N] (fp32, or the given map), partials [B, tiles, 2]."""
    batch, s_channels, height, width = student.shape
    pixels = height * width
    t_channels = teacher.shape[1] if teacher is not None and not teacher_is_map else 1
    (block_cs, block_ct), block_n = _blocks(s_channels, t_channels)
    tiles = triton.cdiv(pixels, block_n)
    f32 = dict(dtype=torch.float32, device=student.device)
    q_s = torch.empty(batch, pixels, **f32)
    partials = torch.empty(batch, tiles, 2, **f32)
    s_h, s_w, s_flat = _plane_layout(student)
    if teacher is None:
        kind, q_t, t_args, t_flat = 0, q_s, (student, 1, 0, 0, 0, 0), True
    elif teacher_is_map:
        kind, q_t, t_flat = 2, teacher, True
        t_args = (teacher, 1, teacher.stride(0), 0, 0, teacher.stride(1))
    else:
        kind, q_t = 1, torch.empty(batch, pixels, **f32)
        t_h, t_w, t_flat = _plane_layout(teacher)
        t_args = (teacher, t_channels, teacher.stride(0), teacher.stride(1), t_h, t_w)
    with _device_guard(student):
        _maps_kernel[(batch, tiles)](
            student, t_args[0], q_s, q_t, partials,
            s_channels, student.stride(0), student.stride(1), s_h, s_w, *t_args[1:],
            pixels, width, tiles,
            P=p, S_FLAT=s_flat, TEACHER=kind, T_FLAT=t_flat,
            BLOCK_CS=block_cs, BLOCK_CT=block_ct, BLOCK_N=block_n, num_warps=4)
    return q_s, q_t, partials


def _loss_forward(student, teacher, teacher_is_map, p, mode, weight):
    """Passes 1 and 2: the loss, and what the backward needs to form dL/dA_S."""
    batch, _, height, width = student.shape
    pixels = height * width
    q_s, q_t, partials = _maps_forward(student, teacher, teacher_is_map, p)
    f32 = dict(dtype=torch.float32, device=student.device)
    with _device_guard(student):
        if mode == "paper":
            stats = torch.empty(batch, 3, **f32)
            _paper_finish_kernel[(batch,)](
                q_s, q_t, partials, stats, q_t.stride(0), q_t.stride(1), pixels,
                partials.shape[1], weight / batch, EPS,
                BLOCK_T=min(1024, triton.next_power_of_2(partials.shape[1])),
                BLOCK_N=min(2048, triton.next_power_of_2(pixels)), num_warps=8)
            return stats[:, 0].sum(), (q_s, q_t, stats)
        block_b = triton.next_power_of_2(batch)
        block_n = min(1024, max(16, _TILE_ELEMENTS // block_b))
        tiles = triton.cdiv(pixels, block_n)
        grad_q = torch.empty(batch, pixels, **f32)
        loss_parts = torch.empty(tiles, **f32)
        _batch_finish_kernel[(tiles,)](
            q_s, q_t, grad_q, loss_parts, q_t.stride(0), q_t.stride(1), batch, pixels,
            weight / (batch * pixels), EPS, BLOCK_B=block_b, BLOCK_N=block_n, num_warps=4)
        return loss_parts.sum(), (grad_q, None, None)


def _grad_input(features: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None,
                stats: torch.Tensor | None, scale: torch.Tensor | None, p: float) -> torch.Tensor:
    """Pass 3: dL/dA = G * p |A|^(p-1) sign(A) with G = u, or k1 u + k2 v (COMBINE), times scale."""
    batch, channels, height, width = features.shape
    grad = torch.empty_like(features)            # keeps channels-last (any dense layout)
    (block_c,), block_n = _blocks(channels)
    a_h, a_w, a_flat = _plane_layout(features)
    g_h, g_w, g_flat = _plane_layout(grad)
    combine = v is not None
    v = v if combine else u
    with _device_guard(features):
        _grad_kernel[(batch, triton.cdiv(height * width, block_n))](
            features, grad, u, v, stats if combine else u, scale if scale is not None else u,
            channels, features.stride(0), features.stride(1), a_h, a_w,
            grad.stride(0), grad.stride(1), g_h, g_w,
            v.stride(0), v.stride(1), height * width, width,
            P=p, A_FLAT=a_flat, G_FLAT=g_flat, COMBINE=combine, SCALED=scale is not None,
            BLOCK_C=block_c, BLOCK_N=block_n, num_warps=4)
    return grad


# ------------------------------------------------------------------------ autograd functions

class _RawMapFunction(torch.autograd.Function):
    """A [B, C, H, W] -> Q [B, N] fp32 through the Triton kernels."""

    @staticmethod
    def forward(ctx, features, p):
        q, _, _ = _maps_forward(features, None, False, p)
        ctx.save_for_backward(features)
        ctx.p = p
        return q

    @staticmethod
    def backward(ctx, grad_map):
        (features,) = ctx.saved_tensors
        grad_map = grad_map.to(torch.float32).contiguous()                     # [B, N]
        return _grad_input(features, grad_map, None, None, None, ctx.p), None


class _AttentionMapLossFunction(torch.autograd.Function):
    """One layer pair's weighted loss; the backward reads the student activations again."""

    @staticmethod
    def forward(ctx, student, teacher, teacher_is_map, p, mode, weight):
        loss, (u, v, stats) = _loss_forward(student, teacher, teacher_is_map, p, mode, weight)
        ctx.save_for_backward(student, u, v, stats)
        ctx.p = p
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        student, u, v, stats = ctx.saved_tensors
        grad = _grad_input(student, u, v, stats, grad_loss, ctx.p)
        return grad, None, None, None, None, None


# ------------------------------------------------------------------------------ public ops

def _fast_unavailable_reason(tensors: dict, mode: str = "paper",
                             interpreter_ok: bool = False) -> str | None:
    """Why the Triton path cannot take these inputs ({name: tensor}), or None when it can.
    ``interpreter_ok`` admits CPU tensors when the kernels were built by Triton's interpreter."""
    if triton is None:
        return f"triton could not be imported ({_TRITON_IMPORT_ERROR})"
    for name, tensor in tensors.items():
        if tensor.dtype not in KERNEL_DTYPES:
            return (f"{name} is {tensor.dtype}; the Triton kernels take "
                    f"{[str(d) for d in KERNEL_DTYPES]}")
    first = next(iter(tensors.values()))
    if mode == "kdmri_code" and first.shape[0] > BATCH_COLUMN_MAX:
        return (f"mode='kdmri_code' keeps a pixel's batch column on chip: batch "
                f"{first.shape[0]} > {BATCH_COLUMN_MAX}")
    if first.is_cuda or (interpreter_ok and INTERPRETED and first.device.type == "cpu"):
        return None
    return (f"inputs on {first.device}: the Triton kernels run on CUDA tensors (CPU tensors "
            f"only under Triton's interpreter, TRITON_INTERPRET=1 set before import, with "
            f"impl='fast' or a process-wide 'fast')")


def _choose_path(op: str, impl: str, tensors: dict, mode: str = "paper") -> str:
    """``"fast"`` or ``"reference"``: Triton on CUDA for ``auto``; on CPU the interpreter only
    when the fast path is asked for explicitly (argument or process-wide override)."""
    return dispatch.resolve(
        op, impl, lambda explicit: _fast_unavailable_reason(tensors, mode,
                                                            interpreter_ok=explicit) or True)


def attention_map(features: torch.Tensor, p: float = 2, normalize: bool = True,
                  impl: str = "auto") -> torch.Tensor:
    """Attention map ``Q = sum_c |A_c|^p`` of ``features`` [B, C, H, W], flattened to
    [B, H*W] and L2-normalised per sample (``normalize=False``: the raw ``Q``, what a teacher
    cache stores for ``mode="kdmri_code"``). float32 result (float64 for float64 input);
    differentiable. ``impl``: ``"auto"`` (Triton on CUDA, the reference elsewhere), ``"fast"``
    or ``"reference"``, see :mod:`kdhpc.ops.dispatch`. Formulas and eps: module docstring.
    """
    op = "attention_map"
    _check_features(op, "features", features)
    p = _check_p(op, p)
    if _choose_path(op, impl, {"features": features}) == "reference":
        return attention_map_reference(features, p, normalize)
    q = _RawMapFunction.apply(features, p)                                     # [B, N]
    return F.normalize(q, dim=1, eps=EPS) if normalize else q


def attention_map_loss(student_features, teacher, p: float = 2, mode: str = "paper",
                       impl: str = "auto") -> torch.Tensor:
    """Attention-transfer loss between student activations and teacher activations or maps.

    ``student_features``: [B, C_S, H, W], or a list of them (one per layer pair).
    ``teacher``: per pair, teacher activations [B, C_T, H, W] (C_T may differ from C_S) or a
    precomputed map [B, H, W] / [B, H*W] (raw ``Q_T``; in "paper" mode also the normalised map),
    not requiring grad. ``mode``: "paper" (per-sample normalisation, batch mean of the L2
    distance; pairs summed) or "kdmri_code" (normalisation along the batch, L1 mean; pairs
    averaged). ``impl``: ``"auto"`` (Triton on CUDA, the reference elsewhere), ``"fast"`` or
    ``"reference"``; both modes have kernels. Returns a float32 scalar (float64 for float64).
    Formulas, eps, gradient and bytes moved: module docstring.
    """
    op = "attention_map_loss"
    pairs, p = _check_pairs(op, student_features, teacher, p, mode)
    weight = _pair_weight(mode, len(pairs))
    total = None
    for student, teacher_pair, is_map, index in pairs:
        tensors = {f"student_features{index}": student, f"teacher{index}": teacher_pair}
        if _choose_path(op, impl, tensors, mode) == "reference":
            loss = _pair_loss_reference(student, teacher_pair, is_map, p, mode, weight)
        elif torch.is_grad_enabled() and student.requires_grad:
            loss = _AttentionMapLossFunction.apply(student, teacher_pair, is_map, p, mode, weight)
        else:
            loss, _ = _loss_forward(student, teacher_pair, is_map, p, mode, weight)
        total = loss if total is None else total + loss
    return total
