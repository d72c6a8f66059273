"""Precomputed teacher targets in HDF5 shards: fill once, read in every run and sweep trial.

Run::

    python -m kdhpc.teacher.cache CONFIG [key=value ...] [--force] [--verify]
    torchrun --nproc-per-node=4 -m kdhpc.teacher.cache CONFIG        # or srun, one task per GPU

The CLI (:mod:`kdhpc.teacher.cache.__main__`) asks the recipe for the teacher, its ``extract``
function and the training dataset of views (``Recipe.cache_parts``) and calls
:func:`fill_cache`, then :func:`verify_cache`; it prints "complete" only for a cache
that verified. ``--verify`` only checks: every shard's records (CRC-32) and files (SHA-256),
naming each bad or missing shard (exit 1). ``--force`` recomputes exactly the damaged rows or
shards, then verifies. A cache made for another teacher or data/view config is refused, never
deleted. Bad input (config, files, data) ends in one line on stderr and exit status 2.

Views are enumerated: sample i has views ``0 .. num_views-1`` (the dataset's pool: dihedral
id, mask seed, noise seed), and the cache holds one record per (index, view), so whatever view
training draws (:func:`kdhpc.train.epoch_plan`) has its target, computed on that exact input.

Layout of ``cache_dir``:

- ``manifest.json``: ``schema_version``, ``teacher_sha256`` (:func:`teacher_fingerprint`),
  ``data_config`` (the data and view config, :func:`cache_config`) and its ``data_digest``,
  ``num_samples``, ``num_views``, ``dtype``, ``compression``, ``world_size``. Written first; a
  fill or a read whose teacher or config differs is refused with what changed.
- ``shard-RRRRR-of-WWWWW.h5``, one per rank: rank r holds record ids ``[N r / W, N (r+1) / W)``
  of ``N = num_samples * num_views`` (record id = index * num_views + view). Datasets, one row
  per record: ``targets/<name>`` (stored dtype: float16, float32, or bfloat16 kept as its uint16
  bit pattern), ``index`` and ``view`` (int64), ``view_key`` (int64 [K], when the dataset has
  ``view_key(index, view)``), ``crc32`` (uint32 over the record's index, view, view key and
  target bytes) and ``written`` (uint8, set after the row is on disk).
- ``shard-RRRRR-of-WWWWW.json``: the finished shard's size, SHA-256 and target schema.
- ``index.json``: written when every shard is finished: the shards, their sizes and SHA-256.

Integrity: a reader checks each shard's size on open (truncation) and each record's CRC-32 on
read (any flipped byte in a record), and refuses a record it cannot read; it never returns
zeros for a damaged record. :func:`verify_cache` checks a whole cache without raising (a list
of :class:`CacheProblem`); ``fill_cache(..., force=True)`` repairs what it lists.

Resuming: a killed fill leaves ``*.h5.partial`` files; the next fill keeps the rows whose
``written`` flag is set, whose (index, view) is the expected one and whose CRC checks, and
computes the rest. A partial file HDF5 cannot
open any more (killed inside a metadata write) is started again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import default_collate

from kdhpc.config import (Config, ConfigError, describe_changes, digest, result_values,
                          sha256_file, write_atomic)
from kdhpc.teacher.stream import Extract, StreamTeacher

log = logging.getLogger("kdhpc.teacher.cache")

SCHEMA_VERSION = 1
MANIFEST, INDEX = "manifest.json", "index.json"
DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
COMPRESSION = {"none": None, "gzip": "gzip", "lzf": "lzf"}


class CacheError(RuntimeError):
    """A teacher cache that is stale, incomplete or damaged; the message says which and how."""


# ---------------------------------------------------------------------------------------------
# fingerprints and config comparison

def teacher_fingerprint(model_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 of the teacher's weights: every tensor of the state dict in key order, with its
    name, dtype and shape (the container file format does not matter)."""
    state = (model_or_state.state_dict() if isinstance(model_or_state, nn.Module)
             else model_or_state)
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_config(cfg: Config) -> dict:
    """The part of the config a teacher cache depends on: data, mask, degradation and views
    (worker count excluded: it does not change a single value; so are fields added since, while
    at their defaults: :func:`kdhpc.config.result_values`)."""
    data = result_values(cfg.data)
    return {"recipe": cfg.recipe, "data": data, "mask": dataclasses.asdict(cfg.mask),
            "degrade": dataclasses.asdict(cfg.degrade),
            "default_data": result_values(cfg.default_data)}


