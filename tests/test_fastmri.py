"""fastMRI HDF5: writer/reader round trips, ISMRMRD header, rank sharding, bad input."""

import gc
import os
import pickle
import shutil
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
from torch.utils.data import DataLoader

from kdhpc.data.fastmri import (DataFormatError, FastMRISliceDataset, H5Handles, read_header,
                                write_fastmri)

NS = {"m": "http://www.ismrm.org/ISMRMRD"}


def random_volume(rng, shape, target_shape=None):
    kspace = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    target = None if target_shape is None else rng.random(target_shape).astype(np.float32)
    return kspace, target


def test_singlecoil_round_trip_with_header_attrs_and_extra(tmp_path):
    rng = np.random.default_rng(0)
    kspace, target = random_volume(rng, (4, 20, 14), (4, 8, 8))
    tissue = rng.integers(0, 4, (4, 8, 8)).astype(np.uint8)
    path = write_fastmri(tmp_path / "vol.h5", kspace, target, acquisition="CORPD_FBK",
                         patient_id="p7", encoding_size=(40, 14, 1), extra={"tissue": tissue})
    assert sorted(os.listdir(tmp_path)) == ["vol.h5"]
    with h5py.File(path) as f:  # the raw layout, read independently of the dataset
        assert set(f.keys()) == {"kspace", "reconstruction_esc", "ismrmrd_header", "tissue"}
        assert f.attrs["max"] == pytest.approx(target.max())
        assert f.attrs["norm"] == pytest.approx(np.sqrt((target.astype(np.float64) ** 2).sum()))
        root = ET.fromstring(f["ismrmrd_header"][()])
    enc = [int(root.find(f"m:encoding/m:encodedSpace/m:matrixSize/m:{a}", NS).text) for a in "xyz"]
    rec = [int(root.find(f"m:encoding/m:reconSpace/m:matrixSize/m:{a}", NS).text) for a in "xyz"]
    assert enc == [40, 14, 1] and rec == [8, 8, 1]
    header = read_header(path)
    assert header["encoding_size"] == (40, 14, 1) and header["recon_size"] == (8, 8, 1)
    assert header["center"] == 7 and header["maximum"] == 13
    assert (header["padding_left"], header["padding_right"]) == (0, 14)

    ds = FastMRISliceDataset(tmp_path)
    assert len(ds) == 4 and ds.volumes == [(str(path), 4)]
    for s in range(4):
        item = ds[s]
        assert np.array_equal(item["kspace"].numpy(), kspace[s])
        assert np.array_equal(item["target"].numpy(), target[s])
        assert np.array_equal(item["extra"]["tissue"].numpy(), tissue[s])
        assert item["slice"] == s and item["fname"] == str(path) and "mask" not in item
    assert item["attrs"]["acquisition"] == "CORPD_FBK" and item["attrs"]["patient_id"] == "p7"
    assert item["header"] == header
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert np.array_equal(batch["kspace"].numpy(), kspace[:3])
    assert np.array_equal(batch["extra"]["tissue"].numpy(), tissue[:3])
    # Open handles stay behind in a pickle, so the dataset travels into DataLoader workers.
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[2]["kspace"].numpy(), kspace[2])


def test_multicoil_round_trip_and_test_file(tmp_path):
    rng = np.random.default_rng(1)
    kspace, rss = random_volume(rng, (2, 3, 10, 8), (2, 6, 6))
    write_fastmri(tmp_path / "train" / "mc.h5", kspace, rss)
    ds = FastMRISliceDataset(tmp_path / "train", challenge="multicoil")
    assert np.array_equal(ds[1]["kspace"].numpy(), kspace[1])
    assert np.array_equal(ds[1]["target"].numpy(), rss[1])
    with h5py.File(tmp_path / "train" / "mc.h5") as f:
        assert "reconstruction_rss" in f

    test_k, _ = random_volume(rng, (3, 3, 10, 8))
    mask = np.array([0, 1, 0, 1, 1, 1, 0, 0], np.float32)
    write_fastmri(tmp_path / "test" / "t.h5", test_k * mask, mask=mask, acceleration=4)
    item = FastMRISliceDataset(tmp_path / "test", challenge="multicoil")[0]
    assert item["target"] is None
    assert np.array_equal(item["mask"].numpy(), mask)
    assert item["attrs"]["acceleration"] == 4.0
    assert np.array_equal(item["kspace"].numpy(), test_k[0] * mask)


