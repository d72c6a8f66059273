"""Image-quality, segmentation and statistics metrics, defined exactly as fastMRI and KD-MRI do.

Reconstruction metrics act on one volume ``[S, H, W]`` (slices first, fastMRI layout; KD-MRI's
``H x W x slices`` arrays must be transposed first) of real magnitude images, ground truth first:

- ``MSE  = mean((gt - pred)^2)`` over the whole volume.
- ``NMSE = ||gt - pred||_2^2 / ||gt||_2^2`` over the whole volume.
- ``PSNR = 10 log10(R^2 / MSE)`` over the whole volume, ``R`` = data range = ``gt.max()`` of the
  volume unless given (fastMRI passes the h5 attribute ``max``, the target volume's maximum).
- ``SSIM`` per slice, then the mean over slices, with the same ``R`` for every slice. Per slice,
  with ``mu`` the 7x7 box mean (uniform window, ``N = 49`` pixels),
  ``var_x = N/(N-1) (mu(x^2) - mu(x)^2)`` (sample covariance), likewise ``var_y``,
  ``cov_xy = N/(N-1) (mu(xy) - mu(x) mu(y))``, ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``::

      SSIM map = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))

  averaged over the pixels whose 7x7 window lies inside the image (scikit-image crops 3 pixels
  from every side; here that is the "valid" output of the box filter). This is scikit-image's
  ``structural_similarity`` with its defaults, which fastMRI's and KD-MRI's evaluation call.
- ``HFEN`` is KD-MRI's "HFN": per slice, with predictions clipped to [0, 1] (KD-MRI's data are
  normalised to [0, 1]; the ground truth is not clipped) and ``L`` a Laplacian filter,
  ``sum (L(gt) - L(pred))^2 / sum L(gt)^2``, then the mean over slices. Note the ratio of
  *squared* norms; the classical HFEN of Ravishankar & Bresler (2011) is the ratio of norms.
  KD-MRI's filter (``sigma=None``, the default) is scikit-image 0.14's ``filters.laplace``: the
  3x3 discrete operator ``[[0, -1, 0], [-1, 4, -1], [0, -1, 0]]`` (minus the Laplacian; the sign
  cancels in the ratio) with reflected borders and the
  outermost 1-pixel frame of the result set to zero (no Gaussian at all, despite the name).
  ``sigma=s`` replaces it with a Laplacian of Gaussian of width ``s`` (scipy's
  ``gaussian_laplace``: kernel radius ``int(4 s + 0.5)``, borders reflected, no frame zeroed);
  ``sigma=1.5`` is the classical HFEN filter width.

A slice whose ``L(gt)`` is identically zero has no HFEN; it is reported as an error.

Segmentation and enhancement metrics:

- ``dice`` per class ``c``: ``2 |P_c & G_c| / (|P_c| + |G_c|)`` over all given pixels (pass a
  whole volume for the ACDC per-volume 3-D Dice). Where a class is absent from both prediction and
  ground truth the Dice is ``when_both_empty`` (1.0 by default: nothing to find, nothing found;
  pass ``nan`` to leave such classes out of means, as nnU-Net does).
  ``mean_foreground_dice`` averages classes ``1 .. C-1`` (NaNs left out).
- ``snr_roi``: for each tissue label ``t``, ``mean(image[labels == t]) / std(image[labels == bg])``
  with the sample standard deviation (``ddof=1``) of the background ROI; no Rician correction
  factor is applied. ``tissue_roi_labels`` builds such label maps from tissue probability maps.

Torch versions for training and evaluation (any device, differentiable where it matters):
``ssim_torch`` (the same SSIM on ``[B, C, H, W]``, box filter by ``avg_pool2d``), ``psnr_torch``,
``nmse_torch`` and ``hfen_torch`` (per image). :class:`VolumeMetricAccumulator` gathers per-slice
sums per volume in torch, so that a distributed evaluation all-reduces two fixed-size tensors and
gets per-volume PSNR / NMSE / SSIM / HFEN identical to the whole-volume numpy functions.

Summaries follow the two published conventions: ``mean +- std`` (our tables) and
``mean +- 2 std`` (KD-MRI, fastMRI); the standard deviation is the sample one (``ddof=1``, as
the ``runstats`` package both projects use). ``paired_test`` gives paired t / Wilcoxon tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import scipy.stats
import torch
import torch.nn.functional as F

SSIM_WIN_SIZE = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
HFEN_CLIP = (0.0, 1.0)
REDUCTIONS = ("none", "mean", "sum")

# ---------------------------------------------------------------------------------------------
# Input checks (numpy)
# ---------------------------------------------------------------------------------------------


def _as_real_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if np.iscomplexobj(array):
        raise ValueError(f"{name}: expected a real (magnitude) image, found complex dtype "
                         f"{array.dtype}; take the magnitude first")
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected a numeric array, found dtype {array.dtype}")
    return array


def _check_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        n_nan = int(np.isnan(array).sum())
        n_inf = int(np.isinf(array).sum())
        raise ValueError(f"{name}: expected finite values, found {n_nan} NaN and {n_inf} Inf "
                         f"in an array of shape {tuple(array.shape)}")


def _check_volume_pair(gt: Any, pred: Any, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (gt, pred) pair of volumes [S, H, W]; return them as float64 arrays."""
    gt_a, pred_a = _as_real_array(gt, "gt"), _as_real_array(pred, "pred")
    if gt_a.ndim != 3:
        raise ValueError(f"gt: expected a volume [S, H, W], found shape {tuple(gt_a.shape)} "
                         "(pass one slice as image[None])")
    if pred_a.shape != gt_a.shape:
        raise ValueError(f"pred: expected the shape of gt {tuple(gt_a.shape)}, "
                         f"found {tuple(pred_a.shape)}")
    if 0 in gt_a.shape:
        raise ValueError(f"gt: empty volume of shape {tuple(gt_a.shape)}")
    if min(gt_a.shape[1:]) < min_size:
        raise ValueError(f"gt: slices must be at least {min_size}x{min_size} for a "
                         f"{min_size}x{min_size} window, found shape {tuple(gt_a.shape)}")
    gt_a, pred_a = gt_a.astype(np.float64), pred_a.astype(np.float64)
    _check_finite(gt_a, "gt")
    _check_finite(pred_a, "pred")
    return gt_a, pred_a


