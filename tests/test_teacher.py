"""Teacher sources: streamed vs cached targets and KD losses, manifest refusals, corruption and
truncation detection, a fill killed with SIGKILL and resumed, the CLI, training on a cache."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kdhpc import train as T
from kdhpc.config import Config
from kdhpc.teacher import (CacheError, CachedTeacher, StreamTeacher, cache_config,
                           default_cache_dir, fill_cache, teacher_fingerprint, teacher_source)
from kdhpc.teacher.cache.__main__ import main as cache_main
from kdhpc.teacher.cache import (CacheProblem, from_storage, to_storage,
                                 verify_cache)
from test_train import (ToyViews, one_thread, toy_config, toy_extract, toy_loss, toy_student,
                        toy_teacher)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA_CONFIG = {"degrade": {"views_per_sample": 4, "noise": 0.1}, "data": {"dataset": "toy"}}
TOLERANCE = {"float32": 1e-6, "bfloat16": 2e-2, "float16": 2e-3}


def _fill(cache_dir: Path, dtype: str = "float32", world: int = 2, extract=toy_extract,
          **kw) -> Path:
    """Fill with ``world`` simulated ranks, the last first (the index appears at the end)."""
    for rank in reversed(range(world)):
        fill_cache(cache_dir, toy_teacher(), extract, ToyViews(2, 3), data_config=DATA_CONFIG,
                   dtype=dtype, batch_size=5, rank=rank, world_size=world, **kw)
    return cache_dir


def _batch(pairs: list[tuple[int, int]], dataset=None) -> dict:
    items = T.ViewItems(dataset or ToyViews(2, 3))
    return torch.utils.data.default_collate([items[p] for p in pairs])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {dtype: _fill(root / dtype, dtype) for dtype in ("float32", "float16", "bfloat16")}


def test_stream_and_cache_give_the_same_kd_loss(caches):
    # The views one training epoch draws, in its order.
    order, views = T.epoch_plan(6, 4, seed=3, epoch=0)
    batch = _batch([(int(i), int(views[i])) for i in order])
    stream = StreamTeacher(toy_teacher(), toy_extract).targets(batch)
    teacher = toy_teacher()
    with torch.no_grad():
        direct = toy_extract(teacher, batch)  # independent of both sources
    student = toy_student()
    stream_loss = toy_loss(student, batch, stream)
    for name in stream:
        assert torch.equal(stream[name], direct[name])
    for dtype, cache_dir in caches.items():
        cached = CachedTeacher(cache_dir, teacher_sha256=teacher_fingerprint(teacher),
                               data_config=DATA_CONFIG).targets(batch)
        assert sorted(cached) == sorted(direct)
        tol = TOLERANCE[dtype]
        for name in direct:
            torch.testing.assert_close(cached[name], direct[name], rtol=tol, atol=tol)
        cached_loss = toy_loss(student, batch, cached)
        for term, value in stream_loss.items():
            assert cached_loss[term].item() == pytest.approx(value.item(), rel=5 * tol, abs=tol), (
                dtype, term)
    # float16 really is stored at reduced precision (a cache that silently kept fp32 would pass
    # the tolerance above): the stored bytes are half those of float32.
    with h5py.File(next(caches["float16"].glob("shard-00000-*.h5"))) as f:
        assert f["targets/output"].dtype == np.float16
        assert np.array_equal(f["view_key"][:], np.array(
            [ToyViews().view_key(int(i), int(v)) for i, v in zip(f["index"][:], f["view"][:])]))


def test_shards_split_records_by_rank_and_index_lists_them(caches):
    index = json.loads((caches["float32"] / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["shard-00000-of-00002.h5",
                                                    "shard-00001-of-00002.h5"]
    assert [(s["first_record"], s["records"]) for s in index["shards"]] == [(0, 12), (12, 12)]
    manifest = json.loads((caches["float32"] / "manifest.json").read_text())
    assert manifest["teacher_sha256"] == teacher_fingerprint(toy_teacher().state_dict())
    assert manifest["num_samples"] == 6 and manifest["num_views"] == 4
    assert index["schema"]["attention_0"] == {"shape": [1, 8, 8], "dtype": "float32"}
    assert CachedTeacher(caches["float32"]).verify() == []


def test_changed_teacher_or_view_config_is_refused(caches, tmp_path):
    other = toy_teacher()
    with torch.no_grad():
        other.out.bias.add_(1e-3)
    with pytest.raises(CacheError, match="teacher weights changed"):
        CachedTeacher(caches["float32"], teacher_sha256=teacher_fingerprint(other))
    changed = {**DATA_CONFIG, "degrade": {"views_per_sample": 8, "noise": 0.1}}
    with pytest.raises(CacheError, match=r"degrade\.views_per_sample: 4 -> 8"):
        CachedTeacher(caches["float32"], data_config=changed)
    # A fill into a cache made for another config is refused too, forced or not, and the
    # cache is left exactly as it was.
    cache_dir = _fill(tmp_path / "c", world=1)
    before = {p.name: p.read_bytes() for p in cache_dir.iterdir()}
    for force in (False, True):
        with pytest.raises(CacheError, match=r"dtype: 'float32' -> 'float16'.*never overwritten"):
            _fill(cache_dir, "float16", world=1, force=force)
    assert {p.name: p.read_bytes() for p in cache_dir.iterdir()} == before
    # A batch whose view key differs from the stored one (data code changed) is refused.
    batch = _batch([(1, 2)])
    batch["view_key"][0, 1] += 1
    with pytest.raises(CacheError, match="view_key"):
        CachedTeacher(cache_dir).targets(batch)
    with pytest.raises(CacheError, match=r"no record for \(index=6, view=0\)"):
        CachedTeacher(cache_dir).targets(_batch([(0, 0)]) | {"index": torch.tensor([6])})


def _flip_one_bit(shard: Path, row: int) -> tuple[int, int]:
    """Flip one bit of one float16 logit of ``row``; returns the row's (index, view)."""
    with h5py.File(shard) as f:
        offset = f["targets/logits_0"].id.get_offset()
        row_bytes = int(np.prod(f["targets/logits_0"].shape[1:])) * 2
        index, view = int(f["index"][row]), int(f["view"][row])
    raw = bytearray(shard.read_bytes())
    raw[offset + row * row_bytes + 17] ^= 0x01
    shard.write_bytes(bytes(raw))
    return index, view