def default_cache_dir(cfg: Config) -> Path:
    """``teacher.cache_dir``, else ``<run_dir>/teacher_cache``."""
    return Path(cfg.teacher.cache_dir) if cfg.teacher.cache_dir else Path(cfg.run_dir) / "teacher_cache"


# ---------------------------------------------------------------------------------------------
# storage conversions

def to_storage(tensor: torch.Tensor, dtype: str, name: str) -> np.ndarray:
    """A float tensor as the stored numpy array; refuses values the dtype cannot hold."""
    if dtype == "bfloat16":
        stored = tensor.detach().to(torch.bfloat16).cpu()
        back = stored.float()
        array = stored.view(torch.int16).numpy().view(np.uint16)
    else:
        with np.errstate(over="ignore"):  # overflow is detected and reported just below
            array = tensor.detach().float().cpu().numpy().astype(DTYPES[dtype])
        back = torch.from_numpy(array.astype(np.float32))
    lost = torch.isfinite(tensor.detach().float().cpu()) & ~torch.isfinite(back)
    if bool(lost.any()):
        raise CacheError(f"teacher target '{name}': {int(lost.sum())} finite values overflow "
                         f"{dtype} (max |x| = {tensor.detach().abs().max().item():.4g}); use "
                         f"teacher.cache_dtype=float32 or bfloat16")
    return array


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`, as float32."""
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(array.astype(np.float32))


def record_crc(index: int, view: int, view_key: np.ndarray | None, rows: list[np.ndarray]) -> int:
    """CRC-32 of one record: index, view, view key and each target row (in key order)."""
    crc = zlib.crc32(np.array([index, view], dtype=np.int64).tobytes())
    if view_key is not None:
        crc = zlib.crc32(np.ascontiguousarray(view_key, dtype=np.int64).tobytes(), crc)
    for row in rows:
        crc = zlib.crc32(np.ascontiguousarray(row).tobytes(), crc)
    return crc


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.h5"



def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: cannot read (truncated or corrupted?): {err}") from None


def _refusal(path: Path, manifest: dict, wanted: dict) -> str | None:
    """What differs between a cache's manifest and what this run needs, or None."""
    problems = []
    if manifest.get("schema_version") != wanted["schema_version"]:
        problems.append(f"schema version {manifest.get('schema_version')} -> "
                        f"{wanted['schema_version']}")
    if wanted.get("teacher_sha256") and manifest.get("teacher_sha256") != wanted["teacher_sha256"]:
        problems.append(f"teacher weights changed (SHA-256 {manifest.get('teacher_sha256', '?')[:12]}"
                        f"... -> {wanted['teacher_sha256'][:12]}...)")
    if wanted.get("data_config") is not None:
        changes = describe_changes(manifest.get("data_config"), wanted["data_config"])
        if changes:
            problems.append("data/view config changed: " + "; ".join(changes))
    for key in ("num_samples", "num_views", "dtype", "compression", "world_size"):
        if key in wanted and manifest.get(key) != wanted[key]:
            problems.append(f"{key}: {manifest.get(key)!r} -> {wanted[key]!r}")
    if not problems:
        return None
    return f"{path}: teacher cache does not match this run: " + "; ".join(problems)


# ---------------------------------------------------------------------------------------------
# filling

class CacheParts(NamedTuple):
    """What the recipe layer hands the CLI: ``kdhpc.distill.teacher_cache_parts(cfg)``."""

    teacher: nn.Module
    extract: Extract
    dataset: Any  # a dataset of views (kdhpc.train.ViewDataset)


def _distributed() -> tuple[int, int] | None:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def _open_partial(path: Path, lo: int, n_records: int, num_views: int,
                  manifest_digest: str) -> tuple[h5py.File | None, np.ndarray]:
    """Reopen a partial shard; also return which of its rows are good (see :func:`_good_rows`).
    A file HDF5 cannot open, or one begun for another manifest, is deleted (start over)."""
    try:
        f = h5py.File(path, "r+")
    except OSError as err:
        log.warning("%s: cannot reopen (%s); recomputing this shard", path, err)
        path.unlink()
        return None, np.zeros(n_records, dtype=bool)
    if (f.attrs.get("manifest_digest") != manifest_digest or f.attrs.get("records") != n_records
            or f.attrs.get("first_record") != lo):
        f.close()
        path.unlink()
        return None, np.zeros(n_records, dtype=bool)
    try:
        return f, _good_rows(f, lo, n_records, num_views)
    except CacheError as err:
        log.warning("%s; recomputing this shard", err)
        f.close()
        path.unlink()
        return None, np.zeros(n_records, dtype=bool)


def _good_rows(f: h5py.File, lo: int, n: int, num_views: int, chunk: int = 256) -> np.ndarray:
    """Per row of a shard holding records ``[lo, lo + n)``: whether it is flagged written, holds
    the expected (index, view) and passes its CRC-32. Reads ``chunk`` rows at a time; raises
    CacheError when the shard's datasets cannot be read."""
    good = np.zeros(n, dtype=bool)
    if "targets" not in f or "written" not in f:
        return good
    try:
        names = sorted(f["targets"])
        written = f["written"][:].astype(bool)
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            index, view, crc = f["index"][rows], f["view"][rows], f["crc32"][rows]
            keys = f["view_key"][rows] if "view_key" in f else None
            targets = [f["targets"][name][rows] for name in names]
            for j in range(rows.stop - start):
                record = lo + start + j
                good[start + j] = bool(
                    written[start + j]
                    and (int(index[j]), int(view[j])) == divmod(record, num_views)
                    and record_crc(int(index[j]), int(view[j]),
                                   keys[j] if keys is not None else None,
                                   [t[j] for t in targets]) == int(crc[j]))
    except (OSError, KeyError, ValueError) as err:
        raise CacheError(f"{f.filename}: cannot read its records (corrupted shard?): "
                         f"{err}") from None
    return good


def _create_datasets(f: h5py.File, n: int, targets: dict[str, np.ndarray], dtype: str,
                     compression: str, key_len: int | None) -> None:
    comp = COMPRESSION[compression]
    group = f.create_group("targets")
    for name, array in targets.items():
        shape = (n, *array.shape[1:])
        chunks = (1, *array.shape[1:]) if comp else None
        ds = group.create_dataset(name, shape=shape, dtype=array.dtype, compression=comp,
                                  chunks=chunks)
        ds.attrs["kdhpc_dtype"] = dtype
    f.create_dataset("index", shape=(n,), dtype=np.int64)
    f.create_dataset("view", shape=(n,), dtype=np.int64)
    if key_len is not None:
        f.create_dataset("view_key", shape=(n, key_len), dtype=np.int64)
    f.create_dataset("crc32", shape=(n,), dtype=np.uint32)
    f.create_dataset("written", shape=(n,), dtype=np.uint8, fillvalue=0)
    f.flush()


def _schema(f: h5py.File) -> dict:
    return {name: {"shape": list(ds.shape[1:]), "dtype": ds.attrs["kdhpc_dtype"]}
            for name, ds in sorted(f["targets"].items())}


def fill_cache(cache_dir: str | os.PathLike, teacher: nn.Module, extract: Extract, dataset, *,
               data_config: dict, dtype: str = "float16", compression: str = "none",
               batch_size: int = 8, bf16: bool = False, device: torch.device | str | None = None,
               rank: int | None = None, world_size: int | None = None, force: bool = False,
               progress: bool = False, commit_seconds: float = 1.0,
               on_commit: Callable[[int], None] | None = None) -> Path:
    """Compute and store ``extract(teacher, batch)`` for every (index, view) of ``dataset``.

    Ranks: ``rank`` of ``world_size`` when given (sharding by hand: the call that finishes
    the last shard writes the index), else torch.distributed's when initialised (rank 0
    writes the manifest and the index, with barriers), else 0 of 1. Resumes a killed fill,
    keeping every row that is flagged written and passes its CRC-32.

    A cache made for another teacher or config (another manifest) is refused with what
    changed, ``force`` or not: this function never deletes one (remove the folder yourself or
    fill another ``teacher.cache_dir``). ``force`` verifies this rank's finished shard
    (:func:`verify_cache`'s checks) and recomputes exactly its damaged rows, or the whole shard
    when HDF5 cannot read it; an intact shard is left untouched.
    Finished rows are made durable every ``commit_seconds`` (a kill loses at most that much
    work); ``on_commit(records_done)`` is called after each commit (progress hooks, drills).
    Returns ``cache_dir``.
    """
    from kdhpc.train import ViewItems, check_view_dataset

    check_view_dataset(dataset, "fill_cache: dataset")
    if dtype not in DTYPES:
        raise ConfigError(f"teacher.cache_dtype: expected one of {sorted(DTYPES)}, found {dtype!r}")
    if compression not in COMPRESSION:
        raise ConfigError(f"teacher.compression: expected one of {sorted(COMPRESSION)}, found "
                          f"{compression!r}")
    # Explicit ranks (a caller sharding by hand) win; otherwise torch.distributed's, if any.
    dist_ranks = _distributed() if rank is None and world_size is None else None
    if dist_ranks is not None:
        rank, world_size = dist_ranks
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"fill_cache: expected 0 <= rank < world_size, found {rank}, {world_size}")
    barrier = dist.barrier if dist_ranks is not None else (lambda: None)
    cache_dir = Path(cache_dir)
    num_views, n_samples = dataset.num_views, len(dataset)
    manifest = {"schema_version": SCHEMA_VERSION, "teacher_sha256": teacher_fingerprint(teacher),
                "data_config": data_config, "data_digest": digest(data_config),
                "num_samples": n_samples, "num_views": num_views, "dtype": dtype,
                "compression": compression, "world_size": world_size}
    manifest_path = cache_dir / MANIFEST
    if rank == 0 or dist_ranks is None:
        if manifest_path.is_file():
            problem = _refusal(cache_dir, _read_json(manifest_path), manifest)
            if problem:
                raise CacheError(problem + f"; this cache is never overwritten: delete "
                                 f"{cache_dir} or set teacher.cache_dir to another folder")
        if not manifest_path.is_file():
            write_atomic(manifest_path, json.dumps(manifest, indent=1))
    barrier()
    problem = _refusal(cache_dir, _read_json(manifest_path), manifest)
    if problem:
        raise CacheError(problem)
    manifest_digest = digest(manifest)

    n_total = n_samples * num_views
    if n_total < world_size:
        raise ValueError(f"fill_cache: {n_total} records cannot fill {world_size} shards; "
                         f"use fewer ranks")
    lo, hi = n_total * rank // world_size, n_total * (rank + 1) // world_size
    n = hi - lo
    final = cache_dir / shard_name(rank, world_size)
    sidecar = final.with_suffix(".json")
    if force and final.is_file() and sidecar.is_file():
        damage = _shard_problems(cache_dir, manifest, rank)
        if damage:
            for item in damage:
                log.warning("%s; repairing", item)
            # Unfinished again until repaired: no reader trusts the index meanwhile, and the
            # fill below keeps the good rows of the reopened shard and recomputes the rest.
            (cache_dir / INDEX).unlink(missing_ok=True)
            sidecar.unlink()
            os.replace(final, final.with_name(final.name + ".partial"))
    if not (final.is_file() and sidecar.is_file()):
        opts = _FillOptions(dtype, compression, batch_size, bf16, device, progress,
                            commit_seconds, on_commit)
        _fill_shard(final, lo, n, manifest_digest, teacher, extract, ViewItems(dataset), opts)
    barrier()
    if rank == 0 or dist_ranks is None:
        _write_index(cache_dir, world_size)
    barrier()
    return cache_dir


@dataclasses.dataclass
class _FillOptions:
    dtype: str
    compression: str
    batch_size: int
    bf16: bool
    device: torch.device | str | None
    progress: bool
    commit_seconds: float
    on_commit: Callable[[int], None] | None


def _fill_shard(final: Path, lo: int, n: int, manifest_digest: str, teacher: nn.Module,
                extract: Extract, items, opts: _FillOptions) -> None:
    """Fill records ``[lo, lo + n)`` into ``final`` through ``final.partial``.

    Rows become durable in commits (at most every ``commit_seconds``): flush the data, then set
    the rows' ``written`` flags and flush again, so a kill loses at most one commit's work and
    never leaves a flagged row half-written.
    """
    num_views = items.dataset.num_views
    has_key = hasattr(items.dataset, "view_key")
    partial = final.with_name(final.name + ".partial")
    f, good = (_open_partial(partial, lo, n, num_views, manifest_digest) if partial.is_file()
               else (None, np.zeros(n, dtype=bool)))
    if f is None:
        f = h5py.File(partial, "w")
        f.attrs["manifest_digest"] = manifest_digest
        f.attrs["records"] = n
        f.attrs["first_record"] = lo
    todo = np.flatnonzero(~good)
    if good.any():
        log.info("%s: keeping %d verified records, computing %d", partial, n - len(todo),
                 len(todo))
    device = opts.device or (torch.device("cuda", torch.cuda.current_device())
                             if torch.cuda.is_available() else torch.device("cpu"))
    source = StreamTeacher(teacher, extract, bf16=opts.bf16)
    from kdhpc.train import ProgressReport

    report = ProgressReport(final.name, total=n, initial=n - len(todo), unit="records",
                            enabled=opts.progress)
    done, pending, last_commit = n - len(todo), [], time.perf_counter()

    def commit() -> None:
        nonlocal done, pending, last_commit
        f.flush()
        if pending:
            f["written"][_selection(pending)] = 1
        f.flush()
        done += len(pending)
        report.update(len(pending))
        pending, last_commit = [], time.perf_counter()
        if opts.on_commit is not None:
            opts.on_commit(done)

    try:
        with f:
            for start in range(0, len(todo), opts.batch_size):
                batch_rows = [int(r) for r in todo[start:start + opts.batch_size]]
                keys = [divmod(lo + r, num_views) for r in batch_rows]
                batch = default_collate([items[k] for k in keys])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                         for k, v in batch.items()}
                stored = {name: to_storage(t, opts.dtype, name)
                          for name, t in sorted(source.targets(batch).items())}
                view_keys = (np.array([list(items.dataset.view_key(i, v)) for i, v in keys],
                                      dtype=np.int64) if has_key else None)
                if "targets" not in f:
                    _create_datasets(f, n, stored, opts.dtype, opts.compression,
                                     view_keys.shape[1] if has_key else None)
                elif sorted(f["targets"]) != sorted(stored):
                    raise CacheError(f"{partial}: extract returned {sorted(stored)}, the shard "
                                     f"holds {sorted(f['targets'])}")
                rows = _selection(batch_rows)
                for name, array in stored.items():
                    f["targets"][name][rows] = array
                index = np.array([k[0] for k in keys], dtype=np.int64)
                view = np.array([k[1] for k in keys], dtype=np.int64)
                f["index"][rows], f["view"][rows] = index, view
                if has_key:
                    f["view_key"][rows] = view_keys
                f["crc32"][rows] = np.array(
                    [record_crc(int(index[j]), int(view[j]), view_keys[j] if has_key else None,
                                [stored[name][j] for name in stored]) for j in range(len(keys))],
                    dtype=np.uint32)
                pending += batch_rows
                if time.perf_counter() - last_commit >= opts.commit_seconds:
                    commit()
            commit()
            schema = _schema(f)
    finally:
        report.close()
    info = {"file": final.name, "records": n, "first_record": lo, "size": partial.stat().st_size,
            "sha256": sha256_file(partial), "schema": schema}
    write_atomic(final.with_suffix(".json"), json.dumps(info, indent=1))
    os.replace(partial, final)


def _selection(rows: list[int]) -> slice | list[int]:
    """An h5py row selection: a slice for consecutive rows, else the (increasing) list."""
    if rows and rows[-1] - rows[0] == len(rows) - 1:
        return slice(rows[0], rows[-1] + 1)
    return rows


def _write_index(cache_dir: Path, world_size: int) -> None:
    """Write index.json once every shard's sidecar exists (else leave the cache incomplete)."""
    shards = []
    for r in range(world_size):
        final = cache_dir / shard_name(r, world_size)
        sidecar = final.with_suffix(".json")
        if not (final.is_file() and sidecar.is_file()):
            return
        shards.append(_read_json(sidecar))
    schemas = {json.dumps(s["schema"], sort_keys=True) for s in shards}
    if len(schemas) != 1:
        raise CacheError(f"{cache_dir}: shards disagree on the stored targets: "
                         f"{[s['schema'] for s in shards]}")
    text = json.dumps({"shards": shards, "schema": shards[0]["schema"]}, indent=1)
    index = cache_dir / INDEX
    if not (index.is_file() and index.read_text() == text):  # an intact cache stays untouched
        write_atomic(index, text)


# ---------------------------------------------------------------------------------------------
# verification

@dataclasses.dataclass(frozen=True)
class CacheProblem:
    """One thing wrong with a teacher cache: the file, what, and the damaged rows (if known)."""

    path: Path
    what: str
    rows: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def _describe_rows(f: h5py.File, rows: np.ndarray, lo: int, num_views: int) -> str:
    shown = ", ".join(f"{int(r)} (index={(lo + int(r)) // num_views}, view="
                      f"{(lo + int(r)) % num_views})" for r in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more} of {f.attrs.get('records')}"


def _shard_problems(cache_dir: Path, manifest: dict, rank: int) -> list[CacheProblem]:
    """What is wrong with shard ``rank`` of a cache (empty: intact): missing or unfinished,
    unreadable, rows that are unwritten, hold the wrong record or fail their CRC-32, or a
    size / SHA-256 that differs from its sidecar (and from ``index.json`` when present)."""
    world, num_views = manifest["world_size"], manifest["num_views"]
    n_total = manifest["num_samples"] * num_views
    lo, hi = n_total * rank // world, n_total * (rank + 1) // world
    final = cache_dir / shard_name(rank, world)
    sidecar = final.with_suffix(".json")
    if not final.is_file():
        return [CacheProblem(final, "missing")]
    if not sidecar.is_file():
        return [CacheProblem(final, f"unfinished (no {sidecar.name})")]
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [CacheProblem(sidecar, f"cannot read: {err}")]
    listed = [info]
    if (cache_dir / INDEX).is_file():
        try:
            index = json.loads((cache_dir / INDEX).read_text())
            listed += [s for s in index["shards"] if s.get("file") == final.name]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            return [CacheProblem(cache_dir / INDEX, f"cannot read: {err}")]
    size, sha = final.stat().st_size, sha256_file(final)
    hash_differs = any(entry.get("size") != size or entry.get("sha256") != sha for entry in listed)
    try:
        with h5py.File(final, "r") as f:
            if f.attrs.get("records") != hi - lo or f.attrs.get("first_record") != lo:
                return [CacheProblem(final, f"holds records from {f.attrs.get('first_record')} "
                                     f"({f.attrs.get('records')}), expected {lo} ({hi - lo})")]
            bad = np.flatnonzero(~_good_rows(f, lo, hi - lo, num_views))
            if len(bad):
                return [CacheProblem(final, f"{_describe_rows(f, bad, lo, num_views)} unwritten, "
                                     f"misplaced or failing their CRC-32 check",
                                     tuple(int(r) for r in bad))]
    except OSError as err:
        return [CacheProblem(final, f"cannot open as HDF5 (corrupted): {err}")]
    except CacheError as err:
        return [CacheProblem(final, str(err).split(": ", 1)[1])]
    if hash_differs:
        return [CacheProblem(final, "size or SHA-256 differs from the index, though every "
                             "record passes its CRC-32 (HDF5 metadata changed)")]
    return []


def verify_cache(cache_dir: str | os.PathLike, *, teacher_sha256: str | None = None,
                 data_config: dict | None = None) -> list[CacheProblem]:
    """Every problem of the cache in ``cache_dir``; an empty list means it can be trusted.

    Reads the manifest (and, when given, checks it was made for ``teacher_sha256`` and
    ``data_config``), then every shard the manifest implies: present and finished, readable,
    each row flagged written, holding its expected (index, view) and passing its CRC-32, and
    the file's size and SHA-256 equal to those recorded when it was finished. Never raises for
    a damaged cache; repair one with ``fill_cache(..., force=True)`` (the CLI's ``--force``).
    """
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        return [CacheProblem(manifest_path, "missing: no teacher cache here; fill it with "
                             "python -m kdhpc.teacher.cache CONFIG")]
    try:
        manifest = json.loads(manifest_path.read_text())
        world = int(manifest["world_size"])
        int(manifest["num_samples"]), int(manifest["num_views"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        return [CacheProblem(manifest_path, f"cannot read (truncated or corrupted?): {err}")]
    problem = _refusal(cache_dir, manifest, {"schema_version": SCHEMA_VERSION,
                                            "teacher_sha256": teacher_sha256,
                                            "data_config": data_config})
    if problem:
        return [CacheProblem(manifest_path, problem.split(": ", 1)[1])]
    problems = [p for rank in range(world) for p in _shard_problems(cache_dir, manifest, rank)]
    if not problems and not (cache_dir / INDEX).is_file():
        problems.append(CacheProblem(cache_dir / INDEX, "missing (every shard is finished; "
                                     "rerun the fill to write it)"))
    return problems


# ---------------------------------------------------------------------------------------------
# reading

class CachedTeacher:
    """Teacher targets read from a filled cache: ``targets(batch) -> dict[str, Tensor]``.

    ``teacher_sha256`` and ``data_config``, when given, must match the manifest (else a
    :class:`CacheError` saying what changed). Targets come back as float32 on the batch's
    device, keyed by the batch's ``index`` and ``view``; a batch ``view_key`` [B, K], when
    present, must equal the stored one.
    """

    def __init__(self, cache_dir: str | os.PathLike, teacher_sha256: str | None = None,
                 data_config: dict | None = None):
        self.cache_dir = Path(cache_dir)
        manifest_path = self.cache_dir / MANIFEST
        if not manifest_path.is_file():
            raise CacheError(f"{self.cache_dir}: no teacher cache here ({MANIFEST} missing); fill "
                             f"it with python -m kdhpc.teacher.cache CONFIG")
        self.manifest = _read_json(manifest_path)
        problem = _refusal(self.cache_dir, self.manifest,
                           {"schema_version": SCHEMA_VERSION, "teacher_sha256": teacher_sha256,
                            "data_config": data_config})
        if problem:
            raise CacheError(problem + "; refill the cache (python -m kdhpc.teacher.cache "
                             "CONFIG --force) or point teacher.cache_dir elsewhere")
        index_path = self.cache_dir / INDEX
        if not index_path.is_file():
            world = self.manifest["world_size"]
            done = sum((self.cache_dir / shard_name(r, world)).with_suffix(".json").is_file()
                       for r in range(world))
            raise CacheError(f"{self.cache_dir}: incomplete teacher cache ({done} of {world} "
                             f"shards finished); finish it with python -m kdhpc.teacher.cache "
                             f"CONFIG on {world} rank(s)")
        self.index = _read_json(index_path)
        self.dtype = self.manifest["dtype"]
        self.num_views = self.manifest["num_views"]
        self.num_samples = self.manifest["num_samples"]
        self.names = sorted(self.index["schema"])
        for shard in self.index["shards"]:
            path = self.cache_dir / shard["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["size"]:
                raise CacheError(f"{path}: expected {shard['size']} bytes, found "
                                 f"{'no file' if size is None else size} (truncated or replaced "
                                 f"shard); refill the cache")
        self._files: dict[int, h5py.File] = {}
        self._arrays: dict[int, dict[str, Any]] = {}
        self._pid = os.getpid()
        # Keys, view keys and CRCs of every record stay in memory (a few bytes per record).
        self._meta = [{key: self._read(s, key) for key in ("index", "view", "crc32", "view_key")
                       if key in self._file(s)} for s in range(len(self.index["shards"]))]
        self._build_lookup()

    def _path(self, shard: int) -> Path:
        return self.cache_dir / self.index["shards"][shard]["file"]

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # h5py handles must not cross a fork
            self._files, self._arrays, self._pid = {}, {}, os.getpid()
        if shard not in self._files:
            try:
                self._files[shard] = h5py.File(self._path(shard), "r")
            except OSError as err:
                raise CacheError(f"{self._path(shard)}: cannot open as HDF5 (corrupted shard?): "
                                 f"{err}; refill the cache") from None
        return self._files[shard]

    def _read(self, shard: int, key: str) -> np.ndarray:
        try:
            return self._file(shard)[key][()]
        except (OSError, KeyError, ValueError) as err:
            raise CacheError(f"{self._path(shard)}: cannot read '{key}' (corrupted shard?): "
                             f"{err}") from None

    def _targets_of(self, shard: int) -> dict[str, Any]:
        """Each target's rows: a read-only memory map of an uncompressed (contiguous) dataset,
        which HDF5 would otherwise read through a costly selection per call, else the dataset."""
        f = self._file(shard)
        if shard not in self._arrays:
            arrays = {}
            for name in self.names:
                ds = f[f"targets/{name}"]
                offset = ds.id.get_offset() if ds.chunks is None else None
                arrays[name] = (np.memmap(self._path(shard), dtype=ds.dtype, mode="r",
                                          offset=offset, shape=ds.shape)
                                if offset is not None else ds)
            self._arrays[shard] = arrays
        return self._arrays[shard]

    def _build_lookup(self) -> None:
        n_total = self.num_samples * self.num_views
        self._shard = np.full(n_total, -1, dtype=np.int64)
        self._row = np.full(n_total, -1, dtype=np.int64)
        for s, shard in enumerate(self.index["shards"]):
            index, view = self._meta[s]["index"], self._meta[s]["view"]
            ids = index * self.num_views + view
            bad = (index < 0) | (index >= self.num_samples) | (view < 0) | (view >= self.num_views)
            if bad.any() or len(ids) != shard["records"] or (self._shard[ids] >= 0).any():
                raise CacheError(f"{self._path(s)}: record keys out of range or repeated "
                                 f"(corrupted shard?); refill the cache")
            self._shard[ids] = s
            self._row[ids] = np.arange(len(ids))
        if (self._shard < 0).any():
            missing = int((self._shard < 0).sum())
            raise CacheError(f"{self.cache_dir}: {missing} of {n_total} (index, view) records "
                             f"missing; refill the cache")

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        index = batch["index"].detach().cpu().numpy().astype(np.int64)
        view = batch["view"].detach().cpu().numpy().astype(np.int64)
        out_of_range = (index < 0) | (index >= self.num_samples) | (view < 0) | (view >= self.num_views)
        if out_of_range.any():
            j = int(np.argmax(out_of_range))
            raise CacheError(f"{self.cache_dir}: no record for (index={index[j]}, view={view[j]}); "
                             f"the cache holds indices 0..{self.num_samples - 1} x views "
                             f"0..{self.num_views - 1}")
        ids = index * self.num_views + view
        shards, rows = self._shard[ids], self._row[ids]
        batch_keys = batch["view_key"].detach().cpu().numpy() if "view_key" in batch else None
        out = {name: [None] * len(ids) for name in self.names}
        for s in np.unique(shards):
            mine = np.flatnonzero(shards == s)
            wanted, inverse = np.unique(rows[mine], return_inverse=True)  # h5py wants increasing
            meta = self._meta[s]
            keys = meta["view_key"][wanted] if "view_key" in meta else None
            try:
                stored = {name: np.asarray(array[wanted])
                          for name, array in self._targets_of(s).items()}
            except (OSError, ValueError) as err:
                raise CacheError(f"{self._path(s)}: cannot read targets (corrupted shard?): "
                                 f"{err}") from None
            for j, row in enumerate(wanted):
                got_index, got_view = int(meta["index"][row]), int(meta["view"][row])
                crc = record_crc(got_index, got_view, keys[j] if keys is not None else None,
                                 [stored[name][j] for name in self.names])
                if crc != int(meta["crc32"][row]):
                    raise CacheError(f"{self._path(s)}: record {row} (index={got_index}, view="
                                     f"{got_view}) fails its CRC-32 check (corrupted shard); "
                                     f"refill the cache")
            for k, b in enumerate(mine):
                j = inverse[k]
                if keys is not None and batch_keys is not None and not np.array_equal(
                        batch_keys[b].astype(np.int64), keys[j]):
                    raise CacheError(f"{self.cache_dir}: (index={index[b]}, view={view[b]}): "
                                     f"batch view_key {batch_keys[b].tolist()} differs from the "
                                     f"cached {keys[j].tolist()}; the data/view code changed "
                                     f"since the cache was filled")
                for name in self.names:
                    out[name][b] = stored[name][j]
        device = batch["index"].device
        return {name: from_storage(np.stack(rows_), self.dtype).to(device)
                for name, rows_ in out.items()}

    def verify(self) -> list[str]:
        """:func:`verify_cache` of this cache, as one line per problem (empty: intact)."""
        return [str(p) for p in verify_cache(self.cache_dir)]

    def close(self) -> None:
        self._arrays = {}
        for f in self._files.values():
            f.close()
        self._files = {}
