"""fastMRI HDF5 volumes: writer, header parser and a lazily opening (volume, slice) dataset.

Layout (github facebookresearch/fastMRI; conventions in docs/methods.md), one file per volume:

- ``kspace``: complex64 ``(S, H, W)`` single-coil or ``(S, C, H, W)`` multi-coil, in the
  *centred* layout: ``k = fftshift(fft2(ifftshift(x), norm="ortho"))`` (see
  :func:`kdhpc.data.degrade.fft2` with ``centered=True``). H is the readout (frequency-encode)
  axis, W the phase-encode axis that 1-D masks act on.
- ``reconstruction_esc`` (single-coil) or ``reconstruction_rss`` (multi-coil): float32
  ``(S, h, w)``.
  Test files have no reconstruction; they carry a 1-D ``mask`` over W and attr ``acceleration``.
- ``ismrmrd_header``: ISMRMRD XML; encodedSpace / reconSpace ``matrixSize`` (x, y, z) and
  ``encodingLimits/kspace_encoding_step_1`` ``center`` / ``maximum`` (see :func:`read_header`).
- attrs ``max`` and ``norm`` (max and L2 norm of the reconstruction volume), ``acquisition``
  (CORPD_FBK, AXT1, ...), ``patient_id``.
- kdhpc extension: any further dataset whose first dimension is S (for example the default
  data's ``tissue`` label map) is returned slice by slice under ``item["extra"]``.

This module also holds the file plumbing that the other readers (``kdmri``, ``acdc``) share:
:class:`DataFormatError`, :func:`atomic_output` (write to a temporary name, rename when
complete) and :class:`VolumeSliceDataset` (the (volume, slice) index with whole-volume rank
sharding for evaluation).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"
RECON_KEYS = {"singlecoil": "reconstruction_esc", "multicoil": "reconstruction_rss"}
KSPACE_NDIM = {"singlecoil": 3, "multicoil": 4}
_STANDARD_KEYS = {"kspace", "reconstruction_esc", "reconstruction_rss", "ismrmrd_header", "mask"}


class DataFormatError(ValueError):
    """A data file (or array bound for one) that cannot be used; the message names the file,
    the key, what was expected and what was found."""


# ---------------------------------------------------------------------------------------------
# shared file plumbing

@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; rename it to ``path`` on success.

    On any exception the temporary file or folder is removed and ``path`` is left untouched,
    so a reader never sees half a file. The temporary name keeps ``path``'s suffixes (nibabel
    picks the format from them). A folder replaces an existing folder of the same name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            # os.replace cannot overwrite a non-empty folder: move the old one aside first.
            old = path.with_name(f".old{os.getpid()}.{path.name}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file read-only; a missing, truncated or non-HDF5 file is a DataFormatError."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: file not found") from None
    except OSError as err:
        raise DataFormatError(f"{path}: cannot open as HDF5 (truncated or corrupted file?): "
                              f"{err}") from None


# Read handles a dataset keeps open per process. A fastMRI training set is thousands of files
# (brain: ~4,500 volumes) and a rank's DataLoader workers each hold their own handles: opening
# each file once per item costs a metadata round trip on a parallel file system, holding every
# file open costs a descriptor and HDF5's per-file metadata cache (1-2 MB) each. 32 covers
# the files a shuffled batch touches a few times over and bounds a worker at tens of MB.
MAX_OPEN_FILES = 32


class H5Handles:
    """A bounded least-recently-used set of read-only HDF5 handles, owned by one process.

    ``get(path)`` returns an open handle, opening it (:func:`open_h5`) and closing the least
    recently used one when ``max_open`` are already open. Handles never cross a fork (a
    DataLoader worker opens its own) and are left out of a pickle (spawned workers start empty).
    """

    def __init__(self, max_open: int = MAX_OPEN_FILES):
        if not isinstance(max_open, int) or max_open < 1:
            raise ValueError(f"max_open_files: expected an integer >= 1, found {max_open!r}")
        self.max_open = max_open
        self._files: OrderedDict[str, h5py.File] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._files)

    def get(self, path: str | os.PathLike) -> h5py.File:
        if self._pid != os.getpid():  # inherited over a fork: the parent's, not ours to use
            self._files, self._pid = OrderedDict(), os.getpid()
        key = str(path)
        f = self._files.get(key)
        if f is not None:
            self._files.move_to_end(key)
            return f
        while len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].close()
        f = self._files[key] = open_h5(key)
        return f

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])


def read_h5(path: str | os.PathLike, f: h5py.File, key: str, index=()) -> np.ndarray:
    """``f[key][index]`` with errors that name the file and key."""
    if key not in f:
        raise DataFormatError(f"{path}: missing key '{key}'; found keys {sorted(f.keys())}")
    try:
        return f[key][index]
    except OSError as err:
        raise DataFormatError(f"{path}: key '{key}': cannot read (truncated or corrupted "
                              f"file?): {err}") from None


def check_finite(array: np.ndarray, where: str) -> None:
    """Raise if ``array`` holds NaN or Inf; ``where`` names the file/key/argument."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise DataFormatError(f"{where}: expected finite values, found {bad} NaN/Inf "
                              f"of {finite.size}")