def _resolve_data_range(gt: np.ndarray, data_range: float | None) -> float:
    value = float(gt.max()) if data_range is None else float(data_range)
    if not (math.isfinite(value) and value > 0):
        source = "gt.max()" if data_range is None else "data_range"
        raise ValueError(f"{source}: expected a positive finite data range, found {value}")
    return value


def _check_win_size(win_size: int) -> None:
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size: expected an odd integer >= 3, found {win_size}")


# ---------------------------------------------------------------------------------------------
# Reconstruction metrics on volumes (numpy, float64)
# ---------------------------------------------------------------------------------------------


def mse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean squared error over the whole volume ``[S, H, W]``."""
    gt_a, pred_a = _check_volume_pair(gt, pred)
    return float(np.mean((gt_a - pred_a) ** 2))


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """``||gt - pred||^2 / ||gt||^2`` over the whole volume ``[S, H, W]``."""
    gt_a, pred_a = _check_volume_pair(gt, pred)
    energy = float(np.sum(gt_a ** 2))
    if energy == 0.0:
        raise ValueError(f"gt: all zeros (shape {tuple(gt_a.shape)}); NMSE is undefined")
    return float(np.sum((gt_a - pred_a) ** 2)) / energy


def psnr(gt: np.ndarray, pred: np.ndarray, data_range: float | None = None) -> float:
    """``10 log10(R^2 / MSE)`` over the whole volume, ``R = gt.max()`` unless given."""
    gt_a, pred_a = _check_volume_pair(gt, pred)
    peak = _resolve_data_range(gt_a, data_range)
    err = float(np.mean((gt_a - pred_a) ** 2))
    return math.inf if err == 0.0 else 10.0 * math.log10(peak * peak / err)


def ssim_per_slice(gt: np.ndarray, pred: np.ndarray, data_range: float | None = None,
                   win_size: int = SSIM_WIN_SIZE, k1: float = SSIM_K1,
                   k2: float = SSIM_K2) -> np.ndarray:
    """SSIM of each slice ``[S]`` of a volume ``[S, H, W]`` (module docstring for the formula);
    one data range ``R`` (``gt.max()`` of the whole volume unless given) serves every slice."""
    _check_win_size(win_size)
    gt_a, pred_a = _check_volume_pair(gt, pred, min_size=win_size)
    peak = _resolve_data_range(gt_a, data_range)
    n = win_size * win_size
    cov_norm = n / (n - 1.0)

    def box_mean(a: np.ndarray) -> np.ndarray:  # [S, H, W], filtered in-plane only
        return ndi.uniform_filter(a, size=(1, win_size, win_size))

    mu_x, mu_y = box_mean(gt_a), box_mean(pred_a)
    var_x = cov_norm * (box_mean(gt_a * gt_a) - mu_x * mu_x)
    var_y = cov_norm * (box_mean(pred_a * pred_a) - mu_y * mu_y)
    cov_xy = cov_norm * (box_mean(gt_a * pred_a) - mu_x * mu_y)
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    pad = (win_size - 1) // 2
    # Outside the valid region the window reaches into reflected padding: cropped, as skimage.
    return ssim_map[:, pad:-pad, pad:-pad].mean(axis=(1, 2))


def ssim(gt: np.ndarray, pred: np.ndarray, data_range: float | None = None,
         win_size: int = SSIM_WIN_SIZE, k1: float = SSIM_K1, k2: float = SSIM_K2) -> float:
    """Mean over slices of :func:`ssim_per_slice` (fastMRI's and KD-MRI's volume SSIM)."""
    return float(np.mean(ssim_per_slice(gt, pred, data_range, win_size, k1, k2)))


def _laplacian_numpy(image: np.ndarray, sigma: float | None) -> np.ndarray:
    """The HFEN filter on one slice [H, W] (module docstring: KD-MRI's 3x3 or a LoG)."""
    if sigma is None:
        out = ndi.convolve(image, _DISCRETE_LAPLACIAN, mode="reflect")
        out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = 0.0
        return out
    return ndi.gaussian_laplace(image, sigma=sigma, mode="reflect")


# scikit-image's sign convention (centre +4), so that filtered images match its laplace().
_DISCRETE_LAPLACIAN = np.array([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])


def _check_hfen_options(sigma: float | None, clip: tuple[float, float] | None) -> None:
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: expected None (KD-MRI's 3x3 Laplacian) or a positive "
                         f"Gaussian width, found {sigma}")
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise ValueError(f"clip: expected None or (low, high) with low < high, found {clip}")


def hfen_per_slice(gt: np.ndarray, pred: np.ndarray, sigma: float | None = None,
                   clip: tuple[float, float] | None = HFEN_CLIP) -> np.ndarray:
    """KD-MRI's HFN of each slice ``[S]`` of a volume ``[S, H, W]`` (module docstring)."""
    _check_hfen_options(sigma, clip)
    gt_a, pred_a = _check_volume_pair(gt, pred, min_size=3)
    if clip is not None:
        pred_a = np.clip(pred_a, clip[0], clip[1])
    values = np.empty(gt_a.shape[0])
    for index, (gt_slice, pred_slice) in enumerate(zip(gt_a, pred_a)):
        gt_filtered = _laplacian_numpy(gt_slice, sigma)
        energy = float(np.sum(gt_filtered ** 2))
        if energy == 0.0:
            raise ValueError(f"gt: slice {index} of shape {tuple(gt_a.shape)} has no edges "
                             "(its Laplacian is zero everywhere); HFEN is undefined there")
        diff = gt_filtered - _laplacian_numpy(pred_slice, sigma)
        values[index] = float(np.sum(diff ** 2)) / energy
    return values


def hfen(gt: np.ndarray, pred: np.ndarray, sigma: float | None = None,
         clip: tuple[float, float] | None = HFEN_CLIP) -> float:
    """Mean over slices of :func:`hfen_per_slice` (KD-MRI's HFN; sigma=None is KD-MRI's filter)."""
    return float(np.mean(hfen_per_slice(gt, pred, sigma, clip)))


def reconstruction_metrics(gt: np.ndarray, pred: np.ndarray, data_range: float | None = None,
                           hfen_sigma: float | None = None,
                           hfen_clip: tuple[float, float] | None = HFEN_CLIP) -> dict[str, float]:
    """All reconstruction metrics of one volume: mse, nmse, psnr, ssim, hfen."""
    return {
        "mse": mse(gt, pred),
        "nmse": nmse(gt, pred),
        "psnr": psnr(gt, pred, data_range),
        "ssim": ssim(gt, pred, data_range),
        "hfen": hfen(gt, pred, hfen_sigma, hfen_clip),
    }


# ---------------------------------------------------------------------------------------------
# SNR in regions of interest
# ---------------------------------------------------------------------------------------------


def snr_roi(image: np.ndarray, labels: np.ndarray, tissue_labels: Sequence[int],
            background_label: int, ddof: int = 1) -> dict[int, float]:
    """``{t: mean(image[labels == t]) / std(image[labels == background_label])}``.

    ``image`` and ``labels`` share a shape (a slice or a volume); the background standard deviation
    uses ``ddof`` (1: sample standard deviation). Magnitude images have Rayleigh-distributed
    background noise; no correction factor (NEMA's 0.655) is applied, so compare SNRs measured
    the same way only.
    """
    image_a = _as_real_array(image, "image").astype(np.float64)
    labels_a = np.asarray(labels)
    if labels_a.shape != image_a.shape:
        raise ValueError(f"labels: expected the shape of image {tuple(image_a.shape)}, "
                         f"found {tuple(labels_a.shape)}")
    if labels_a.dtype.kind not in "iub":
        raise ValueError(f"labels: expected an integer label map, found dtype {labels_a.dtype}")
    _check_finite(image_a, "image")
    background = image_a[labels_a == background_label]
    if background.size <= ddof:
        raise ValueError(f"background_label {background_label}: expected more than {ddof} "
                         f"pixels in the background ROI, found {background.size}")
    noise = float(np.std(background, ddof=ddof))
    if noise == 0.0:
        raise ValueError(f"background_label {background_label}: the background ROI is constant "
                         "(standard deviation 0); SNR is undefined")
    result = {}
    for label in tissue_labels:
        if label == background_label:
            raise ValueError(f"tissue_labels: {label} is also the background_label")
        region = image_a[labels_a == label]
        if region.size == 0:
            raise ValueError(f"tissue_labels: label {label} has no pixels in labels of shape "
                             f"{tuple(labels_a.shape)}")
        result[int(label)] = float(region.mean()) / noise
    return result


def tissue_roi_labels(tissue_maps: np.ndarray, threshold: float = 0.9,
                      background_max: float = 0.01, background_margin: int = 4,
                      object_mask: np.ndarray | None = None) -> np.ndarray:
    """Label map for :func:`snr_roi` from tissue probability maps ``[T, ...]`` (e.g. the grey-
    and white-matter maps behind the default brain data).

    Returns int labels of the maps' spatial shape: ``t + 1`` where tissue ``t`` has probability
    ``>= threshold`` (a confident, pure-tissue ROI), ``0`` (background ROI) where every tissue and
    ``object_mask`` (e.g. the head or brain mask, which also covers CSF that no tissue map holds)
    stay below ``background_max`` even after growing them by ``background_margin`` pixels in-plane
    (so that blur and ringing at the object's edge do not count as noise), ``-1`` elsewhere.
    """
    maps = _as_real_array(tissue_maps, "tissue_maps").astype(np.float64)
    if maps.ndim < 3:
        raise ValueError(f"tissue_maps: expected [T, H, W] or [T, S, H, W], found shape "
                         f"{tuple(maps.shape)}")
    _check_finite(maps, "tissue_maps")
    if not 0.5 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a probability in (0.5, 1], found {threshold}")
    if background_margin < 0:
        raise ValueError(f"background_margin: expected >= 0 pixels, found {background_margin}")
    occupied = (maps >= background_max).any(axis=0)
    if object_mask is not None:
        mask = np.asarray(object_mask)
        if mask.shape != occupied.shape:
            raise ValueError(f"object_mask: expected shape {tuple(occupied.shape)} (the tissue "
                             f"maps' spatial shape), found {tuple(mask.shape)}")
        occupied |= mask.astype(bool)
    if background_margin:
        # Grow in-plane only: slices are thick and noise is measured per slice.
        structure = np.zeros((3,) * occupied.ndim, dtype=bool)
        structure[(1,) * (occupied.ndim - 2) + (slice(None), slice(None))] = \
            ndi.generate_binary_structure(2, 1)
        occupied = ndi.binary_dilation(occupied, structure, iterations=background_margin)
    labels = np.full(occupied.shape, -1, dtype=np.int64)
    labels[~occupied] = 0
    confident = maps >= threshold  # threshold > 0.5 makes at most one tissue confident per pixel
    for tissue in range(maps.shape[0]):
        labels[confident[tissue]] = tissue + 1
    return labels


# ---------------------------------------------------------------------------------------------
# Dice
# ---------------------------------------------------------------------------------------------


def _check_label_pair(pred_labels: Any, gt_labels: Any,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred_a, gt_a = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_a.shape != gt_a.shape:
        raise ValueError(f"pred_labels: expected the shape of gt_labels {tuple(gt_a.shape)}, "
                         f"found {tuple(pred_a.shape)}")
    if gt_a.size == 0:
        raise ValueError(f"gt_labels: empty label map of shape {tuple(gt_a.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes: expected >= 2 (background and a class), found "
                         f"{num_classes}")
    for name, array in (("pred_labels", pred_a), ("gt_labels", gt_a)):
        if array.dtype.kind not in "iub":
            raise ValueError(f"{name}: expected integer labels, found dtype {array.dtype}")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name}: expected labels in [0, {num_classes - 1}], found values "
                             f"from {low} to {high}")
    return pred_a.ravel().astype(np.int64), gt_a.ravel().astype(np.int64)