def test_reads_a_header_written_by_another_tool(tmp_path):
    """A fastMRI-style header with extra elements, limits off-centre, fields in another order."""
    xml = b"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <studyInformation><studyTime>10:00:00</studyTime></studyInformation>
  <encoding>
    <trajectory>cartesian</trajectory>
    <encodingLimits>
      <kspace_encoding_step_0><minimum>0</minimum><maximum>639</maximum><center>320</center>
      </kspace_encoding_step_0>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>355</maximum><center>177</center>
      </kspace_encoding_step_1>
    </encodingLimits>
    <reconSpace><matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>140</x><y>140</y><z>3</z></fieldOfView_mm></reconSpace>
    <encodedSpace><matrixSize><x>640</x><y>368</y><z>1</z></matrixSize></encodedSpace>
  </encoding>
</ismrmrdHeader>"""
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["ismrmrd_header"] = xml
        f["kspace"] = np.ones((1, 4, 4), np.complex64)
        f["reconstruction_esc"] = np.ones((1, 4, 4), np.float32)
    header = read_header(tmp_path / "other.h5")
    assert header["encoding_size"] == (640, 368, 1) and header["recon_size"] == (320, 320, 1)
    assert header["center"] == 177 and header["maximum"] == 355
    assert header["padding_left"] == 368 // 2 - 177
    assert header["padding_right"] == header["padding_left"] + 356


def test_slice_fraction_max_volumes_and_rank_sharding(tmp_path):
    rng = np.random.default_rng(2)
    sizes = [5, 3, 8, 2, 6]
    for i, n in enumerate(sizes):
        kspace, target = random_volume(rng, (n, 6, 6), (n, 4, 4))
        write_fastmri(tmp_path / f"v{i}.h5", kspace, target)
    ds = FastMRISliceDataset(tmp_path, slice_fraction=0.5, max_volumes=4)
    expected = []
    for v, n in enumerate(sizes[:4]):
        keep = max(1, round(n * 0.5))
        expected += [(v, s) for s in range((n - keep) // 2, (n - keep) // 2 + keep)]
    assert [(ds[i]["volume"], ds[i]["slice"]) for i in range(len(ds))] == expected

    full = FastMRISliceDataset(tmp_path)
    shards = [full.rank_indices(r, 3) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(len(full)))
    for shard in shards:
        for volume in {full._index[i][0] for i in shard}:
            assert set(full.volume_indices(volume)) <= set(shard)
    loads = [len(s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes)
    with pytest.raises(ValueError, match="rank"):
        full.rank_indices(3, 3)


def test_bad_files_name_file_and_key(tmp_path):
    rng = np.random.default_rng(3)
    kspace, target = random_volume(rng, (2, 6, 6), (2, 4, 4))
    with h5py.File(tmp_path / "nokspace.h5", "w") as f:
        f["reconstruction_esc"] = target
    with pytest.raises(DataFormatError, match=r"nokspace.h5: missing key 'kspace'"):
        FastMRISliceDataset(tmp_path / "nokspace.h5")

    good = write_fastmri(tmp_path / "good.h5", kspace, target)
    with pytest.raises(DataFormatError, match=r"good.h5: kspace: expected 4 dims .* found shape "
                                              r"\(2, 6, 6\)"):
        FastMRISliceDataset(good, challenge="multicoil")
    with h5py.File(tmp_path / "norecon.h5", "w") as f:
        f["kspace"] = kspace
    with pytest.raises(DataFormatError, match="norecon.h5: missing key 'reconstruction_esc'"):
        FastMRISliceDataset(tmp_path / "norecon.h5")

    shutil.copy(good, tmp_path / "nan.h5")
    with h5py.File(tmp_path / "nan.h5", "a") as f:
        f["kspace"][1, 2, 3] = np.nan + 0j
    ds = FastMRISliceDataset(tmp_path / "nan.h5")
    assert np.array_equal(ds[0]["kspace"].numpy(), kspace[0])
    with pytest.raises(DataFormatError, match=r"nan.h5: kspace\[1\]: expected finite values, "
                                              r"found 1 NaN/Inf"):
        ds[1]

    data = good.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="cut.h5: cannot open as HDF5"):
        FastMRISliceDataset(tmp_path / "cut.h5")
    with pytest.raises(DataFormatError, match="cut.h5: cannot open as HDF5"):
        read_header(tmp_path / "cut.h5")


def test_writer_checks_first_and_leaves_nothing_half(tmp_path):
    rng = np.random.default_rng(4)
    kspace, target = random_volume(rng, (2, 6, 6), (2, 4, 4))
    out = tmp_path / "out"
    bad_k = kspace.copy()
    bad_k[0, 0, 0] = np.inf
    with pytest.raises(DataFormatError, match=r"kspace: expected finite values"):
        write_fastmri(out / "inf.h5", bad_k, target)
    with pytest.raises(DataFormatError, match=r"target: expected \(S=2, h, w\), found shape "
                                              r"\(3, 4, 4\)"):
        write_fastmri(out / "shape.h5", kspace, np.zeros((3, 4, 4)))
    with pytest.raises(DataFormatError, match=r"kspace: expected \(S, H, W\)"):
        write_fastmri(out / "dims.h5", kspace[0], target)
    with pytest.raises(DataFormatError, match="mask and acceleration"):
        write_fastmri(out / "mask.h5", kspace, mask=np.ones(6))
    # A failure while writing (h5py cannot store object arrays) removes the temporary file.
    with pytest.raises(TypeError):
        write_fastmri(out / "late.h5", kspace, target,
                      extra={"notes": np.array([{}, {}], dtype=object)})
    assert not out.exists() or os.listdir(out) == []
    # An existing file is replaced whole.
    write_fastmri(out / "v.h5", kspace, target)
    write_fastmri(out / "v.h5", kspace * 2, target)
    assert np.array_equal(FastMRISliceDataset(out)[1]["kspace"].numpy(), kspace[1] * 2)
    assert os.listdir(out) == ["v.h5"]


def open_h5_files() -> int:
    """HDF5 files this process has open, as the HDF5 library counts them."""
    return len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE))


def open_descriptors(folder: Path) -> int:
    """File descriptors of this process open on files in ``folder`` (other threads of a long
    test session, sockets and logs, do not count)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
        except OSError:  # closed while listing
            pass
    return count