def test_flipped_byte_or_truncation_is_detected(caches, tmp_path):
    cache_dir = tmp_path / "c"
    shutil.copytree(caches["float16"], cache_dir)
    shard = cache_dir / "shard-00001-of-00002.h5"
    row = 5
    index, view = _flip_one_bit(shard, row)
    raw = shard.read_bytes()
    cached = CachedTeacher(cache_dir)
    with pytest.raises(CacheError, match=rf"record {row} \(index={index}, view={view}\) fails its "
                                         r"CRC-32"):
        cached.targets(_batch([(0, 0), (index, view)]))
    ok = cached.targets(_batch([(0, 0), (1, 1)]))  # the rest of the cache still reads
    assert torch.isfinite(ok["logits_0"]).all()
    assert cached.verify() == [f"{shard}: row {row} (index={index}, view={view}) of 12 "
                               f"unwritten, misplaced or failing their CRC-32 check"]
    shard.write_bytes(raw[:-100])
    with pytest.raises(CacheError, match=r"expected \d+ bytes, found \d+ \(truncated"):
        CachedTeacher(cache_dir)


def _counting_extract(calls: list[int]):
    def extract(model, batch):
        calls.append(len(batch["index"]))
        return toy_extract(model, batch)
    return extract


def test_verify_names_each_bad_or_missing_shard_and_force_repairs_exactly_those(caches, tmp_path):
    clean = caches["float16"]
    cache_dir = tmp_path / "c"
    shutil.copytree(clean, cache_dir)
    shard0, shard1 = (cache_dir / f"shard-0000{r}-of-00002.h5" for r in (0, 1))
    shard0.unlink()
    index, view = _flip_one_bit(shard1, 5)
    problems = verify_cache(cache_dir)
    assert problems == [
        CacheProblem(shard0, "missing"),
        CacheProblem(shard1, f"row 5 (index={index}, view={view}) of 12 unwritten, misplaced or "
                             f"failing their CRC-32 check", (5,))]
    # Without force a fill trusts the finished shard 1 (it recomputes only the missing one).
    calls: list[int] = []
    _fill(cache_dir, "float16", extract=_counting_extract(calls))
    assert sum(calls) == 12 and [str(p) for p in verify_cache(cache_dir)] == [str(problems[1])]
    # force: exactly the damaged row is recomputed, and the shard is again the clean one.
    calls.clear()
    _fill(cache_dir, "float16", extract=_counting_extract(calls), force=True)
    assert calls == [1] and verify_cache(cache_dir) == []
    assert shard1.read_bytes() == (clean / shard1.name).read_bytes()
    pairs = [(i, v) for i in range(6) for v in range(4)]
    repaired = CachedTeacher(cache_dir).targets(_batch(pairs))
    reference = CachedTeacher(clean).targets(_batch(pairs))
    assert all(torch.equal(repaired[name], reference[name]) for name in reference)
    # An intact cache is left alone by force.
    calls.clear()
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    _fill(cache_dir, "float16", extract=_counting_extract(calls), force=True)
    assert calls == [] and {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == before


def test_verify_reports_unreadable_shard_and_no_cache(caches, tmp_path):
    cache_dir = tmp_path / "c"
    shutil.copytree(caches["float32"], cache_dir)
    shard = cache_dir / "shard-00000-of-00002.h5"
    shard.write_bytes(b"\0" * 64 + shard.read_bytes()[64:])  # HDF5 superblock gone
    (problem,) = verify_cache(cache_dir)
    assert problem.path == shard and problem.what.startswith("cannot open as HDF5 (corrupted)")
    (problem,) = verify_cache(tmp_path / "nothing")
    assert str(problem) == (f"{tmp_path / 'nothing' / 'manifest.json'}: missing: no teacher cache "
                            f"here; fill it with python -m kdhpc.teacher.cache CONFIG")
    calls: list[int] = []
    _fill(cache_dir, "float32", extract=_counting_extract(calls), force=True)
    assert sum(calls) == 12 and verify_cache(cache_dir) == []


def test_float16_overflow_is_refused_not_stored_as_inf():
    with pytest.raises(CacheError, match="'logits_0': 1 finite values overflow float16"):
        to_storage(torch.tensor([1.0, 7e4]), "float16", "logits_0")
    stored = to_storage(torch.tensor([1.0, 7e4]), "bfloat16", "x")
    assert from_storage(stored, "bfloat16").tolist() == pytest.approx([1.0, 7e4], rel=1e-2)


_CHILD = """
import sys, time
sys.path.insert(0, {here!r})
from test_train import ToyViews, toy_teacher, toy_extract
from kdhpc.teacher import fill_cache

def report(done):
    print("done", done, flush=True)
    if done == 9:
        time.sleep(60)  # the parent kills us here

fill_cache({cache!r}, toy_teacher(), toy_extract, ToyViews(2, 3), data_config={config!r},
           dtype="float16", batch_size=3, commit_seconds=0, on_commit=report)
"""


def test_fill_killed_with_sigkill_resumes_where_it_stopped(caches, tmp_path):
    cache_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    script = _CHILD.format(here=str(HERE), cache=str(cache_dir), config=DATA_CONFIG)
    child = subprocess.Popen([sys.executable, "-c", script],
                             stdout=subprocess.PIPE, text=True, env=env)
    for line in child.stdout:
        if line.split() == ["done", "9"]:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    partial = cache_dir / "shard-00000-of-00001.h5.partial"
    with h5py.File(partial) as f:
        written = int(f["written"][:].sum())
    assert written == 9 and not (cache_dir / "index.json").exists()
    with pytest.raises(CacheError, match="incomplete teacher cache"):
        CachedTeacher(cache_dir)
    calls: list[int] = []
    fill_cache(cache_dir, toy_teacher(), _counting_extract(calls), ToyViews(2, 3),
               data_config=DATA_CONFIG, dtype="float16", batch_size=3)
    assert sum(calls) == 24 - 9  # only the missing records were computed
    # Same values as the cache filled in one go (2 ranks there, 1 here: same record keys).
    pairs = [(i, v) for i in range(6) for v in range(4)]
    resumed = CachedTeacher(cache_dir).targets(_batch(pairs))
    clean = CachedTeacher(caches["float16"]).targets(_batch(pairs))
    for name in clean:
        torch.testing.assert_close(resumed[name], clean[name], rtol=2e-3, atol=2e-3)


def _toy_recipe(monkeypatch, cache_parts) -> str:
    """A recipe module of the test's own (``recipe: toycache.recipe``) whose cache parts are
    ``cache_parts``."""
    from kdhpc.recipe import Recipe

    package, module = types.ModuleType("toycache"), types.ModuleType("toycache.recipe")
    module.RECIPE = Recipe("toycache", lambda cfg: [], lambda cfg: None, lambda run: "",
                           lambda run: {}, cache_parts)
    monkeypatch.setitem(sys.modules, "toycache", package)
    monkeypatch.setitem(sys.modules, "toycache.recipe", module)
    return "recipe: toycache.recipe\n"


def test_cli_needs_a_recipe_with_a_cache_then_fills(tmp_path, monkeypatch, capsys):
    config = tmp_path / "cfg.yaml"
    body = (f"run_dir: {tmp_path / 'run'}\nteacher:\n  cache_dtype: float32\n"
            f"degrade:\n  views_per_sample: 4\n")
    config.write_text(_toy_recipe(monkeypatch, None) + body)
    assert cache_main([str(config)]) == 2
    assert capsys.readouterr().err == (
        "python -m kdhpc.teacher.cache: error: recipe: 'toycache.recipe' has no teacher cache "
        "(it distils no teacher outputs); call kdhpc.teacher.cache.fill_cache(...) from Python "
        "instead\n")
    config.write_text(_toy_recipe(monkeypatch, lambda cfg: (toy_teacher(), toy_extract,
                                                            ToyViews(2, 3))) + body)
    assert cache_main([str(config), "eval.batch_size=7"]) == 0
    assert "teacher cache complete and verified" in capsys.readouterr().out
    from kdhpc.config import load_config

    cfg = load_config(config)
    source = teacher_source(cfg, toy_teacher())
    assert isinstance(source, CachedTeacher) and source.cache_dir == default_cache_dir(cfg)
    batch = _batch([(4, 3)])
    torch.testing.assert_close(source.targets(batch)["output"], StreamTeacher(
        toy_teacher(), toy_extract).targets(batch)["output"], rtol=1e-6, atol=1e-6)
    cfg.degrade.noise_sigma = 0.5
    with pytest.raises(CacheError, match=r"degrade\.noise_sigma: 0\.02 -> 0\.5"):
        teacher_source(cfg, toy_teacher())
    assert cache_main([str(config), "--verify"]) == 0


def test_cli_verify_names_bad_shards_and_force_repairs_them(tmp_path, monkeypatch, capsys):
    config = tmp_path / "cfg.yaml"
    calls: list[int] = []
    config.write_text(_toy_recipe(monkeypatch, lambda cfg: (toy_teacher(), _counting_extract(
        calls), ToyViews(2, 3))) + f"run_dir: {tmp_path / 'run'}\nteacher:\n  cache_dtype: "
        f"float16\ndegrade:\n  views_per_sample: 4\n")
    assert cache_main([str(config)]) == 0 and sum(calls) == 24
    shard = tmp_path / "run" / "teacher_cache" / "shard-00000-of-00001.h5"
    intact = shard.read_bytes()
    capsys.readouterr()
    index, view = _flip_one_bit(shard, 13)
    bad_row = (f"{shard}: row 13 (index={index}, view={view}) of 24 unwritten, misplaced or "
               f"failing their CRC-32 check")
    # A plain fill trusts the finished shard, but does not call the cache complete.
    assert cache_main([str(config)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == bad_row
    assert cache_main([str(config), "--verify"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == bad_row and "complete" not in out
    calls.clear()
    assert cache_main([str(config), "--force"]) == 0
    assert capsys.readouterr().out.endswith("teacher cache complete and verified\n")
    assert calls == [1] and shard.read_bytes() == intact
    shard.unlink()
    assert cache_main([str(config), "--verify"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"{shard}: missing" and captured.err == ""
    assert cache_main([str(config), "--force"]) == 0 and shard.read_bytes() == intact


def test_training_on_the_cache_matches_training_with_the_streamed_teacher(caches, tmp_path,
                                                                          one_thread):
    cfg = toy_config(epochs=1, grad_accum=1, batch_size=2, eval_every=0)
    runs = {}
    for name, source in (("stream", StreamTeacher(toy_teacher(), toy_extract)),
                         ("cache", CachedTeacher(caches["float32"]))):
        T.train(cfg, toy_student(), toy_loss, ToyViews(2, 3), teacher=source,
                run_dir=tmp_path / name, progress=False)
        with (tmp_path / name / "train_log.csv").open() as fh:
            runs[name] = list(csv.DictReader(fh))
    assert len(runs["stream"]) == 3
    for a, b in zip(runs["stream"], runs["cache"]):
        for term in ("data", "imitation", "at", "kl", "loss"):
            assert float(b[term]) == pytest.approx(float(a[term]), rel=1e-5, abs=1e-7), term
    final = {n: T.load_weights(tmp_path / n / "final_model.pt") for n in runs}
    for key in final["stream"]:
        torch.testing.assert_close(final["cache"][key], final["stream"][key], rtol=1e-5, atol=1e-6)


def test_stream_teacher_is_frozen_and_its_bf16_autocast_is_close():
    teacher = toy_teacher().train()
    batch = _batch([(0, 1), (3, 2), (5, 3)])
    fp32 = StreamTeacher(teacher, toy_extract).targets(batch)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    bf16 = StreamTeacher(toy_teacher(), toy_extract, bf16=True).targets(batch)
    for name in fp32:
        assert bf16[name].dtype == torch.float32
        torch.testing.assert_close(bf16[name], fp32[name], rtol=5e-2, atol=5e-2)
    assert not torch.equal(bf16["logits_0"], fp32["logits_0"])  # autocast really ran in bf16
    # Targets enter a loss that saves them for backward (inference tensors could not).
    out = toy_student()(batch["input"])[0]
    (out * fp32["output"]).sum().backward()
