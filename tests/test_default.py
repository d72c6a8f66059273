"""The embedded default dataset (kdhpc/data/default.py), generated at tiny sizes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from kdhpc.config import Config, DefaultDataConfig
from kdhpc.data import default
from kdhpc.data.acdc import ACDCSliceDataset, read_info
from kdhpc.data.fastmri import FastMRISliceDataset

TINY = DefaultDataConfig(seed=7, brain_subjects=3, brain_slices=3, brain_size=48, brain_coils=3,
                         cardiac_patients=5, cardiac_slices=3, cardiac_size=64)
TINY_ARGS = ["seed=7", "brain_subjects=3", "brain_slices=3", "brain_size=48", "brain_coils=3",
             "cardiac_patients=5", "cardiac_slices=3", "cardiac_size=64"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kdhpc_data")
    for kind in default.KINDS:
        default.ensure_default(TINY, kind, root)
    return root


def dataset_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every HDF5 dataset and NIfTI array under ``folder``, by relative name."""
    out = {}
    for path in sorted(folder.rglob("*.h5")):
        with h5py.File(path, "r") as f:
            for key in f:
                out[f"{path.relative_to(folder)}:{key}"] = hashlib.sha256(
                    np.ascontiguousarray(f[key][()]).tobytes()).hexdigest()
    for path in sorted(folder.rglob("*.nii.gz")):
        out[str(path.relative_to(folder))] = hashlib.sha256(
            np.ascontiguousarray(nib.load(path).get_fdata()).tobytes()).hexdigest()
    return out


