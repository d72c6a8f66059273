"""benchmarks/gpu_check.sh --dry on this CPU machine, with the training stack blocked.

The script a GPU session runs must not rot between sessions, and the kernels, their benchmarks and
kdhpc.bench must run on a bare GPU image without deepspeed, submitit, nibabel, nilearn or h5py:
every Python process below starts with a ``sys.meta_path`` finder (a ``sitecustomize`` on
PYTHONPATH) that makes importing any of them raise ImportError.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kdhpc

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("deepspeed", "submitit", "nibabel", "nilearn", "h5py")
BUILT = list(Path(kdhpc.__file__).parent.glob("_C*.so"))
REQUIRE_EXT = os.environ.get("KDHPC_REQUIRE_EXT", "") == "1"

BLOCKER = f'''
import sys

BLOCKED = {BLOCKED!r}


class TrainingStackBlocker:
    """Refuses the training stack: the kernels must not need it."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
        return None


sys.meta_path.insert(0, TrainingStackBlocker())
'''


@pytest.fixture
def blocked_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    env.pop("KDHPC_RESULTS", None)
    return env


def run(args, env, timeout=300):
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_kernels_and_bench_import_without_the_training_stack(blocked_env):
    code = ("import importlib, sys\n"
            "for name in " + repr(BLOCKED) + ":\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError:\n"
            "        pass\n"
            "    else:\n"
            "        sys.exit(f'{name} imported: the blocker is not active')\n"
            "import kdhpc.ops, kdhpc.bench, kdhpc.ops.fft\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in " + repr(BLOCKED) + ")\n"
            "assert not loaded, loaded\n"
            "assert not any(m.startswith(('kdhpc.data', 'kdhpc.models')) for m in sys.modules)\n"
            "print('ok')\n")
    result = run([sys.executable, "-c", code], blocked_env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(not BUILT and not REQUIRE_EXT,
                    reason="kdhpc._C is not built (the data-consistency benchmark times it)")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_writes_tables_and_rows(blocked_env, tmp_path):
    out = tmp_path / "out"
    result = run(["bash", "benchmarks/gpu_check.sh", "--dry", str(out)], blocked_env)
    summary = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + summary
    with (out / "gpu_check.csv").open() as fh:
        steps = {row["step"]: row for row in csv.DictReader(fh)}
    assert list(steps) == ["build", "tests", "softmax_kl", "attention_map", "data_consistency"]
    assert all(row["status"] == "passed" and row["mode"] == "dry" for row in steps.values())
    assert "overall: passed" in summary
    # Each kernel benchmark ran at its smallest size and left its rows and its table.
    for topic in ("softmax_kl", "attention_map", "data_consistency"):
        with (out / f"{topic}.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert rows and all(row["commit"] and row["device"] for row in rows)
        assert f"# {topic} on " in (out / f"{topic}_cpu.md").read_text()
    with (out / "data_consistency.csv").open() as fh:
        op_rows = [r for r in csv.DictReader(fh) if r["impl"] == "op"]
    assert {r["case"] for r in op_rows} == {"kdmri_8x1x320x320_real",
                                            "multicoil_8x15x640x368_complex"}
    assert all(float(r["ms_min"]) <= float(r["ms_median"]) for r in op_rows)
    # The gpu marker selects the kernel tests (collected, not run, in a dry run).
    assert "tests collected" in (out / "tests.log").read_text()


def test_gpu_check_usage_error(tmp_path):
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "usage: bash benchmarks/gpu_check.sh [--dry] OUTDIR"