def dice_counts(pred_labels: np.ndarray, gt_labels: np.ndarray,
                num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class ``(|P & G|, |P|, |G|)``, each ``[num_classes]`` int64; sums over slices or
    ranks of these give the Dice of the union (use :func:`dice_from_counts`)."""
    pred_a, gt_a = _check_label_pair(pred_labels, gt_labels, num_classes)
    agree = pred_a[pred_a == gt_a]
    return (np.bincount(agree, minlength=num_classes),
            np.bincount(pred_a, minlength=num_classes),
            np.bincount(gt_a, minlength=num_classes))


def dice_from_counts(intersection: np.ndarray, pred_size: np.ndarray, gt_size: np.ndarray,
                     when_both_empty: float = 1.0) -> np.ndarray:
    """``2 |P & G| / (|P| + |G|)`` per class; ``when_both_empty`` where ``|P| + |G| = 0``."""
    intersection, total = np.asarray(intersection, float), np.asarray(pred_size, float) + gt_size
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = 2.0 * intersection / total
    return np.where(total == 0, when_both_empty, scores)


def dice(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int,
         when_both_empty: float = 1.0) -> np.ndarray:
    """Dice of every class ``0 .. num_classes-1`` over all given pixels, ``[num_classes]``."""
    return dice_from_counts(*dice_counts(pred_labels, gt_labels, num_classes), when_both_empty)


def mean_foreground_dice(pred_labels: np.ndarray, gt_labels: np.ndarray, num_classes: int,
                         when_both_empty: float = 1.0) -> float:
    """Mean Dice of classes ``1 .. num_classes-1`` (background left out; NaN classes skipped)."""
    foreground = dice(pred_labels, gt_labels, num_classes, when_both_empty)[1:]
    if np.isnan(foreground).all():
        return math.nan
    return float(np.nanmean(foreground))


# ---------------------------------------------------------------------------------------------
# Torch metrics (per image, any device)
# ---------------------------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, found {reduction!r}")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _check_image_pair(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str],
                      min_size: int = 1) -> None:
    """Shapes only: no host sync, so that the training loss can use these checks."""
    if x.dim() != 4:
        raise ValueError(f"{names[0]}: expected images [B, C, H, W], found shape "
                         f"{tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"{names[1]}: expected the shape of {names[0]} {tuple(x.shape)}, "
                         f"found {tuple(y.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{names[0]}: empty batch of shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"{names[0]}: images must be at least {min_size}x{min_size}, found "
                         f"shape {tuple(x.shape)}")


def _per_image(data_range: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Data range as ``[B, 1, 1, 1]`` (a scalar or one value per image)."""
    batch = like.shape[0]
    value = torch.as_tensor(data_range, dtype=like.dtype, device=like.device)
    if value.numel() not in (1, batch):
        raise ValueError(f"data_range: expected a scalar or {batch} values (one per image), "
                         f"found shape {tuple(value.shape)}")
    return value.reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1)


