"""Multi-coil fastMRI slices as measured: the engine's view protocol for E2E-VarNet.

Unlike :class:`kdhpc.data.views.SliceViews` (which simulates k-space from the target image),
these views read the file's own multi-coil k-space ``kspace (S, C, H, W)`` (centred layout) and
its ``reconstruction_rss`` target, as fastMRI's VarNet training does:

- Mask: the file's own ``mask`` dataset (``[W]``) when it has one; else ``cfg.mask`` (fastMRI's
  ``random`` or ``equispaced`` 1-D masks, ``mask.center_fraction`` and ``mask.acceleration``,
  in the centred layout), drawn for view 0 from :func:`kdhpc.data.masks.file_seed` of the file's
  name (so every split, validation and test included, sees one reproducible mask per file) and
  for view ``v > 0`` from the (file, slice, view) key. Columns outside the acquired phase-encode
  range of the ISMRMRD header (``padding_left`` / ``padding_right``) are never sampled.
- k-space ``k0 = M * k + 0.0`` (no -0.0, :func:`kdhpc.data.masks.apply_mask`).
- Scale: k-space and target are divided by the volume's data range ``R``, the maximum of its
  centre-cropped targets over the indexed slices (fastMRI's evaluation ``maxval = gt.max()``;
  read once per volume), so targets lie in [0, 1] and metrics use data range 1.
- Target: ``reconstruction_rss`` centre-cropped to ``crop`` (fastMRI's stored targets are
  already the 320 x 320 crop); the network's RSS output is cropped to the target's shape.

Items (``get_view``), tensors only so that ``default_collate`` batches them (same-size volumes;
fastMRI's knee widths vary, so published configs use batch 1):

- ``kspace`` complex64 ``[C, H, W]`` (masked, scaled), ``mask`` float32 ``[1, 1, W]``,
- ``target`` float32 ``[1, h, w]`` (scaled), ``scale`` and ``volume_max`` float32 (``R``),
- ``volume``, ``slice`` int64, ``view_key`` int64 ``[2]`` (mask seed, 1 when the file's own mask).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdhpc.config import MaskConfig
from kdhpc.data.fastmri import DataFormatError, FastMRISliceDataset
from kdhpc.data.masks import apply_mask, file_seed, make_mask, seed_from
from kdhpc.data.views import center_crop

MASK_KINDS = ("random", "equispaced")


class MultiCoilViews:
    """Views of a multi-coil :class:`~kdhpc.data.fastmri.FastMRISliceDataset` (module
    docstring); ``num_views`` masks per slice."""

    def __init__(self, slices: FastMRISliceDataset, mask: MaskConfig, *, num_views: int = 1,
                 crop: tuple[int, int] | list[int] | None = None):
        if slices.challenge != "multicoil":
            raise ValueError(f"MultiCoilViews: expected a multicoil dataset, found "
                             f"{slices.challenge!r}")
        if mask.kind not in MASK_KINDS:
            raise ValueError(f"mask.kind: expected one of {', '.join(MASK_KINDS)} (fastMRI's "
                             f"1-D masks) for multi-coil k-space, found {mask.kind!r}")
        if len(slices) == 0:
            raise ValueError("MultiCoilViews: the dataset holds no slices")
        self.slices, self.num_views = slices, int(num_views)
        self.mask_cfg = dataclasses.replace(mask, layout="centered")
        self.crop = None if crop is None else tuple(crop)
        self._volume_max: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.slices)

    def volume_of(self, index: int) -> int:
        return self.slices._index[index][0]

    def _target(self, item: dict) -> torch.Tensor:
        if item["target"] is None:
            raise DataFormatError(f"{item['fname']}: missing 'reconstruction_rss'; every split "
                                  f"this recipe reads needs its target")
        return center_crop(item["target"], self.crop)

    def volume_max(self, volume: int) -> float:
        """The data range ``R`` of a volume: the maximum of its cropped, indexed targets."""
        if volume not in self._volume_max:
            peak = max(float(self._target(self.slices[i]).max())
                       for i in self.slices.volume_indices(volume))
            if not peak > 0:
                raise DataFormatError(f"{self.slices.volumes[volume][0]}: reconstruction_rss "
                                      f"is all zeros; the data range is undefined")
            self._volume_max[volume] = peak
        return self._volume_max[volume]

    def mask_seed(self, item: dict, view: int) -> int:
        if view == 0:
            return file_seed(item["fname"], self.mask_cfg.seed)
        return seed_from("view", Path(item["fname"]).name, int(item["slice"]), view,
                         self.mask_cfg.seed)

    def view_key(self, index: int, view: int) -> tuple[int, int]:
        number, s = self.slices._index[index]
        item = {"fname": self.slices.volumes[number][0], "slice": s}
        own = "mask" in self.slices.handles.get(item["fname"])
        return (0 if own else self.mask_seed(item, view), int(own))

    def line_mask(self, item: dict, view: int) -> np.ndarray:
        """The 1-D mask ``[W]`` of a slice: the file's own, else drawn (module docstring)."""
        width = item["kspace"].shape[-1]
        if "mask" in item:
            mask = item["mask"].numpy()
            if mask.shape != (width,):
                raise DataFormatError(f"{item['fname']}: mask: expected shape ({width},), found "
                                      f"{mask.shape}")
            return (mask > 0).astype(np.float32)
        mask = make_mask(self.mask_cfg, width, seed=self.mask_seed(item, view))
        header = item.get("header")
        if header is not None:  # never sample the zero-padded columns outside the acquisition
            mask[:header["padding_left"]] = 0.0
            mask[header["padding_right"]:] = 0.0
        return mask

    def get_view(self, index: int, view: int) -> dict[str, Any]:
        if not 0 <= view < self.num_views:
            raise IndexError(f"view: expected 0 <= view < {self.num_views}, found {view}")
        item = self.slices[index]
        number = item["volume"]
        scale = self.volume_max(number)
        mask = torch.from_numpy(self.line_mask(item, view))
        kspace = apply_mask(item["kspace"] / scale, mask)                  # [C, H, W]
        key = self.view_key(index, view)
        return {"kspace": kspace, "mask": mask.reshape(1, 1, -1),
                "target": (self._target(item) / scale)[None],
                "scale": torch.tensor(scale, dtype=torch.float32),
                "volume_max": torch.tensor(scale, dtype=torch.float32),
                "volume": torch.tensor(number, dtype=torch.int64),
                "slice": torch.tensor(item["slice"], dtype=torch.int64),
                "view_key": torch.tensor(key, dtype=torch.int64)}


def describe(views: MultiCoilViews) -> dict[str, Any]:
    """What a stage record says about a split: volumes, slices, coils, sizes, mask."""
    first = views.slices[0]
    return {"volumes": len(views.slices.volumes), "slices": len(views),
            "kspace_shape": list(first["kspace"].shape),
            "target_shape": list(views._target(first).shape), "num_views": views.num_views,
            "mask": dataclasses.asdict(views.mask_cfg)}