def central_slices(n_slices: int, fraction: float) -> range:
    """The central ``max(1, round(n * fraction))`` slice numbers of a volume of ``n`` slices."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"slice_fraction: expected a value in (0, 1], found {fraction!r}")
    keep = max(1, int(round(n_slices * fraction)))
    start = (n_slices - keep) // 2
    return range(start, start + keep)


def list_files(root_or_files: str | os.PathLike | Sequence[str | os.PathLike],
               pattern: str) -> list[Path]:
    """Sorted files matching ``pattern`` under a folder, or the given list of files."""
    if isinstance(root_or_files, (str, os.PathLike)):
        root = Path(root_or_files)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise DataFormatError(f"{root}: expected a folder of {pattern} files or a file, "
                                  f"found nothing there")
        files = sorted(root.glob(pattern))
        if not files:
            raise DataFormatError(f"{root}: expected {pattern} files, found none")
        return files
    return [Path(f) for f in root_or_files]


class VolumeSliceDataset(Dataset):
    """A dataset indexed by (volume, slice) over whole volumes.

    Subclasses fill ``volumes`` (one ``(name, n_slices)`` per volume) and ``_index`` (one
    ``(volume number, slice number)`` per item, volumes contiguous and in order), and read
    items through ``self.handles`` (:class:`H5Handles`: files open lazily, at most
    ``max_open_files`` at once per process; :meth:`close` closes them).
    """

    volumes: list[tuple[str, int]]
    _index: list[tuple[int, int]]
    handles: H5Handles

    def close(self) -> None:
        """Close the files this process holds open (they reopen on the next read)."""
        handles = getattr(self, "handles", None)  # a subclass may read files whole instead
        if handles is not None:
            handles.close()

    def __len__(self) -> int:
        return len(self._index)

    def volume_indices(self, volume: int) -> list[int]:
        """Dataset indices of every indexed slice of volume number ``volume``."""
        return [i for i, (v, _) in enumerate(self._index) if v == volume]

    def rank_indices(self, rank: int, world_size: int) -> list[int]:
        """Indices for ``rank`` such that every volume lies wholly on one rank.

        Evaluation reduces per-volume sums (PSNR and SSIM over a volume), so a volume must
        not be split. Volumes go, largest first, to the rank holding the fewest slices so
        far (ties to the lower rank): deterministic and balanced to within one volume.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, "
                             f"found {rank}")
        by_volume: dict[int, list[int]] = {}
        for i, (v, _) in enumerate(self._index):
            by_volume.setdefault(v, []).append(i)
        load = [0] * world_size
        mine: list[int] = []
        for v in sorted(by_volume, key=lambda v: (-len(by_volume[v]), v)):
            target = min(range(world_size), key=lambda r: (load[r], r))
            load[target] += len(by_volume[v])
            if target == rank:
                mine += by_volume[v]
        return sorted(mine)


# ---------------------------------------------------------------------------------------------
# ISMRMRD header

