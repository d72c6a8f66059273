"""A dataset of views over image slices: the engine's view protocol for every image-to-image task.

:class:`SliceViews` wraps a (volume, slice) dataset whose items carry a real ``target`` image
(:class:`kdhpc.data.fastmri.FastMRISliceDataset`: its ``reconstruction_esc`` / ``_rss``;
:class:`kdhpc.data.kdmri.KDMRISliceDataset`: its ``volfs``) and makes network inputs from the
target by the degradation that ``cfg.degrade.task`` names (:func:`kdhpc.data.degrade.make_view`):

- ``undersample``: Cartesian undersampling with the mask of ``cfg.mask`` (KD-MRI reconstruction);
- ``denoise``: reduced-NSA complex Gaussian k-space noise (enhancement);
- ``superres``: central k-space truncation (KD-MRI super-resolution: the central 64 x 64 of
  256 x 256 at ``sr_scale = 4`` with ``sr_mode: central_block``).

It implements the protocol of :mod:`kdhpc.train`: ``len``, ``num_views``,
``get_view(index, view)``, ``volume_of(index)``, and ``view_key(index, view)`` so that a teacher
cache stores each record's key and refuses a view made differently.

Conventions (decided here, used by every recipe that reads these views):

- Simulation from the target. The input is always simulated from the real target image, never
  read from the file's own k-space: ``k = fft2(target, centered)``, then the degradation. This
  is KD-MRI's data model (its ``volfs`` is a magnitude image and its k-space the unshifted FFT
  of it). fastMRI files store *centred* k-space; a DC-CNN works in KD-MRI's *unshifted* layout,
  so a view is made explicitly in the layout ``centered`` names (``False`` for DC-CNN) and the
  file's k-space is never ``ifftshift``-ed (for even sizes that would differ by a
  ``(-1)^(i+j)`` checkerboard, i.e. move the image by half the field of view).
- Crop. ``crop = (h, w)``: the central ``min(h, H) x min(w, W)`` of the target, before anything
  else (fastMRI's 320 x 320 convention; a crop larger than the image keeps the image).
- Normalisation (``normalize``): ``"volume"`` (default) divides every slice of a volume by the
  volume's maximum ``R`` (the file attribute ``max`` when present, fastMRI's data range; else
  the maximum over the volume's indexed slices), so targets lie in [0, 1] as in KD-MRI;
  ``"slice"`` divides by each slice's own maximum; ``"none"`` keeps the stored scale. The
  degradations are linear in the image (the noise level of ``denoise`` is relative to the image
  max), so normalising the target before degrading equals normalising the input. Each item
  carries ``scale`` (the divisor) and ``volume_max`` (``R``, original units): metrics go back to
  the original scale with ``pred * scale`` and use ``data_range = volume_max``.
- Network input (``input_kind``): ``"real"`` takes ``Re(ifft2(k_degraded))`` (DC-CNN's one real
  channel: every cascade after the first also sees a real part, the output of its DC step);
  ``"magnitude"`` takes ``|ifft2(k_degraded)|`` (KD-MRI's ``img_volus`` and its SR input).
- Masks. ``mask.kind: kdmri`` and ``file`` are fixed masks (one per dataset and acceleration, as
  KD-MRI ships them), drawn once with ``mask.seed``; ``random`` and ``equispaced`` are drawn per
  view from the view key's mask seed (so every view, and view 0 that evaluation reads, is
  reproducible in every process). A mask is built for the width of the (transformed) image in
  ``mask.layout`` and moved to the layout ``centered`` names; a 2-D mask file must match the
  image's shape (KD-MRI's ``us_masks`` match its data).
- Views. ``num_views = degrade.views_per_sample``; view ``v`` of sample ``i`` is
  :func:`kdhpc.data.degrade.view_key` of ``"<file name>:<slice>"`` (the file's name, not its
  folder, so keys survive moving the data) with ``base_seed``; view 0 is the un-augmented one
  when ``degrade.dihedral`` is false, and always has dihedral id 0.

Items (``get_view``), all tensors so that ``default_collate`` batches them:

- ``input`` float32 ``[1, H, W]``, ``target`` float32 ``[1, H, W]`` (normalised),
- ``kspace`` complex64 ``[1, H, W]``: the degraded k-space in the ``centered`` layout (DC's k0),
- ``mask`` float32 ``[1, 1, W]``, or ``[1, H, W]`` for a 2-D mask file (``undersample``
  only; batches to ``[B, 1, 1, W]`` / ``[B, 1, H, W]``, which broadcast against
  ``[B, 1, H, W]``),
- ``scale``, ``volume_max`` float32 scalars; ``volume``, ``slice`` int64 scalars;
  ``view_key`` int64 ``[3]`` (dihedral id, mask seed, noise seed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kdhpc.config import Config, ConfigError, DegradeConfig, MaskConfig
from kdhpc.data.degrade import ViewKey, dihedral, ifft2, make_view, view_key
from kdhpc.data.fastmri import DataFormatError, FastMRISliceDataset, VolumeSliceDataset
from kdhpc.data.masks import make_mask, seed_from, to_layout
from kdhpc.metrics import roi_labels

NORMALIZATIONS = ("volume", "slice", "none")
INPUT_KINDS = ("real", "magnitude")
FIXED_MASKS = ("kdmri", "file")


def center_crop(image: torch.Tensor, size: tuple[int, int] | list[int] | None) -> torch.Tensor:
    """The central ``min(h, H) x min(w, W)`` of ``image`` ``[..., H, W]`` (``None``: unchanged).

    The crop starts at ``(H - h) // 2`` (fastMRI's ``center_crop``), so odd margins leave the
    extra row or column at the end.
    """
    if size is None:
        return image
    height, width = image.shape[-2:]
    h, w = min(int(size[0]), height), min(int(size[1]), width)
    top, left = (height - h) // 2, (width - w) // 2
    return image[..., top:top + h, left:left + w]


class SliceViews:
    """Views of the slices of ``slices`` made by ``degrade`` (see the module docstring).

    Args:
        slices: a :class:`~kdhpc.data.fastmri.VolumeSliceDataset` whose items have a real
            ``target`` ``[H, W]``, ``fname`` and ``slice`` (and optionally ``attrs["max"]``).
        degrade: the degradation and view pool (``cfg.degrade``).
        mask: the undersampling mask config (``cfg.mask``), required for ``undersample``.
        centered: k-space layout of the views: ``False`` is KD-MRI's / DC-CNN's unshifted FFT,
            ``True`` fastMRI's centred one.
        crop: centre crop ``(h, w)`` of the target, or None.
        normalize: ``"volume"``, ``"slice"`` or ``"none"``.
        input_kind: ``"real"`` or ``"magnitude"`` of the degraded image.
        base_seed: mixed into every view's seeds (``cfg.mask.seed`` in the recipes).
    """

    def __init__(self, slices: VolumeSliceDataset, degrade: DegradeConfig, *,
                 mask: MaskConfig | None = None, centered: bool = False,
                 crop: tuple[int, int] | list[int] | None = None, normalize: str = "volume",
                 input_kind: str = "real", base_seed: int = 0):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"SliceViews normalize: expected one of {NORMALIZATIONS}, found "
                             f"{normalize!r}")
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"SliceViews input_kind: expected one of {INPUT_KINDS}, found "
                             f"{input_kind!r}")
        if degrade.task == "undersample" and mask is None:
            raise ValueError("SliceViews: degrade.task is 'undersample', expected a mask config, "
                             "found None")
        if crop is not None and (len(crop) != 2 or min(crop) < 1):
            raise ValueError(f"SliceViews crop: expected (h, w) of positive integers, found "
                             f"{crop!r}")
        if len(slices) == 0:
            raise ValueError(f"SliceViews: {type(slices).__name__} holds no slices")
        self.slices, self.degrade, self.mask_cfg = slices, degrade, mask
        self.centered, self.crop = bool(centered), None if crop is None else tuple(crop)
        self.normalize, self.input_kind, self.base_seed = normalize, input_kind, int(base_seed)
        self.num_views = int(degrade.views_per_sample)
        self._volume_max: dict[int, float] = {}
        self._fixed_masks: dict[int, torch.Tensor] = {}

    # -- the engine's protocol ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.slices)

    def _location(self, index: int) -> tuple[int, int]:
        # VolumeSliceDataset's documented subclass contract: _index holds (volume, slice).
        if not 0 <= index < len(self.slices):
            raise IndexError(f"SliceViews index: expected 0..{len(self.slices) - 1}, found "
                             f"{index}")
        return self.slices._index[index]

    def volume_of(self, index: int) -> int:
        """The volume number of item ``index`` (evaluation keeps a volume on one rank)."""
        return self._location(index)[0]

    def sample_key(self, index: int) -> str:
        """``"<file name>:<slice>"``: what names a sample in its view seeds."""
        volume, slice_number = self._location(index)
        return f"{Path(self.slices.volumes[volume][0]).name}:{slice_number}"

    def view_key(self, index: int, view: int) -> ViewKey:
        """The :class:`~kdhpc.data.degrade.ViewKey` of view ``view`` of item ``index``."""
        return view_key(self.sample_key(index), view, self.degrade, base_seed=self.base_seed)

    def get_view(self, index: int, view: int) -> dict[str, torch.Tensor]:
        key = self.view_key(index, view)
        item = self.slices[index]
        target = self._target(item, index)  # [H, W] original units
        volume = self.volume_of(index)
        volume_max = self.volume_max(volume, item)
        if self.normalize == "volume":
            scale = volume_max
        elif self.normalize == "slice":
            scale = float(target.max())
        else:
            scale = 1.0
        if not scale > 0:
            raise DataFormatError(f"{item.get('fname')}: slice {item.get('slice')}: expected a "
                                  f"positive {self.normalize} maximum to normalise by, found "
                                  f"{scale}")
        target = center_crop(target / scale, self.crop)
        mask = None
        if self.degrade.task == "undersample":
            # rot90 by an odd number of quarter turns swaps H and W before the mask is applied.
            shape = tuple(target.shape[-2:]) if key.dihedral % 2 == 0 else tuple(
                target.shape[-2:])[::-1]
            mask = self.mask_for(shape, key)
        out = make_view(target, key, self.degrade, centered=self.centered, mask=mask)
        image = out["image"]  # [H, W] complex
        net_input = image.real if self.input_kind == "real" else image.abs()
        item_out = {
            "input": net_input.float().contiguous()[None],           # [1, H, W]
            "target": out["target"].float().contiguous()[None],      # [1, H, W]
            "kspace": out["kspace"].to(torch.complex64).contiguous()[None],  # [1, H, W]
            "scale": torch.tensor(scale, dtype=torch.float32),
            "volume_max": torch.tensor(volume_max, dtype=torch.float32),
            "volume": torch.tensor(volume, dtype=torch.int64),
            "slice": torch.tensor(int(item["slice"]), dtype=torch.int64),
            "view_key": torch.tensor(list(key), dtype=torch.int64),
        }
        if mask is not None:
            item_out["mask"] = mask.reshape(1, -1, mask.shape[-1])  # [1, 1, W] or [1, H, W]
        return item_out

    # -- pieces ---------------------------------------------------------------------------------

    @staticmethod
    def _target(item: dict, index: int) -> torch.Tensor:
        target = item.get("target")
        if target is None:
            raise DataFormatError(f"{item.get('fname')}: slice {item.get('slice')} (item "
                                  f"{index}) has no target image (a fastMRI test file?); views "
                                  f"are simulated from targets, expected train/val files")
        target = torch.as_tensor(target)
        if target.dim() != 2 or target.is_complex():
            raise DataFormatError(f"{item.get('fname')}: target: expected a real [H, W] image, "
                                  f"found shape {tuple(target.shape)} {target.dtype}")
        return target.float()

    def volume_max(self, volume: int, item: dict | None = None) -> float:
        """The maximum ``R`` of volume number ``volume`` in original units (cached): the file's
        ``max`` attribute when present, else the maximum of its indexed slices' targets."""
        if volume not in self._volume_max:
            attrs = (item or {}).get("attrs") or {}
            if "max" in attrs:
                peak = float(attrs["max"])
            else:
                peak = max(float(self._target(self.slices[i], i).max())
                           for i in self.slices.volume_indices(volume))
            self._volume_max[volume] = peak
        return self._volume_max[volume]

    def mask_for(self, shape: tuple[int, int], key: ViewKey) -> torch.Tensor:
        """float32 mask for an image of ``shape`` (H, W), in the layout ``centered`` names:
        ``[W]`` lines, or ``[H, W]`` from a 2-D ``.npy`` (``mask.kind: file``, KD-MRI's
        ``us_masks``). Fixed kinds (``kdmri``, ``file``) are drawn once with ``mask.seed``,
        the random ones from the view's mask seed."""
        cfg = self.mask_cfg
        fixed = cfg.kind in FIXED_MASKS
        if fixed and shape in self._fixed_masks:
            return self._fixed_masks[shape]
        mask = make_mask(cfg, shape[-1], seed=None if fixed else key.mask_seed)
        if mask.ndim == 2 and mask.shape != shape:
            raise ValueError(f"{cfg.path}: expected a 2-D mask of the image shape {shape} (after "
                             f"data.crop), found {mask.shape}")
        layout = "centered" if self.centered else "unshifted"
        mask = torch.from_numpy(np.ascontiguousarray(to_layout(mask, cfg.layout, layout)))
        if fixed:
            self._fixed_masks[shape] = mask
        return mask


