"""kdhpc.bench: the CLI's help and errors, and the interleaved timing every benchmark uses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from kdhpc import bench

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "kdhpc.bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_the_benchmarks():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    scripts = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
    assert bench.benchmark_names() == scripts
    for name in scripts:
        assert name in result.stdout


def test_unknown_benchmark_is_one_line_exit_2():
    result = run_cli("softmax_kl", "no_such_bench")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'no_such_bench'" in lines[0] and "softmax_kl, train_step" in lines[0]
    assert result.stdout == ""          # nothing ran, not even the valid name


def test_interleaved_runs_each_form_once_per_round_in_turn():
    calls = []
    forms = {"short": lambda: calls.append("short"),
             "long": lambda: (calls.append("long"), time.sleep(0.003))}
    timing = bench.interleaved(forms, "cpu", rounds=5, warmup=2)
    assert calls == ["short", "short", "long", "long"] + ["short", "long"] * 5
    for name, t in timing.items():
        assert len(t.samples) == 5 and t.min == min(t.samples) and t.min <= t.median
    assert timing["long"].min >= 3.0 > timing["short"].min


def test_environment_records_threads_and_load():
    env = bench.environment("cpu")
    assert env["threads"] == torch.get_num_threads()
    assert abs(env["load"] - os.getloadavg()[0]) < 1.0   # the 1-minute load, as it was
    assert env["device"].endswith(f"x{torch.get_num_threads()} threads")


def test_write_results_keeps_a_rows_own_columns(tmp_path):
    rows = [{"case": "a", "threads": 1, "ms_min": 1.5}, {"case": "a", "threads": 2, "ms_min": 0.9}]
    path = bench.write_results("topic", rows, "cpu", notes=["a note"], results_dir=tmp_path)
    import csv
    with path.open() as fh:
        written = list(csv.DictReader(fh))
    assert [(r["threads"], r["ms_min"]) for r in written] == [("1", "1.5"), ("2", "0.9")]
    assert written[0]["commit"] and written[0]["load"] and written[0]["device"]
    md = (tmp_path / "topic_cpu.md").read_text()
    assert "| a | 1 | 1.5 |" in md and "- a note" in md


def test_failure_names_the_error_of_a_form_that_cannot_run():
    assert bench.failure(lambda: None) is None

    def broken():
        raise RuntimeError("no C compiler\nsecond line")
    assert bench.failure(broken) == "skipped: RuntimeError: no C compiler"