def _header_xml(encoding_size: Sequence[int], recon_size: Sequence[int],
                center: int, maximum: int) -> bytes:
    """A minimal ISMRMRD header with the fields fastMRI's readers use."""
    ET.register_namespace("", ISMRMRD_NS)

    def sub(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
        node = ET.SubElement(parent, f"{{{ISMRMRD_NS}}}{tag}")
        if text is not None:
            node.text = str(text)
        return node

    root = ET.Element(f"{{{ISMRMRD_NS}}}ismrmrdHeader")
    encoding = sub(root, "encoding")
    for space, size in (("encodedSpace", encoding_size), ("reconSpace", recon_size)):
        matrix = sub(sub(encoding, space), "matrixSize")
        for axis, n in zip("xyz", size):
            sub(matrix, axis, int(n))
    limits = sub(sub(encoding, "encodingLimits"), "kspace_encoding_step_1")
    sub(limits, "minimum", 0)
    sub(limits, "maximum", int(maximum))
    sub(limits, "center", int(center))
    sub(encoding, "trajectory", "cartesian")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def parse_header(xml: bytes | str, where: str = "ismrmrd_header") -> dict:
    """Fields of an ISMRMRD header, with fastMRI's padding of the encoded lines.

    Returns ``encoding_size`` and ``recon_size`` as (x, y, z), ``center`` and ``maximum`` of
    ``kspace_encoding_step_1``, and ``padding_left = enc_y // 2 - center``,
    ``padding_right = padding_left + maximum + 1`` (the acquired phase-encode columns are
    ``[padding_left, padding_right)``; columns outside are zero padding).
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise DataFormatError(f"{where}: expected ISMRMRD XML, found unparsable text: "
                              f"{err}") from None
    ns = {"m": ISMRMRD_NS}

    def number(path: str) -> int:
        node = root.find(path, ns)
        if node is None or node.text is None:
            raise DataFormatError(f"{where}: expected element {path.replace('m:', '')}, "
                                  f"found none")
        try:
            return int(float(node.text))
        except ValueError:
            raise DataFormatError(f"{where}: {path.replace('m:', '')}: expected a number, "
                                  f"found {node.text!r}") from None

    sizes = {}
    for name, space in (("encoding_size", "encodedSpace"), ("recon_size", "reconSpace")):
        sizes[name] = tuple(number(f"m:encoding/m:{space}/m:matrixSize/m:{axis}")
                            for axis in "xyz")
    limits = "m:encoding/m:encodingLimits/m:kspace_encoding_step_1/m:"
    center = number(limits + "center")
    maximum = number(limits + "maximum")
    padding_left = sizes["encoding_size"][1] // 2 - center
    return {**sizes, "center": center, "maximum": maximum, "padding_left": padding_left,
            "padding_right": padding_left + maximum + 1}


def read_header(path: str | os.PathLike) -> dict:
    """:func:`parse_header` of the ``ismrmrd_header`` of a fastMRI file."""
    with open_h5(path) as f:
        raw = read_h5(path, f, "ismrmrd_header")
    return parse_header(raw, f"{path}: ismrmrd_header")


# ---------------------------------------------------------------------------------------------
# writer

def write_fastmri(path: str | os.PathLike, kspace: np.ndarray, target: np.ndarray | None = None,
                  *, recon_key: str | None = None, acquisition: str = "AXT1",
                  max_value: float | None = None, norm: float | None = None,
                  patient_id: str = "", encoding_size: Sequence[int] | None = None,
                  recon_size: Sequence[int] | None = None, mask: np.ndarray | None = None,
                  acceleration: float | None = None,
                  extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write one volume in fastMRI layout (see the module docstring) and return its path.

    ``kspace`` complex ``(S, H, W)`` or ``(S, C, H, W)`` in the centred layout; ``target``
    float ``(S, h, w)`` or None (test files: then ``mask`` ``(W,)`` and ``acceleration`` are
    expected). ``recon_key`` defaults to ``reconstruction_esc`` for 3-D and
    ``reconstruction_rss`` for 4-D k-space. ``max_value`` / ``norm`` default to the target's
    max and L2 norm. ``encoding_size`` defaults to (H, W, 1), ``recon_size`` to (h, w, 1)
    (else the encoding size); the header's phase-encode limits are ``center = W // 2``,
    ``maximum = W - 1``. Everything is checked before anything is written, and the file is
    written under a temporary name and renamed when complete.
    """
    where = f"write_fastmri({path})"
    kspace = np.asarray(kspace)
    if kspace.ndim not in (3, 4):
        raise DataFormatError(f"{where}: kspace: expected (S, H, W) or (S, C, H, W), found "
                              f"shape {kspace.shape}")
    if not np.iscomplexobj(kspace):
        raise DataFormatError(f"{where}: kspace: expected a complex array, found {kspace.dtype}")
    check_finite(kspace, f"{where}: kspace")
    n_slices, height, width = kspace.shape[0], kspace.shape[-2], kspace.shape[-1]
    if recon_key is None:
        recon_key = RECON_KEYS["singlecoil" if kspace.ndim == 3 else "multicoil"]
    if target is not None:
        target = np.asarray(target)
        if target.ndim != 3 or target.shape[0] != n_slices:
            raise DataFormatError(f"{where}: target: expected (S={n_slices}, h, w), found "
                                  f"shape {target.shape}")
        if np.iscomplexobj(target):
            raise DataFormatError(f"{where}: target: expected real values, found {target.dtype}")
        check_finite(target, f"{where}: target")
        target = target.astype(np.float32)
        max_value = float(target.max()) if max_value is None else max_value
        norm = float(np.linalg.norm(target)) if norm is None else norm
    if (mask is None) != (acceleration is None):
        raise DataFormatError(f"{where}: mask and acceleration: expected both or neither, found "
                              f"mask={'given' if mask is not None else None}, "
                              f"acceleration={acceleration}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (width,):
            raise DataFormatError(f"{where}: mask: expected shape ({width},), found {mask.shape}")
        if acceleration < 1:
            raise DataFormatError(f"{where}: acceleration: expected >= 1, found {acceleration}")
    extra = dict(extra or {})
    for name, array in extra.items():
        if name in _STANDARD_KEYS:
            raise DataFormatError(f"{where}: extra: '{name}' is a standard fastMRI key")
        if np.ndim(array) < 1 or np.shape(array)[0] != n_slices:
            raise DataFormatError(f"{where}: extra '{name}': expected first dimension "
                                  f"S={n_slices}, found shape {np.shape(array)}")
    encoding_size = tuple(encoding_size or (height, width, 1))
    if recon_size is None:
        recon_size = (target.shape[1], target.shape[2], 1) if target is not None else encoding_size
    header = _header_xml(encoding_size, recon_size, center=width // 2, maximum=width - 1)

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("kspace", data=kspace.astype(np.complex64))
        if target is not None:
            f.create_dataset(recon_key, data=target)
        f.create_dataset("ismrmrd_header", data=header)
        if mask is not None:
            f.create_dataset("mask", data=mask.astype(np.float32))
            f.attrs["acceleration"] = float(acceleration)
        for name, array in extra.items():
            f.create_dataset(name, data=np.asarray(array))
        if max_value is not None:
            f.attrs["max"] = float(max_value)
        if norm is not None:
            f.attrs["norm"] = float(norm)
        f.attrs["acquisition"] = acquisition
        f.attrs["patient_id"] = patient_id
    return Path(path)


# ---------------------------------------------------------------------------------------------
# dataset

def _attr_value(value):
    """h5py attrs as plain Python values (bytes -> str, numpy scalars -> int/float)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


class FastMRISliceDataset(VolumeSliceDataset):
    """Slices of fastMRI volumes, opened lazily in ``__getitem__`` (safe with DataLoader workers).

    Every file is checked when the index is built (it opens, has ``kspace`` with 3 dims for
    ``singlecoil`` / 4 for ``multicoil``, a reconstruction of shape ``(S, h, w)`` unless it is
    a test file with ``mask``); each item's k-space and target are checked for NaN/Inf when
    read. Items are dicts:

    - ``kspace``: complex64 ``[H, W]`` or ``[C, H, W]`` (centred layout)
    - ``target``: float32 ``[h, w]``, or None on test files
    - ``attrs``: the file's attrs, ``fname``, ``slice``, ``volume`` (number in ``volumes``),
      ``extra``: ``{name: tensor slice}``
    - only when the file has them: ``mask`` float32 ``[W]`` (test files) and ``header``
      (:func:`parse_header` dict), so that ``default_collate`` batches ordinary files.

    Memory per file is its name, slice count, key list and parsed header; per item one
    (volume, slice) pair. Items are read through at most ``max_open_files`` open handles.
    """

    def __init__(self, root_or_files: str | os.PathLike | Sequence[str | os.PathLike],
                 challenge: str = "singlecoil", slice_fraction: float = 1.0,
                 max_volumes: int = 0, max_open_files: int = MAX_OPEN_FILES):
        if challenge not in RECON_KEYS:
            raise ValueError(f"challenge: expected one of {sorted(RECON_KEYS)}, found "
                             f"{challenge!r}")
        self.challenge = challenge
        self.recon_key = RECON_KEYS[challenge]
        self.handles = H5Handles(max_open_files)
        files = list_files(root_or_files, "*.h5")
        if max_volumes:
            files = files[:max_volumes]
        self.files = files
        self.volumes = []
        self._index = []
        self._has_target: list[bool] = []
        self._extra_keys: list[list[str]] = []
        self.headers: list[dict | None] = []
        for number, fname in enumerate(files):
            n_slices, has_target, extra_keys, header = self._check_file(fname)
            self.headers.append(header)
            self.volumes.append((str(fname), n_slices))
            self._has_target.append(has_target)
            self._extra_keys.append(extra_keys)
            self._index += [(number, s) for s in central_slices(n_slices, slice_fraction)]

    def _check_file(self, fname: Path) -> tuple[int, bool, list[str], dict | None]:
        """(number of slices, has a reconstruction, extra keys, header) of a checked file."""
        ndim = KSPACE_NDIM[self.challenge]
        with open_h5(fname) as f:
            if "kspace" not in f:
                raise DataFormatError(f"{fname}: missing key 'kspace'; found keys "
                                      f"{sorted(f.keys())}")
            kspace = f["kspace"]
            if kspace.ndim != ndim:
                layout = "(S, H, W)" if ndim == 3 else "(S, C, H, W)"
                raise DataFormatError(f"{fname}: kspace: expected {ndim} dims {layout} for "
                                      f"{self.challenge}, found shape {kspace.shape}")
            if kspace.dtype.kind != "c":
                raise DataFormatError(f"{fname}: kspace: expected complex values, found "
                                      f"{kspace.dtype}")
            n_slices = kspace.shape[0]
            has_target = self.recon_key in f
            if has_target:
                shape = f[self.recon_key].shape
                if len(shape) != 3 or shape[0] != n_slices:
                    raise DataFormatError(f"{fname}: {self.recon_key}: expected (S={n_slices}, "
                                          f"h, w), found shape {shape}")
            elif "mask" not in f:
                raise DataFormatError(f"{fname}: missing key '{self.recon_key}' (and no 'mask', "
                                      f"so not a test file); found keys {sorted(f.keys())}")
            header = None
            if "ismrmrd_header" in f:
                header = parse_header(read_h5(fname, f, "ismrmrd_header"),
                                      f"{fname}: ismrmrd_header")
            extra = [k for k in f.keys() if k not in _STANDARD_KEYS
                     and isinstance(f[k], h5py.Dataset) and f[k].ndim >= 1
                     and f[k].shape[0] == n_slices]
        return n_slices, has_target, sorted(extra), header

    def __getitem__(self, i: int) -> dict:
        number, s = self._index[i]
        fname = self.volumes[number][0]
        f = self.handles.get(fname)
        kspace = read_h5(fname, f, "kspace", s)  # [H, W] or [C, H, W]
        check_finite(kspace, f"{fname}: kspace[{s}]")
        target = None
        if self._has_target[number]:
            target = read_h5(fname, f, self.recon_key, s)  # [h, w]
            check_finite(target, f"{fname}: {self.recon_key}[{s}]")
            target = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))
        optional = {}
        if "mask" in f:
            mask = read_h5(fname, f, "mask").astype(np.float32)  # [W]
            optional["mask"] = torch.from_numpy(mask)
        if self.headers[number] is not None:
            optional["header"] = self.headers[number]
        extra = {k: torch.from_numpy(np.ascontiguousarray(read_h5(fname, f, k, s)))
                 for k in self._extra_keys[number]}
        attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
        return {"kspace": torch.from_numpy(kspace.astype(np.complex64)), "target": target,
                "attrs": attrs, "fname": fname, "slice": s, "volume": number, "extra": extra,
                **optional}