def describe_views(views: SliceViews) -> dict[str, Any]:
    """A JSON-able summary of a view dataset (sizes, task, layout), for logs and reports."""
    return {"slices": len(views), "volumes": len(views.slices.volumes),
            "num_views": views.num_views, "task": views.degrade.task,
            "centered": views.centered, "crop": views.crop, "normalize": views.normalize,
            "input_kind": views.input_kind}


class TargetFreeViews:
    """Views of volumes used without their targets (undersampled k-space only).

    The view is simulated as :class:`SliceViews` makes it (the measured k-space of the recipe's
    data model), then everything a target gave away is taken back: the volume is re-normalised by
    the maximum of its own zero-filled magnitude (a scan without a target has no other scale),
    and ``target`` is zeros with ``labelled = 0``. Nothing of the target reaches a loss but the
    measured lines themselves.
    """

    def __init__(self, views: SliceViews):
        if views.degrade.task != "undersample":
            raise ValueError(f"TargetFreeViews: expected undersampled views, found task "
                             f"{views.degrade.task!r}")
        self.views = views
        self.num_views = views.num_views
        self._zero_filled_max: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.views)

    def volume_of(self, index: int) -> int:
        return self.views.volume_of(index)

    def view_key(self, index: int, view: int) -> ViewKey:
        return self.views.view_key(index, view)

    def zero_filled_max(self, volume: int) -> float:
        """The volume's maximum zero-filled magnitude over its slices (view 0), original units."""
        if volume not in self._zero_filled_max:
            peak = 0.0
            for index in self.views.slices.volume_indices(volume):
                item = self.views.get_view(index, 0)
                zero_filled = ifft2(item["kspace"], self.views.centered).abs()
                peak = max(peak, float(zero_filled.max()) * float(item["scale"]))
            self._zero_filled_max[volume] = peak
        return self._zero_filled_max[volume]

    def get_view(self, index: int, view: int) -> dict[str, torch.Tensor]:
        item = self.views.get_view(index, view)
        scale = self.zero_filled_max(int(item["volume"]))
        ratio = float(item["scale"]) / scale
        item["input"] = item["input"] * ratio
        item["kspace"] = item["kspace"] * ratio
        item["target"] = torch.zeros_like(item["target"])
        item["scale"] = item["volume_max"] = torch.tensor(scale, dtype=torch.float32)
        item["labelled"] = torch.tensor(0.0)
        return item