def ssim_torch(x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor,
               reduction: str = "mean", win_size: int = SSIM_WIN_SIZE, k1: float = SSIM_K1,
               k2: float = SSIM_K2) -> torch.Tensor:
    """SSIM of each image of ``x, y [B, C, H, W]`` (symmetric in x and y), differentiable.

    The numpy :func:`ssim_per_slice` formula: 7x7 box mean (``avg_pool2d`` with stride 1, i.e.
    a conv2d with a uniform kernel, valid output only), sample covariance ``N/(N-1)``,
    ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2`` with ``R = data_range`` (a scalar or ``[B]``, e.g. each
    slice's volume maximum). The map is averaged over channels and valid pixels, giving ``[B]``
    for ``reduction="none"``, else its mean or sum. ``1 - ssim_torch`` is the SSIM loss.
    """
    _check_win_size(win_size)
    _check_reduction(reduction)
    _check_image_pair(x, y, ("x", "y"), min_size=win_size)
    peak = _per_image(data_range, x)  # [B, 1, 1, 1]
    channels = x.shape[1]
    n = win_size * win_size
    cov_norm = n / (n - 1.0)
    moments = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], dim=1), win_size, stride=1)
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = moments.split(channels, dim=1)  # [B, C, H', W']
    var_x = cov_norm * (mean_xx - mu_x * mu_x)
    var_y = cov_norm * (mean_yy - mu_y * mu_y)
    cov_xy = cov_norm * (mean_xy - mu_x * mu_y)
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))
    return _reduce(ssim_map.mean(dim=(1, 2, 3)), reduction)