def test_thousands_of_files_bounded_handles_and_memory(tmp_path):
    n_files, n_slices, max_open = 2000, 2, 8
    rng = np.random.default_rng(9)
    kspace, target = random_volume(rng, (n_slices, 8, 8), (n_slices, 8, 8))
    for v in range(n_files):  # the same tiny single-coil volume, scaled so each file differs
        write_fastmri(tmp_path / f"v{v:04d}.h5", kspace * (v + 1), target * (v + 1))
    gc.collect()
    files_before, fds_before = open_h5_files(), open_descriptors(tmp_path)
    ds = FastMRISliceDataset(tmp_path, max_open_files=max_open)
    assert len(ds) == n_files * n_slices
    assert open_h5_files() == files_before  # building the index leaves nothing open
    metadata = len(pickle.dumps(ds))
    assert metadata < 1000 * n_files  # names, slice counts and headers: under 1 kB a file

    tracemalloc.start()
    peak_files = peak_fds = 0
    try:
        ds[0]
        ds[n_files * n_slices - 1]
        gc.collect()
        held_first = tracemalloc.get_traced_memory()[0]
        for i in range(len(ds)):
            item = ds[i]
            v, s = divmod(i, n_slices)
            assert item["slice"] == s and item["target"][0, 0] == target[s, 0, 0] * (v + 1)
            peak_files = max(peak_files, open_h5_files() - files_before)
            peak_fds = max(peak_fds, open_descriptors(tmp_path) - fds_before)
        del item
        gc.collect()
        held_after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert 1 <= peak_files <= max_open and len(ds.handles) == max_open
    assert peak_fds <= max_open
    # Reading 4,000 items from 2,000 files keeps nothing per file: Python memory held by the
    # dataset grows by less than 200 bytes a file (a cached array would be 256+ bytes each).
    assert held_after - held_first < 200 * n_files, held_after - held_first
    assert len(pickle.dumps(ds)) == metadata
    ds.close()
    assert open_h5_files() == files_before and len(ds.handles) == 0


def test_handle_cache_evicts_least_recently_used_and_survives_pickle(tmp_path):
    rng = np.random.default_rng(10)
    paths = [write_fastmri(tmp_path / f"{c}.h5", *random_volume(rng, (1, 4, 4), (1, 4, 4)))
             for c in "abc"]
    handles = H5Handles(2)
    a, b = handles.get(paths[0]), handles.get(paths[1])
    assert handles.get(paths[0]) is a  # a used again: b is now the least recent
    handles.get(paths[2])
    assert a.id.valid and not b.id.valid and len(handles) == 2
    clone = pickle.loads(pickle.dumps(handles))
    assert clone.max_open == 2 and len(clone) == 0
    handles.close()
    assert not a.id.valid and len(handles) == 0
    with pytest.raises(ValueError, match="max_open_files: expected an integer >= 1, found 0"):
        H5Handles(0)
    with pytest.raises(DataFormatError, match="missing.h5: file not found"):
        H5Handles().get(tmp_path / "missing.h5")