class WithUnlabelledViews:
    """A labelled view dataset whose extra views are target-free slices of other volumes.

    Item ``index`` keeps its length and its labelled views ``0..L-1`` (``L`` its ``num_views``);
    views ``L..L+R-1`` are view 0 of unlabelled slice ``((view - L) * len + index) % U``, with
    ``R = ceil(U / len)`` so every unlabelled slice is some item's view. The engine draws one view
    per item and epoch, so a run keeps its steps per epoch and its schedule while a share
    ``R / (L + R)`` of its samples are unlabelled; the teacher cache stores one record per view.
    """

    def __init__(self, labelled, unlabelled: TargetFreeViews):
        self.labelled, self.unlabelled = labelled, unlabelled
        self.rounds = -(-len(unlabelled) // len(labelled))
        self.num_views = labelled.num_views + self.rounds

    def __len__(self) -> int:
        return len(self.labelled)

    def volume_of(self, index: int) -> int:
        return self.labelled.volume_of(index)

    def _unlabelled_index(self, index: int, view: int) -> int | None:
        extra = view - self.labelled.num_views
        return None if extra < 0 else (extra * len(self.labelled) + index) % len(self.unlabelled)

    def view_key(self, index: int, view: int) -> ViewKey:
        other = self._unlabelled_index(index, view)
        return (self.labelled.view_key(index, view) if other is None
                else self.unlabelled.view_key(other, 0))

    def get_view(self, index: int, view: int) -> dict[str, torch.Tensor]:
        other = self._unlabelled_index(index, view)
        if other is not None:
            return self.unlabelled.get_view(other, 0)
        item = self.labelled.get_view(index, view)
        item["labelled"] = torch.tensor(1.0)
        return item


# ---------------------------------------------------------------------------------------------
# enhancement views: training patches, task ids, SNR ROI maps

TASKS = ("denoise", "superres")
"""Enhancement task ids (the multi-task EDSR's ``task_names``, the order of ``model.experts``)."""
ROI_LABEL_KEY = "tissue"
"""The per-slice label map in the files that gives SNR ROIs (kdhpc.metrics.roi_labels)."""


class EnhancementViews:
    """Dataset of views (:mod:`kdhpc.train` protocol) of one enhancement task over one split.

    A wrapper of :class:`kdhpc.data.views.SliceViews` (the shared view conventions: input
    simulated from the target, centre crop ``data.crop``, per-volume normalisation, magnitude
    input, centred k-space) that adds what this recipe needs: training patches, the task id
    and SNR ROI maps. ``get_view(index, view)`` returns ``input`` / ``target`` ``[1, p, p]`` (or
    the whole ``[1, h, w]`` slice when ``patch_size`` is 0), ``scale`` and ``volume_max`` (image
    units = normalised x scale), ``data_range`` (the volume maximum after normalisation: SSIM's
    R), ``task`` (int64 id in :data:`TASKS`), ``view_key`` (int64: dihedral id, mask seed, noise
    seed, patch top, patch left, task id) and, for whole slices, ``roi`` ``[h, w]`` int64
    (:func:`roi_labels` of the file's ``tissue`` map under the view's dihedral transform).
    """

    def __init__(self, slices: FastMRISliceDataset, cfg: Config, task: str, patch_size: int):
        if task not in TASKS:
            raise ConfigError(f"task: expected one of {TASKS}, found {task!r}")
        self.task, self.task_id, self.patch_size = task, TASKS.index(task), patch_size
        self.base = SliceViews(slices, dataclasses.replace(cfg.degrade, task=task), centered=True,
                               crop=cfg.data.crop, normalize="volume", input_kind="magnitude",
                               base_seed=cfg.mask.seed)
        self.num_views = self.base.num_views
        self._shapes: dict[int, tuple[int, int]] = {}  # volume number -> cropped (h, w)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def slices(self) -> FastMRISliceDataset:
        """The slice dataset the views are made from."""
        return self.base.slices

    def volume_of(self, index: int) -> int:
        return self.base.volume_of(index)

    def sample_name(self, index: int) -> str:
        return self.base.sample_key(index)

    def volume_name(self, index: int) -> str:
        return Path(self.base.slices.volumes[self.volume_of(index)][0]).name

    def _cropped_shape(self, index: int) -> tuple[int, int]:
        volume = self.volume_of(index)
        if volume not in self._shapes:
            target = self.base.slices[index]["target"]
            if target is None:
                raise DataFormatError(f"{self.base.slices.volumes[volume][0]}: expected a "
                                      f"target image for enhancement views, found none")
            self._shapes[volume] = tuple(center_crop(target, self.base.crop).shape[-2:])
        return self._shapes[volume]

    def _patch_origin(self, index: int, view: int, dihedral_id: int) -> tuple[int, int]:
        """Top-left corner of the view's patch, drawn from a seed of (sample, view) on the
        transformed slice (a quarter turn swaps its axes)."""
        if not self.patch_size:
            return 0, 0
        h, w = self._cropped_shape(index)
        if dihedral_id % 2:
            h, w = w, h
        if self.patch_size > min(h, w):
            raise ConfigError(f"data.patch_size: expected at most the cropped slice size "
                              f"{h}x{w}, found {self.patch_size}")
        rng = np.random.default_rng(seed_from("patch", self.sample_name(index), view,
                                              self.base.base_seed))
        return (int(rng.integers(0, h - self.patch_size + 1)),
                int(rng.integers(0, w - self.patch_size + 1)))

    def view_key(self, index: int, view: int) -> list[int]:
        """The ints that name view ``view`` of sample ``index`` (``get_view``'s ``view_key``)."""
        key = self.base.view_key(index, view)
        return [*key, *self._patch_origin(index, view, key.dihedral), self.task_id]

    def get_view(self, index: int, view: int) -> dict[str, torch.Tensor]:
        item = self.base.get_view(index, view)
        key = self.base.view_key(index, view)
        target, degraded = item["target"], item["input"]  # [1, h, w] each, normalised
        if self.patch_size == 0 and self.base.degrade.dihedral and \
                target.shape[-1] != target.shape[-2]:
            raise ConfigError(f"data.patch_size: 0 (whole slices) with dihedral views needs "
                              f"square slices, found {tuple(target.shape[-2:])}; set data.crop "
                              f"square or train on patches")
        top, left = self._patch_origin(index, view, key.dihedral)
        out = {"scale": item["scale"], "volume_max": item["volume_max"],
               "data_range": item["volume_max"] / item["scale"],
               "task": torch.tensor(self.task_id, dtype=torch.int64),
               "view_key": torch.tensor([*key, top, left, self.task_id], dtype=torch.int64)}
        if self.patch_size:
            window = (..., slice(top, top + self.patch_size), slice(left, left + self.patch_size))
            target, degraded = target[window].contiguous(), degraded[window].contiguous()
        else:
            extra = self.base.slices[index]["extra"]
            tissue = extra.get(ROI_LABEL_KEY)
            if tissue is not None:
                tissue = np.ascontiguousarray(dihedral(
                    center_crop(tissue.numpy(), self.base.crop), key.dihedral))
                if tissue.shape != tuple(target.shape[-2:]):
                    raise DataFormatError(f"{self.base.slices.volumes[self.volume_of(index)][0]}"
                                          f": '{ROI_LABEL_KEY}': expected the image shape "
                                          f"{tuple(target.shape[-2:])} after cropping, found "
                                          f"{tissue.shape}")
            out["roi"] = torch.from_numpy(roi_labels(tissue, target[0].numpy()))
        out["input"], out["target"] = degraded, target
        return out


class MultiTaskViews:
    """Several :class:`EnhancementViews` (one per task) as one dataset of views: index ``i``
    runs through the first part, then the second; every item carries its ``task``."""

    def __init__(self, parts: Sequence[EnhancementViews]):
        views = {p.num_views for p in parts}
        if len(views) != 1:
            raise ValueError(f"MultiTaskViews: parts expected one num_views, found {views}")
        self.parts = list(parts)
        self.num_views = views.pop()
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[EnhancementViews, int]:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        if not 0 <= index < len(self):
            raise IndexError(f"MultiTaskViews: index {index} outside 0..{len(self) - 1}")
        return self.parts[part], index - int(self.offsets[part])

    def volume_of(self, index: int) -> tuple[str, str]:
        part, local = self._locate(index)
        return part.task, part.volume_of(local)

    def view_key(self, index: int, view: int) -> list[int]:
        part, local = self._locate(index)
        return part.view_key(local, view)

    def get_view(self, index: int, view: int) -> dict[str, torch.Tensor]:
        part, local = self._locate(index)
        return part.get_view(local, view)