def nmse_torch(gt: torch.Tensor, pred: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``||gt - pred||^2 / ||gt||^2`` of each image of ``[B, C, H, W]``."""
    _check_reduction(reduction)
    _check_image_pair(gt, pred, ("gt", "pred"))
    dims = (1, 2, 3)
    return _reduce((gt - pred).square().sum(dims) / gt.square().sum(dims), reduction)


def psnr_torch(gt: torch.Tensor, pred: torch.Tensor, data_range: float | torch.Tensor,
               reduction: str = "mean") -> torch.Tensor:
    """``10 log10(R^2 / MSE)`` of each image of ``[B, C, H, W]``; ``R`` scalar or ``[B]``.

    For the fastMRI volume PSNR, do not average per-slice PSNRs: accumulate squared errors per
    volume (:class:`VolumeMetricAccumulator`).
    """
    _check_reduction(reduction)
    _check_image_pair(gt, pred, ("gt", "pred"))
    peak = _per_image(data_range, gt).reshape(-1)  # [B]
    err = (gt - pred).square().mean(dim=(1, 2, 3))
    return _reduce(10.0 * torch.log10(peak * peak / err), reduction)


def _symmetric_pad(x: torch.Tensor, radius: int) -> torch.Tensor:
    """scipy's ``mode="reflect"`` (d c b a | a b c d | d c b a) on the last two dims, any radius."""
    for dim in (-2, -1):
        size = x.shape[dim]
        index = torch.arange(-radius, size + radius, device=x.device) % (2 * size)
        index = torch.where(index >= size, 2 * size - 1 - index, index)
        x = x.index_select(dim, index)
    return x


def _gaussian_kernels_1d(sigma: float, dtype: torch.dtype,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian ``g`` and its second derivative ``g''`` sampled on ``[-r, r]``, ``r =
    int(4 sigma + 0.5)``, ``g`` normalised to sum 1 and ``g'' = g (x^2/sigma^4 - 1/sigma^2)``
    (the discretisation scipy.ndimage uses)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    gauss = torch.exp(-0.5 * offsets.square() / sigma ** 2)
    gauss = gauss / gauss.sum()
    second = gauss * (offsets.square() / sigma ** 4 - 1.0 / sigma ** 2)
    return gauss.to(dtype), second.to(dtype)


def laplacian_torch(images: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """The HFEN filter (module docstring) on ``[N, 1, H, W]``: KD-MRI's 3x3 Laplacian with the
    outer frame zeroed (``sigma=None``) or a Laplacian of Gaussian of width ``sigma``."""
    if sigma is None:
        kernel = torch.tensor(_DISCRETE_LAPLACIAN, dtype=images.dtype, device=images.device)
        out = F.conv2d(_symmetric_pad(images, 1), kernel.view(1, 1, 3, 3))
        frame = torch.zeros_like(out[:1, :1])
        frame[..., 1:-1, 1:-1] = 1.0
        return out * frame
    gauss, second = _gaussian_kernels_1d(sigma, images.dtype, images.device)
    radius = gauss.numel() // 2
    padded = _symmetric_pad(images, radius)
    gauss_h, gauss_w = gauss.view(1, 1, -1, 1), gauss.view(1, 1, 1, -1)
    second_h, second_w = second.view(1, 1, -1, 1), second.view(1, 1, 1, -1)
    # Separable: d2/dh2 (g'' along H, g along W) + d2/dw2 (g along H, g'' along W).
    return (F.conv2d(F.conv2d(padded, second_h), gauss_w)
            + F.conv2d(F.conv2d(padded, gauss_h), second_w))


def hfen_torch(gt: torch.Tensor, pred: torch.Tensor, sigma: float | None = None,
               clip: tuple[float, float] | None = HFEN_CLIP,
               reduction: str = "mean") -> torch.Tensor:
    """KD-MRI's HFN of each image of ``[B, 1, H, W]``: ``sum (L gt - L pred)^2 / sum (L gt)^2``
    with ``pred`` clipped to ``clip`` (module docstring for the filter ``L``)."""
    _check_hfen_options(sigma, clip)
    _check_reduction(reduction)
    _check_image_pair(gt, pred, ("gt", "pred"), min_size=3)
    if gt.shape[1] != 1:
        raise ValueError(f"gt: expected one channel [B, 1, H, W], found shape {tuple(gt.shape)}")
    if clip is not None:
        pred = pred.clamp(clip[0], clip[1])
    gt_filtered = laplacian_torch(gt, sigma)
    diff = gt_filtered - laplacian_torch(pred, sigma)
    dims = (1, 2, 3)
    return _reduce(diff.square().sum(dims) / gt_filtered.square().sum(dims), reduction)


# ---------------------------------------------------------------------------------------------
# Per-slice sums -> per-volume metrics
# ---------------------------------------------------------------------------------------------

SLICE_SUM_KEYS = ("sse", "gt_sq", "pixels", "ssim", "hfen", "count")
_RANGE_KEY = "data_range_max"


def reconstruction_slice_sums(gt: Any, pred: Any,
                              data_range: float | Sequence[float] | torch.Tensor,
                              hfen_sigma: float | None = None,
                              hfen_clip: tuple[float, float] | None = HFEN_CLIP
                              ) -> dict[str, torch.Tensor]:
    """Per-slice terms ``{key: [B] float64 on the CPU}`` whose per-volume sums give the volume
    metrics (:func:`volume_metrics_from_sums`).

    ``gt``, ``pred``: slices ``[B, H, W]`` or ``[B, 1, H, W]`` (torch on any device, or numpy);
    ``data_range``: the volume's data range (scalar or one per slice). Keys: ``sse`` (sum of
    squared errors), ``gt_sq`` (sum of squared ground truth), ``pixels``, ``ssim`` and ``hfen``
    (the slice's values), ``count`` (1) are summed over a volume's slices; ``data_range_max`` is
    reduced with max (``kdhpc.train``'s convention: keys ending in ``_max``). This function can
    serve as ``kdhpc.train``'s ``eval_fn`` body, with ``volume_metrics=volume_metrics_from_sums``.
    """
    gt_t = torch.as_tensor(gt).detach()
    pred_t = torch.as_tensor(pred).detach().to(gt_t.device)
    if gt_t.dim() == 3:
        gt_t, pred_t = gt_t.unsqueeze(1), pred_t.unsqueeze(1)
    if gt_t.dim() != 4 or gt_t.shape[1] != 1:
        raise ValueError(f"gt: expected slices [B, H, W] or [B, 1, H, W], found shape "
                         f"{tuple(gt_t.shape)}")
    _check_image_pair(gt_t, pred_t, ("gt", "pred"), min_size=SSIM_WIN_SIZE)
    for name, tensor in (("gt", gt_t), ("pred", pred_t)):
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name}: expected real images, found dtype {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name}: expected finite values, found NaN or Inf in a batch "
                             f"of shape {tuple(tensor.shape)}")
    batch = gt_t.shape[0]
    peak = torch.as_tensor(data_range, dtype=torch.float64).detach().cpu().reshape(-1)
    if peak.numel() == 1:
        peak = peak.repeat(batch)
    if peak.numel() != batch or not bool((torch.isfinite(peak) & (peak > 0)).all()):
        raise ValueError(f"data_range: expected a positive finite scalar or {batch} such "
                         f"values (one per slice), found {peak.tolist()}")

    gt64, pred64 = gt_t.double(), pred_t.double()  # [B, 1, H, W]
    dims = (1, 2, 3)
    hfen = hfen_torch(gt64, pred64, hfen_sigma, hfen_clip, reduction="none").cpu()
    undefined = torch.nonzero(~torch.isfinite(hfen)).flatten().tolist()
    if undefined:
        raise ValueError(f"gt: slices {undefined} of the batch have no edges (Laplacian zero "
                         "everywhere); HFEN is undefined there")
    gt_sq = gt64.square().sum(dims).cpu()
    return {
        "sse": (gt64 - pred64).square().sum(dims).cpu(),
        "gt_sq": gt_sq,
        "pixels": torch.full_like(gt_sq, float(gt64[0].numel())),
        "ssim": ssim_torch(gt64, pred64, peak.to(gt64.device), reduction="none").cpu(),
        "hfen": hfen,
        "count": torch.ones_like(gt_sq),
        _RANGE_KEY: peak,
    }


def volume_metrics_from_sums(sums: dict[str, float], volume: str = "volume") -> dict[str, float]:
    """One volume's ``mse = sse/pixels``, ``nmse = sse/gt_sq``, ``psnr = 10 log10(R^2/mse)``
    (``R = data_range_max``; inf when the error is zero), ``ssim`` and ``hfen`` (sums / count)
    from the summed :func:`reconstruction_slice_sums`."""
    missing = [k for k in SLICE_SUM_KEYS + (_RANGE_KEY,) if k not in sums]
    if missing:
        raise ValueError(f"sums of {volume}: missing keys {missing}; expected the keys of "
                         "reconstruction_slice_sums")
    if sums["count"] <= 0:
        raise ValueError(f"sums of {volume}: no slice (count {sums['count']})")
    if sums["gt_sq"] == 0:
        raise ValueError(f"gt: volume {volume} is all zeros; NMSE is undefined")
    err = sums["sse"] / sums["pixels"]
    peak = sums[_RANGE_KEY]
    return {
        "mse": err,
        "nmse": sums["sse"] / sums["gt_sq"],
        "psnr": math.inf if err == 0 else 10.0 * math.log10(peak * peak / err),
        "ssim": sums["ssim"] / sums["count"],
        "hfen": sums["hfen"] / sums["count"],
    }


# ---------------------------------------------------------------------------------------------
# Per-volume accumulation for (distributed) evaluation
# ---------------------------------------------------------------------------------------------


class VolumeMetricAccumulator:
    """Per-volume sums from batches of slices; merged across ranks by all-reduce.

    ``update(volumes, gt, pred, data_range)`` takes a batch of slices ``[B, H, W]`` or
    ``[B, 1, H, W]`` (torch on any device, or numpy), the volume name of each slice and the
    volume's data range ``R`` (fastMRI: the target volume's maximum, the h5 attribute ``max``;
    SSIM needs it before the whole volume has been seen, so it must be given, and the same for
    every slice of a volume). Per volume it keeps, in float64, the sums of
    :func:`reconstruction_slice_sums`:

    - ``SUM_FIELDS`` (all-reduced with SUM): squared error, squared ground truth, pixel count,
      per-slice SSIM, per-slice HFEN, slice count;
    - ``MAX_FIELDS`` (all-reduced with MAX, never SUM): the data range ``R``.

    ``compute()`` turns them into metrics with :func:`volume_metrics_from_sums`: the whole-volume
    numpy functions' values. Because every field is a sum or a max, the result is
    the same however slices are split over ranks, even when one volume's slices are spread out.

    Distributed use: ``acc.all_reduce()`` (torch.distributed initialised) gathers the union of
    volume names, orders it, and all-reduces the two ``[V, F]`` tensors; or do it by hand with
    :meth:`state` / :meth:`from_state` / :meth:`merge`. ``expected_volumes`` makes ``compute()``
    fail when a volume got no slice (a sampler that dropped data).
    """

    SUM_FIELDS = SLICE_SUM_KEYS
    MAX_FIELDS = (_RANGE_KEY,)

    def __init__(self, expected_volumes: Iterable[str] = (), *, hfen_sigma: float | None = None,
                 hfen_clip: tuple[float, float] | None = HFEN_CLIP):
        _check_hfen_options(hfen_sigma, hfen_clip)
        self.hfen_sigma = hfen_sigma
        self.hfen_clip = None if hfen_clip is None else (float(hfen_clip[0]), float(hfen_clip[1]))
        self._names: list[str] = []
        self._rows: dict[str, int] = {}
        self._sums = torch.zeros(0, len(self.SUM_FIELDS), dtype=torch.float64)  # [V, F_sum]
        self._maxima = torch.zeros(0, len(self.MAX_FIELDS), dtype=torch.float64)  # [V, F_max]
        self._add_volumes(expected_volumes)

    @property
    def volumes(self) -> list[str]:
        return list(self._names)

    def _add_volumes(self, names: Iterable[str]) -> None:
        new = [n for n in dict.fromkeys(names) if n not in self._rows]
        for name in new:
            if not isinstance(name, str):
                raise ValueError(f"volumes: expected volume names as str, found {name!r}")
            self._rows[name] = len(self._names)
            self._names.append(name)
        if new:
            self._sums = torch.cat([self._sums,
                                    self._sums.new_zeros(len(new), self._sums.shape[1])])
            self._maxima = torch.cat([self._maxima, self._maxima.new_full(
                (len(new), self._maxima.shape[1]), -math.inf)])

    def update(self, volumes: str | Sequence[str], gt: Any, pred: Any,
               data_range: float | Sequence[float] | torch.Tensor) -> None:
        """Add a batch of slices (class docstring)."""
        sums = reconstruction_slice_sums(gt, pred, data_range, self.hfen_sigma, self.hfen_clip)
        peak = sums[_RANGE_KEY]  # [B]
        names = [volumes] * peak.numel() if isinstance(volumes, str) else list(volumes)
        if len(names) != peak.numel():
            raise ValueError(f"volumes: expected one name per slice ({peak.numel()}), found "
                             f"{len(names)}")
        self._check_consistent_range(names, peak)
        self._add_volumes(names)
        rows = torch.tensor([self._rows[n] for n in names])
        self._sums.index_add_(0, rows, torch.stack([sums[k] for k in self.SUM_FIELDS], dim=1))
        self._maxima[:, 0].scatter_reduce_(0, rows, peak, reduce="amax")

    def _check_consistent_range(self, names: list[str], peak: torch.Tensor) -> None:
        seen: dict[str, float] = {}
        for name, value in zip(names, peak.tolist()):
            row = self._rows.get(name)
            previous = seen.get(name, self._maxima[row, 0].item() if row is not None else None)
            if previous is not None and math.isfinite(previous) and \
                    not math.isclose(previous, value, rel_tol=1e-6):
                raise ValueError(f"data_range: volume {name!r} got {value} after {previous} for "
                                 "other slices; pass the same volume maximum for every slice")
            seen[name] = value

    # -- state for reductions -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """``{"volumes": [V names], "sums": [V, 6] float64, "maxima": [V, 1] float64,
        "hfen_sigma", "hfen_clip"}`` (copies; fields in ``SUM_FIELDS`` / ``MAX_FIELDS`` order)."""
        return {"volumes": list(self._names), "sums": self._sums.clone(),
                "maxima": self._maxima.clone(), "hfen_sigma": self.hfen_sigma,
                "hfen_clip": self.hfen_clip}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> VolumeMetricAccumulator:
        """Rebuild an accumulator from :meth:`state` (e.g. after a manual all-reduce)."""
        names = list(state["volumes"])
        sums = torch.as_tensor(state["sums"], dtype=torch.float64).cpu()
        maxima = torch.as_tensor(state["maxima"], dtype=torch.float64).cpu()
        expected_sums = (len(names), len(cls.SUM_FIELDS))
        expected_maxima = (len(names), len(cls.MAX_FIELDS))
        if tuple(sums.shape) != expected_sums or tuple(maxima.shape) != expected_maxima:
            raise ValueError(f"state: expected sums {expected_sums} and maxima {expected_maxima} "
                             f"for {len(names)} volumes, found {tuple(sums.shape)} and "
                             f"{tuple(maxima.shape)}")
        acc = cls(names, hfen_sigma=state["hfen_sigma"], hfen_clip=state["hfen_clip"])
        acc._sums, acc._maxima = sums.clone(), maxima.clone()
        return acc

    def _aligned(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums and maxima re-ordered onto ``names`` (zeros / -inf for volumes not seen here)."""
        sums = self._sums.new_zeros(len(names), self._sums.shape[1])
        maxima = self._maxima.new_full((len(names), self._maxima.shape[1]), -math.inf)
        if self._names:
            target = torch.tensor([names.index(n) for n in self._names])
            sums[target] = self._sums
            maxima[target] = self._maxima
        return sums, maxima

    def _check_same_options(self, other: VolumeMetricAccumulator) -> None:
        mine, theirs = (self.hfen_sigma, self.hfen_clip), (other.hfen_sigma, other.hfen_clip)
        if mine != theirs:
            raise ValueError(f"other: HFEN options (sigma, clip) {theirs} differ from {mine}; "
                             "accumulators measure different HFENs")

    def merge(self, other: VolumeMetricAccumulator) -> VolumeMetricAccumulator:
        """A new accumulator holding both: sums added, maxima maxed, volumes united by name."""
        self._check_same_options(other)
        names = list(dict.fromkeys(self._names + other._names))
        sums_a, max_a = self._aligned(names)
        sums_b, max_b = other._aligned(names)
        return VolumeMetricAccumulator.from_state({
            "volumes": names, "sums": sums_a + sums_b, "maxima": torch.maximum(max_a, max_b),
            "hfen_sigma": self.hfen_sigma, "hfen_clip": self.hfen_clip})

    def all_reduce(self, group: Any = None) -> VolumeMetricAccumulator:
        """The accumulator of all ranks of ``group`` (every rank gets the same); a copy of this
        one when torch.distributed is not initialised. A collective: every rank must call it."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return VolumeMetricAccumulator.from_state(self.state())
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (self._names, self.hfen_sigma, self.hfen_clip), group)
        mine = (self.hfen_sigma, self.hfen_clip)
        for names, sigma, clip in gathered:  # every rank sees the same list, so all raise alike
            if (sigma, clip) != mine:
                raise ValueError(f"all_reduce: a rank measures HFEN with (sigma, clip) "
                                 f"{(sigma, clip)}, this one with {mine}")
        union = sorted(set().union(*(names for names, _, _ in gathered)))
        sums, maxima = self._aligned(union)
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        sums, maxima = sums.to(device), maxima.to(device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        return VolumeMetricAccumulator.from_state({
            "volumes": union, "sums": sums.cpu(), "maxima": maxima.cpu(),
            "hfen_sigma": self.hfen_sigma, "hfen_clip": self.hfen_clip})

    # -- results ------------------------------------------------------------------------------

    def compute(self) -> dict[str, dict[str, float]]:
        """``{volume: {"mse", "nmse", "psnr", "ssim", "hfen", "slices"}}`` for every volume."""
        counts = self._sums[:, self.SUM_FIELDS.index("count")].tolist()
        empty = [n for n, count in zip(self._names, counts) if count == 0]
        if empty:
            raise ValueError(f"expected_volumes: {len(empty)} volume(s) got no slice: "
                             f"{empty[:10]}")
        keys = self.SUM_FIELDS + self.MAX_FIELDS
        table = torch.cat([self._sums, self._maxima], dim=1).tolist()  # [V, F]
        results = {}
        for name, row, count in zip(self._names, table, counts):
            results[name] = volume_metrics_from_sums(dict(zip(keys, row)), volume=name)
            results[name]["slices"] = int(count)
        return results

    def summary(self, fmt: str = ".4g") -> dict[str, dict[str, Any]]:
        """:func:`summarize` of each metric over volumes."""
        per_volume = self.compute()
        metrics = ("mse", "nmse", "psnr", "ssim", "hfen")
        return {m: summarize([v[m] for v in per_volume.values()], fmt) for m in metrics}


# ---------------------------------------------------------------------------------------------
# Summaries and paired tests
# ---------------------------------------------------------------------------------------------


def _as_sample(values: Any, name: str) -> np.ndarray:
    sample = _as_real_array(values, name).astype(np.float64)
    if sample.ndim != 1 or sample.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of numbers, found shape "
                         f"{tuple(sample.shape)}")
    _check_finite(sample, name)
    return sample


def format_mean_std(mean: float, std: float, k: float = 1.0, fmt: str = ".4g") -> str:
    """``"mean +- k*std"``: ``k=1`` for our tables, ``k=2`` for KD-MRI / fastMRI style."""
    return f"{mean:{fmt}} +- {k * std:{fmt}}"


def summarize(values: Sequence[float], fmt: str = ".4g") -> dict[str, Any]:
    """``{"n", "mean", "std", "mean_pm_std", "mean_pm_2std"}`` of per-volume values; ``std`` is
    the sample standard deviation (ddof=1), NaN for a single value."""
    sample = _as_sample(values, "values")
    mean = float(sample.mean())
    std = float(sample.std(ddof=1)) if sample.size > 1 else math.nan
    return {"n": int(sample.size), "mean": mean, "std": std,
            "mean_pm_std": format_mean_std(mean, std, 1.0, fmt),
            "mean_pm_2std": format_mean_std(mean, std, 2.0, fmt)}


def paired_test(a: Sequence[float], b: Sequence[float], method: str = "ttest") -> dict[str, Any]:
    """Paired test of ``a`` against ``b`` (same volumes, same order).

    ``method="ttest"``: ``scipy.stats.ttest_rel`` (two-sided, statistic ``t`` of ``a - b``);
    ``method="wilcoxon"``: ``scipy.stats.wilcoxon`` signed-rank (two-sided). Returns
    ``{"method", "statistic", "p_value", "mean_difference" (mean of a - b), "ci95" (the 95%
    confidence interval of the mean difference from the t distribution, n - 1 degrees of
    freedom), "n"}``. The p-value is not corrected for multiple comparisons.
    """
    sample_a, sample_b = _as_sample(a, "a"), _as_sample(b, "b")
    if sample_a.shape != sample_b.shape:
        raise ValueError(f"b: expected as many values as a ({sample_a.size}), found "
                         f"{sample_b.size}")
    if sample_a.size < 2:
        raise ValueError(f"a: a paired test needs at least 2 pairs, found {sample_a.size}")
    if method == "ttest":
        result = scipy.stats.ttest_rel(sample_a, sample_b)
    elif method == "wilcoxon":
        if np.all(sample_a == sample_b):
            raise ValueError("a, b: all pairs are equal; the Wilcoxon test is undefined")
        result = scipy.stats.wilcoxon(sample_a, sample_b)
    else:
        raise ValueError(f"method: expected 'ttest' or 'wilcoxon', found {method!r}")
    diff = sample_a - sample_b
    half = (float(scipy.stats.t.ppf(0.975, diff.size - 1) * np.std(diff, ddof=1)
                  / np.sqrt(diff.size)))
    return {"method": method, "statistic": float(result.statistic),
            "p_value": float(result.pvalue), "mean_difference": float(np.mean(diff)),
            "ci95": [float(np.mean(diff)) - half, float(np.mean(diff)) + half],
            "n": int(sample_a.size)}



def paired_units(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict[str, Any]:
    """:func:`paired_test` of ``a`` against ``b`` on the units (volumes) both have, plus
    ``p_greater``, the one-sided p of a > b; equal samples give difference 0 and p 1, fewer
    than 2 common units NaNs (a report row, not an error)."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return {"n": len(keys), "mean_difference": math.nan, "p_value": math.nan,
                "p_greater": math.nan, "ci95": None}
    x, y = [a[k] for k in keys], [b[k] for k in keys]
    if np.allclose(x, y, rtol=0, atol=0):
        return {"n": len(keys), "mean_difference": 0.0, "p_value": 1.0, "p_greater": 1.0,
                "ci95": [0.0, 0.0]}
    test = paired_test(x, y)
    t, p = test["statistic"], test["p_value"]
    return {**test, "p_greater": p / 2 if t > 0 else 1 - p / 2}


