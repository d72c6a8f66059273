"""benchmarks/scaling.py at its smallest size: every curve runs, its rows hold values checked
against independent counts, and the sizing model writes docs from them; plus the streamed
DC-CNN teacher regression the benchmark found."""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kdhpc.data.kdmri import KDMRISliceDataset, write_kdmri
from kdhpc.models import build_model

REPO = Path(__file__).resolve().parent.parent


def test_student_trains_on_the_batch_a_streamed_dccnn_teacher_just_saw():
    # A streamed teacher runs under inference mode on the very k0 / mask tensors the student
    # trains on next; the data-consistency k0-term cache must not hand the student an
    # inference tensor (it could not be saved for backward) and must not change its gradient.
    torch.manual_seed(0)
    teacher, student = build_model("dccnn_teacher").eval(), build_model("dccnn_student")
    x = torch.randn(2, 1, 16, 16)
    k0 = torch.randn(2, 1, 16, 16, dtype=torch.complex64)
    mask = (torch.rand(1, 1, 1, 16) > 0.5).float()
    student(x, k0.clone(), mask.clone()).square().sum().backward()
    expected = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    with torch.inference_mode():
        teacher(x, k0, mask)
    student(x, k0, mask).square().sum().backward()
    for got, want in zip((p.grad for p in student.parameters()), expected):
        torch.testing.assert_close(got, want)


def test_kdmri_one_file_per_slice_reads_through_a_bounded_set_of_handles(tmp_path):
    # KD-MRI's knee layout is one file per slice: every item is another file.
    rng = np.random.default_rng(0)
    volumes = []
    for v in range(12):
        volfs = rng.random((6, 4, 1)).astype(np.float32)
        kspace = np.fft.fft2(volfs, axes=(0, 1), norm="ortho")
        write_kdmri(tmp_path / f"s{v:02d}.h5", volfs, {4: (np.abs(volfs), kspace)})
        volumes.append(volfs)
    ds = KDMRISliceDataset(tmp_path, 4, max_open_files=3)
    before = len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE))
    for round_ in range(2):
        for i in range(len(ds)):
            assert np.array_equal(ds[i]["target"].numpy(), volumes[i][:, :, 0])
            assert len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)) - before <= 3
    assert len(ds.handles) == 3
    ds.close()
    assert len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)) == before


@pytest.fixture(scope="module")
def smallest_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    env = dict(os.environ, KDHPC_RESULTS=str(results), PYTHONPATH=str(REPO),
               DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "benchmarks/scaling.py", "--smallest"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (results / "scaling.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return results, rows, env


def value(rows, curve, quantity, **keys):
    found = [r for r in rows if r["curve"] == curve and r["quantity"] == quantity
             and all(r[k] == str(v) for k, v in keys.items())]
    assert len(found) == 1, (curve, quantity, keys, len(found))
    return float(found[0]["best"])


def test_smallest_run_rows_match_independent_counts(smallest_run):
    results, rows, _ = smallest_run
    size = 32
    assert {r["curve"] for r in rows} == {"throughput", "cache", "cache_io", "ranks", "unit"}
    for io_size in (32, 64):
        assert value(rows, "cache_io", "record_bytes", size=io_size) == 2 * 6 * io_size**2
        assert value(rows, "cache_io", "read_MB_per_s", size=io_size) > 0
    assert all(float(r["load_1m"]) >= 0 and r["commit"] and r["date"] for r in rows)
    # Cache targets: DC-CNN output + one attention map per cascade (5); EDSR pair: output;
    # U-Net: 4 classes of logits at 4 deep-supervision levels (size / 2^i).
    elements = {"reconstruction": {"output": size**2, "attention": 5 * size**2},
                "enhancement": {"output": size**2},
                "segmentation": {"logits": 4 * sum((size >> i) ** 2 for i in range(4))}}
    for recipe, kinds in elements.items():
        for dtype, itemsize in (("float16", 2), ("float32", 4)):
            raw = 0
            for kind, n in kinds.items():
                got = value(rows, "cache", f"target_bytes_per_record:{kind}", recipe=recipe,
                            mode=dtype)
                assert got == n * itemsize
                raw += got
            disk = value(rows, "cache", "disk_bytes_per_record", recipe=recipe, mode=dtype)
            assert raw < disk < raw + 4096  # plus keys, CRCs and HDF5 metadata per record
            assert value(rows, "cache", "disk_bytes_per_volume", recipe=recipe,
                         mode=dtype) == pytest.approx(16 * disk)
            assert value(rows, "cache", "read_MB_per_s", recipe=recipe, mode=dtype) > 0
    # The DC-CNN teacher's forward FLOPs per pixel: 5 cascades of 3x3 convs 1->32, 3 x 32->32,
    # 32->1, 2 FLOPs per multiply-add (its FFTs are not counted).
    convs = 32 + 3 * 32 * 32 + 32
    assert value(rows, "unit", "teacher_fwd_flops_per_pixel",
                 recipe="reconstruction") == 5 * convs * 9 * 2
    for recipe, student in (("enhancement", "edsr_baseline"),
                            ("segmentation", "mobilenet_unet_student")):
        params = sum(p.numel() for p in build_model(student).parameters())
        assert value(rows, "unit", "student_grad_bytes", recipe=recipe) == 4 * params
    edsr_small = sum(p.numel() for p in build_model("edsr_small").parameters())
    assert value(rows, "ranks", "grad_bytes") == 4 * edsr_small
    # Same global batch on 1 and 2 ranks: the same losses, step by step.
    assert value(rows, "ranks", "loss_max_rel_diff_1_vs_2") < 1e-5
    assert value(rows, "ranks", "allreduce_ms_per_step", ranks=2, threads=1) > 0
    for mode in ("no_kd", "cache", "stream"):
        assert value(rows, "throughput", "slices_per_s", recipe="segmentation", mode=mode) > 0
    assert (results / "scaling_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| curve | recipe |" in (results / "scaling_cpu.md").read_text()


def test_sizing_model_writes_labelled_projection(smallest_run, tmp_path):
    results, rows, env = smallest_run
    out = tmp_path / "scaling.md"
    done = subprocess.run([sys.executable, "benchmarks/scaling.py", "--write-docs", "--docs",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "no GPU row was measured" in text and "**measured**" in text
    # Cache size of the DC-CNN pair on fastMRI brain: slices x the record's raw fp16 bytes at
    # 640 x 320 (output + 5 attention maps) x the measured disk overhead of a record.
    disk = value(rows, "cache", "disk_bytes_per_record", recipe="reconstruction",
                 mode="float16")
    raw = 2 * 6 * 32**2
    expected = 4500 * 16 * 2 * 6 * 640 * 320 * disk / raw / 1e9
    line = next(l for l in text.splitlines()
                if l.startswith("| dccnn_teacher -> dccnn_student | 640x320 |"))
    assert f"{expected:.3g} GB *projected*" in line
    projected_rows = [l for l in text.splitlines() if re.match(r"\| \w+ -> \w+ \|", l)]
    assert len(projected_rows) == 2 * 3 * 8  # 2 datasets x 3 pairs x (4 node counts x 2)
    assert all(l.count("*projected*") >= 5 for l in projected_rows)
    assert not math.isnan(expected)