def numpy_centred_ifft2(kspace: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    shifted = np.fft.ifftshift(kspace.astype(np.complex128), axes=axes)
    return np.fft.fftshift(np.fft.ifft2(shifted, axes=axes, norm="ortho"), axes=axes)


def template_t1_slice(z: float, size: int) -> np.ndarray:
    """The template T1 at axial voxel z, padded to 233 x 233, shown anterior up and patient
    right on the left, resampled to size x size."""
    t1 = default.load_template()["t1"]
    plane = np.pad(t1[:, :, int(round(z))], ((18, 18), (0, 0)))  # [x 233, y 233]
    return ndimage.zoom(plane[::-1, ::-1].T, size / 233, order=1)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_same_seed_gives_identical_files_and_another_seed_differs(tiny_root, tmp_path):
    for kind in default.KINDS:
        first = tiny_root / default.dataset_name(TINY, kind)
        again = default.ensure_default(TINY, kind, tmp_path)
        assert again.name == first.name
        hashes = dataset_hashes(first)
        assert hashes and dataset_hashes(again) == hashes
        files = {f["path"]: f["sha256"] for f in json.loads((first / "manifest.json").read_text())
                 ["files"]}
        assert files == {str(p.relative_to(again)): default.sha256_file(p)
                         for p in again.rglob("*") if p.is_file() and p.name != "manifest.json"}

    other = dataclasses.replace(TINY, seed=8)
    brain = default.ensure_default(other, "brain", tmp_path)
    assert brain.name != default.dataset_name(TINY, "brain")
    assert (tmp_path / default.dataset_name(TINY, "brain")).is_dir()  # the old set is kept
    old = dataset_hashes(tiny_root / default.dataset_name(TINY, "brain"))
    new = dataset_hashes(brain)
    for key in (":kspace", ":tissue", ":reconstruction_rss"):
        assert {v for k, v in old.items() if k.endswith(key)}.isdisjoint(
            {v for k, v in new.items() if k.endswith(key)})


def test_multicoil_target_is_rss_of_stored_kspace(tiny_root):
    folder = tiny_root / default.dataset_name(TINY, "brain")
    n_files = 0
    for split in default.SPLITS:
        data = FastMRISliceDataset(folder / f"multicoil_{split}", challenge="multicoil")
        for item in data:
            kspace = item["kspace"].numpy()  # [C, H, W]
            assert kspace.shape == (TINY.brain_coils, TINY.brain_size, TINY.brain_size)
            rss = np.sqrt(np.sum(np.abs(numpy_centred_ifft2(kspace)) ** 2, axis=0))
            target = item["target"].numpy()
            np.testing.assert_allclose(target, rss, rtol=0, atol=1e-5 * rss.max())
            assert item["attrs"]["acquisition"] in default.BRAIN_CONTRASTS
            assert item["extra"]["tissue"].shape == target.shape
        n_files += len(data.volumes)
        for fname, _ in data.volumes:
            with h5py.File(fname, "r") as f:
                volume = f["reconstruction_rss"][()]
                assert f.attrs["max"] == pytest.approx(volume.max(), rel=1e-6)
                assert f.attrs["norm"] == pytest.approx(np.linalg.norm(volume), rel=1e-5)
    assert n_files == TINY.brain_subjects


def test_singlecoil_emulation_matches_its_kspace_and_the_coil_combination(tiny_root):
    folder = tiny_root / default.dataset_name(TINY, "brain")
    for split in default.SPLITS:
        single = FastMRISliceDataset(folder / f"singlecoil_{split}", challenge="singlecoil")
        multi = FastMRISliceDataset(folder / f"multicoil_{split}", challenge="multicoil")
        assert [Path(f).name for f, _ in single.volumes] == [Path(f).name for f, _ in multi.volumes]
        for item_s, item_m in zip(single, multi):
            image = numpy_centred_ifft2(item_s["kspace"].numpy())  # [H, W]
            np.testing.assert_allclose(item_s["target"].numpy(), np.abs(image), rtol=0,
                                       atol=1e-5 * np.abs(image).max())
            # The coil maps are normalised (sum |S_c|^2 = 1), so the combined magnitude and the
            # RSS agree where the signal dominates the noise.
            rss = item_m["target"].numpy()
            bright = rss > 0.5 * rss.max()
            assert np.median(np.abs(np.abs(image)[bright] / rss[bright] - 1)) < 0.05
            assert item_s["attrs"]["patient_id"] == item_m["attrs"]["patient_id"]
            np.testing.assert_array_equal(item_s["extra"]["tissue"], item_m["extra"]["tissue"])


def test_coil_maps_are_normalised_and_distinct():
    maps = default.coil_maps(np.random.default_rng(3), 40, 6)  # [C, N, N]
    np.testing.assert_allclose(np.sum(np.abs(maps) ** 2, axis=0), 1.0, atol=1e-5)
    magnitudes = np.abs(maps).reshape(6, -1)
    peaks = magnitudes.argmax(axis=1)
    assert len(set(peaks.tolist())) == 6  # each coil is most sensitive somewhere else


def test_tissue_labels_follow_the_acquisition_contrast(tiny_root):
    folder = tiny_root / default.dataset_name(TINY, "brain")
    manifest = json.loads((folder / "manifest.json").read_text())
    for subject in manifest["subjects"]:
        with h5py.File(folder / subject["files"][0], "r") as f:
            target, tissue = f["reconstruction_rss"][()], f["tissue"][()]
        assert set(np.unique(tissue).tolist()) == {0, 1, 2, 3}
        means = [float(target[tissue == t].mean()) for t in (1, 2, 3)]
        drawn = subject["intensities"]
        for a in range(3):
            for b in range(3):
                if drawn[a] > 1.3 * drawn[b]:  # clearly ordered by the drawn intensities
                    assert means[a] > means[b], (subject["acquisition"], means, drawn)
        assert target[tissue == 0].mean() < 0.3 * min(means)


def test_anatomy_is_the_template_but_not_a_copy():
    cfg = TINY  # same sizes as the generated set: reuses the smoothed template
    slices = []
    for index in range(3):
        rng = default.subject_rng(cfg.seed, 1, index)
        subject = default.plan_brain_subject(cfg, index, "train", rng)
        subject = dataclasses.replace(subject, acquisition="AXT1", template_weight=0.6)
        magnitude, _ = default.render_brain(subject, cfg.brain_size, rng)
        middle = cfg.brain_slices // 2
        z = subject.z_voxels[middle]
        same = correlation(magnitude[middle], template_t1_slice(z, cfg.brain_size))
        far = correlation(magnitude[middle], template_t1_slice(z + 35, cfg.brain_size))
        assert 0.75 < same < 0.98 and far < same
        slices.append(magnitude[middle])
    assert correlation(slices[0], slices[1]) < 0.97
    assert correlation(slices[1], slices[2]) < 0.97


def test_cardiac_labels_match_intensities_and_phases(tiny_root):
    folder = tiny_root / default.dataset_name(TINY, "cardiac")
    middle = TINY.cardiac_slices // 2
    lv_area = {}
    for split in default.SPLITS:
        data = ACDCSliceDataset(folder / split, size=TINY.cardiac_size, normalize=False)
        for item in data:
            if item["slice"] != middle:
                continue
            image, label = item["image"][0].numpy(), item["label"].numpy()
            assert set(np.unique(label).tolist()) == {0, 1, 2, 3}, item["volume"]
            mean = {c: float(np.median(image[label == c])) for c in (1, 2, 3)}
            assert mean[3] > 1.5 * mean[2] and mean[1] > 1.5 * mean[2], (item["volume"], mean)
            lv_area[(item["volume"].split("_")[0], item["phase"])] = int((label == 3).sum())
        for info_file in (folder / split).glob("*/Info.cfg"):
            info = read_info(info_file)
            assert info["ED"] == 1 and 1 < info["ES"] <= info["NbFrame"]
            assert info["Group"] in default.CARDIAC_GROUPS
            image = nib.load(info_file.parent / f"{info_file.parent.name}_frame01.nii.gz")
            assert image.shape == (TINY.cardiac_size, TINY.cardiac_size, TINY.cardiac_slices)
            assert image.header.get_zooms()[0] == pytest.approx(
                default.CARDIAC_FOV_MM / TINY.cardiac_size)
    patients = {p for p, _ in lv_area}
    assert len(patients) == TINY.cardiac_patients
    for patient in patients:
        assert lv_area[(patient, "ES")] < lv_area[(patient, "ED")]


def test_subjects_are_split_disjointly(tiny_root):
    brain = tiny_root / default.dataset_name(TINY, "brain")
    ids = {}
    for split in default.SPLITS:
        ids[split] = set()
        for path in (brain / f"multicoil_{split}").glob("*.h5"):
            with h5py.File(path, "r") as f:
                ids[split].add(f.attrs["patient_id"])
    assert all(ids.values())
    assert sum(map(len, ids.values())) == len(set.union(*ids.values())) == TINY.brain_subjects
    cardiac = tiny_root / default.dataset_name(TINY, "cardiac")
    patients = {s: {p.name for p in (cardiac / s).iterdir()} for s in default.SPLITS}
    assert all(patients.values())
    assert sorted(set.union(*patients.values())) == [f"patient{i:03d}" for i in range(1, 6)]
    assert sum(map(len, patients.values())) == TINY.cardiac_patients


@pytest.mark.parametrize("n", [3, 4, 5, 7, 12, 20, 31])
@pytest.mark.parametrize("fractions", [(0.6, 0.2, 0.2), (0.8, 0.1, 0.1), (0.34, 0.33, 0.33),
                                       (1.0, 0.0, 0.0)])
def test_split_counts_fill_every_split(n, fractions):
    counts = default.split_counts(n, fractions)
    assert sum(counts) == n and min(counts) >= 1
    for count, fraction in zip(counts[1:], fractions[1:]):
        if n * fraction >= 1 and n >= 5:
            assert abs(count - n * fraction) <= 1


def test_cli_prints_what_it_made_and_reuses_the_cache(tmp_path, capsys):
    args = [*TINY_ARGS, "--kind", "cardiac", "--out", str(tmp_path)]
    assert default.main(args) == 0
    made = capsys.readouterr().out
    assert "5 patients x 2 frames (ED, ES) x 3 slices, 64x64" in made
    assert "split: train 3, val 1, test 1" in made and "generated" in made
    manifest = tmp_path / default.dataset_name(TINY, "cardiac") / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert default.main(args) == 0
    again = capsys.readouterr().out
    assert "reused the cached set" in again
    assert manifest.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*tmp*"))


def test_cli_reads_kdhpc_data_and_rejects_bad_keys(tiny_root, monkeypatch, capsys):
    monkeypatch.setenv("KDHPC_DATA", str(tiny_root))
    assert default.main([*TINY_ARGS, "--kind", "brain"]) == 0
    out = capsys.readouterr().out
    assert str(tiny_root / default.dataset_name(TINY, "brain")) in out
    assert "3 subjects x 3 slices, 48x48, 3 coils" in out and "reused the cached set" in out
    assert default.main(["brain_size=big"]) == 2
    assert "default_data.brain_size" in capsys.readouterr().err


def test_dataset_root_generates_on_first_use(tiny_root, monkeypatch):
    monkeypatch.setenv("KDHPC_DATA", str(tiny_root))
    cfg = Config()
    cfg.default_data = TINY
    cfg.data.dataset = "default_cardiac"
    assert default.dataset_root(cfg) == tiny_root / default.dataset_name(TINY, "cardiac")
    cfg.data.root = "/somewhere/else"
    assert default.dataset_root(cfg) == Path("/somewhere/else")
    with pytest.raises(ValueError, match="kind: expected one of"):
        default.ensure_default(TINY, "knee", tiny_root)


def test_damaged_cache_is_refused_and_force_regenerates(tiny_root, tmp_path):
    folder = default.ensure_default(TINY, "cardiac", tmp_path)
    victim = next(folder.rglob("*_gt.nii.gz"))
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(default.DefaultDataError, match=victim.name):
        default.ensure_default(TINY, "cardiac", tmp_path)
    default.ensure_default(TINY, "cardiac", tmp_path, force=True)
    assert default.verify_default(folder)["digest"].startswith(folder.name.split("-")[1])
    assert dataset_hashes(folder) == dataset_hashes(tiny_root / folder.name)
    (folder / "manifest.json").unlink()
    with pytest.raises(default.DefaultDataError, match="manifest.json: missing"):
        default.ensure_default(TINY, "cardiac", tmp_path)


def _generate_in_child(root: str, barrier, results) -> None:
    barrier.wait()
    folder, generated = default.find_or_generate(TINY, "cardiac", root, False)
    results.put((str(folder), generated))


def test_concurrent_processes_generate_once(tmp_path):
    # fork: the children only run numpy/scipy/nibabel code, never torch ops
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_generate_in_child, args=(str(tmp_path), barrier, results))
                for _ in range(2)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert {folder for folder, _ in outcomes} == {str(tmp_path / default.dataset_name(TINY,
                                                                                      "cardiac"))}
    assert sorted(generated for _, generated in outcomes) == [False, True]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [
        default.dataset_name(TINY, "cardiac")]
    default.verify_default(outcomes[0][0])