def mixed_effects_table(units: Mapping[str, Mapping[Any, float]], value: str,
                        reference: str) -> str:
    """statsmodels' linear mixed model ``value ~ C(model)`` with a random intercept per unit
    (``units[model][unit] = value``; the repeated-measures comparison of several models on the
    same units), fixed effects against ``reference`` as markdown; a note when statsmodels is not
    installed or the fit fails."""
    try:
        import pandas as pd
        import statsmodels.formula.api as smf
    except ImportError:
        return ("statsmodels (or pandas) is not installed, so the linear mixed-effects model was "
                "not fitted; the paired t-tests above stand in for it.")
    frame = pd.DataFrame([{value: v, "model": m, "unit": str(k)}
                          for m, values in units.items() for k, v in values.items()])
    try:
        fit = smf.mixedlm(f"{value} ~ C(model, Treatment(reference={reference!r}))", frame,
                          groups=frame["unit"]).fit()
    except Exception as err:  # a singular fit must not lose the rest of the report
        return f"The mixed-effects model could not be fitted: {type(err).__name__}: {err}"
    lines = ["| term | estimate | std err | p |", "|---|---|---|---|"]
    for term in fit.fe_params.index:
        lines.append(f"| {term} | {fit.fe_params[term]:+.4g} | {fit.bse[term]:.3g} | "
                     f"{fit.pvalues[term]:.3g} |")
    return "\n".join(lines)

# ---------------------------------------------------------------------------------------------
# enhancement: SNR in ROIs, per-slice and per-volume PSNR / SSIM

ROI_NAMES = {2: "GM", 3: "WM", 9: "object"}
"""SNR ROIs: grey and white matter from a tissue map; ``object`` for automatic ROIs."""
ROI_BACKGROUND = 0
ROI_MARGIN = 4
"""Pixels between the head and the background ROI (edge blur and ringing are not noise)."""
AUTO_OBJECT_FRACTION = 0.1
"""Automatic ROIs: the object is where the target exceeds this fraction of its maximum."""


def roi_labels(tissue: np.ndarray | None, target: np.ndarray) -> np.ndarray:
    """SNR ROI map ``[H, W]`` int64: tissue ROIs (:data:`ROI_NAMES`), 0 = background ROI,
    -1 = neither.

    With a ``tissue`` map (0 outside the head): GM (2) and WM (3) as labelled; background = label
    0 more than :data:`ROI_MARGIN` pixels from any head pixel. Without one, the object is
    ``target > AUTO_OBJECT_FRACTION * max``; its interior (eroded by the margin) is the ``object``
    ROI (9) and the background is as above.
    """
    rois = np.full(target.shape, -1, dtype=np.int64)
    if tissue is not None:
        head = tissue > 0
        for label in (2, 3):
            rois[tissue == label] = label
    else:
        head = target > AUTO_OBJECT_FRACTION * float(target.max())
        rois[ndi.binary_erosion(head, iterations=ROI_MARGIN)] = 9
    far = ~ndi.binary_dilation(head, iterations=ROI_MARGIN) if head.any() else \
        np.ones_like(head)
    rois[far] = ROI_BACKGROUND
    return rois


def enhancement_slice_metrics(target: np.ndarray, pred: np.ndarray, rois: np.ndarray,
                   data_range: float) -> dict:
    """PSNR, SSIM (range = the volume maximum) and SNR per ROI of one slice ``[h, w]``."""
    row = {"psnr": psnr(target[None], pred[None], data_range=data_range),
           "ssim": float(ssim_per_slice(target[None], pred[None], data_range=data_range)[0])}
    present = [label for label in ROI_NAMES if (rois == label).any()]
    if present and (rois == ROI_BACKGROUND).sum() > 1:
        for label, value in snr_roi(pred, rois, present, ROI_BACKGROUND).items():
            row[f"snr_{ROI_NAMES[label]}"] = value
    return row


def volume_table(rows: list[dict]) -> list[dict]:
    """Per-volume PSNR (whole-volume MSE) and SSIM (mean over slices) from per-slice rows:
    ``PSNR_vol = 10 log10(R^2 / mean_s MSE_s)`` with ``MSE_s = R^2 10^(-PSNR_s / 10)``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["model"], row["volume"]), []).append(row)
    out = []
    for (task, model, volume), group in groups.items():
        peak = group[0]["volume_max"]
        mse = np.mean([peak ** 2 * 10 ** (-r["psnr"] / 10) for r in group])
        out.append({"task": task, "model": model, "volume": volume,
                    "psnr": float(10 * np.log10(peak ** 2 / mse)),
                    "ssim": float(np.mean([r["ssim"] for r in group]))})
    return out
