"""kdhpc on a real SLURM cluster: slurm/distill.sh across two (emulated) nodes, preemption and
requeue, and a 2 x 2 sweep through submitit's SLURM executor against the same sweep run locally.

The cluster is the one `.ci/slurm.sh start` brings up (Debian's slurm + munge on localhost, two
slurmd "nodes", accounting); clients find it through SLURM_CONF. Without one these tests skip,
saying why; with KDHPC_REQUIRE_SLURM=1 (set by CI) a missing cluster is a failure instead.
Everything runs the reconstruction recipe's tiny config on CPU (DeepSpeed's cpu accelerator,
gloo), one CPU per rank.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "recon_tiny.yaml"
REQUIRE = os.environ.get("KDHPC_REQUIRE_SLURM") == "1"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
OVERRIDES = ["train.threads=1"]
# 3 epochs of 2 steps, a checkpoint after each, so that a signal sent after the teacher's first
# checkpoint lands while it still trains.
LONGER = [*OVERRIDES, "train.epochs=3", "train.max_steps=6", "train.log_every=1"]


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return ("no SLURM here (sbatch is not on PATH); CI starts a local cluster with "
                "`eval \"$(bash .ci/slurm.sh start)\"`")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        return (f"sbatch exists but no slurmctld answers `scontrol ping` "
                f"(SLURM_CONF={os.environ.get('SLURM_CONF', '')!r}): {ping.stdout.strip()} "
                f"{ping.stderr.strip()}")
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict:
    problem = _cluster_problem()
    if problem:
        if REQUIRE:
            pytest.fail(f"KDHPC_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    nodes = sorted(set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True,
                                      text=True, check=True).stdout.split()))
    data = tmp_path_factory.mktemp("kdhpc-data")
    env = {**os.environ, "KDHPC_DATA": str(data), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p),
           "KDHPC_PYTHON": sys.executable}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # generate the tiny data once, here, so that concurrent jobs only read it
    from kdhpc.config import load_config
    from kdhpc.data.default import ensure_default

    ensure_default(load_config(TINY).default_data, kind="brain", root=data)
    return {"nodes": nodes, "env": env}


def sbatch(cluster: dict, cwd: Path, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=cluster["env"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"sbatch {' '.join(args)}: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, timeout=30).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_job(job_id: str, timeout: float) -> dict[str, str]:
    """Poll every 0.5 s (sbatch --wait polls far more slowly) until the job has finished."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = job_info(job_id)
        if info.get("JobState") in FINISHED:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} still {job_info(job_id).get('JobState')} after "
                         f"{timeout} s")


def trained_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every stage's best and final weights under a run directory."""
    out = {}
    for path in sorted(run_dir.glob("*/*_model.pt")):
        out[str(path.relative_to(run_dir))] = torch.load(path, map_location="cpu",
                                                         weights_only=True)
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}: {key} differs"


def test_two_nodes_match_one_node_and_no_argument_reaches_a_shell(cluster, tmp_path):
    if len(cluster["nodes"]) < 2:
        pytest.skip(f"the cluster has one node ({cluster['nodes']}); .ci/slurm.sh starts two")
    hostile = tmp_path / "two nodes; touch pwned_semicolon $(touch pwned_subst) `touch pwned_tick`"
    two = sbatch(cluster, tmp_path, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                 "-o", "two.out", str(REPO / "slurm" / "distill.sh"), str(TINY),
                 f"run_dir={hostile}", *OVERRIDES)
    # the reference: one node, two tasks, scheduled on the GPU partition (fake GPUs: the ranks
    # find no CUDA device and train on CPU, as on a CPU partition)
    one = sbatch(cluster, tmp_path, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                 "--partition=gpu", "--gpus-per-node=2", "-o", "one.out",
                 str(REPO / "slurm" / "distill.sh"), str(TINY),
                 f"run_dir={tmp_path / 'one_node'}", *OVERRIDES)
    info_two, info_one = wait_job(two, 240), wait_job(one, 240)
    log_two, log_one = (tmp_path / "two.out").read_text(), (tmp_path / "one.out").read_text()
    assert info_two["JobState"] == "COMPLETED", log_two[-3000:]
    assert info_one["JobState"] == "COMPLETED", log_one[-3000:]

    nodes = info_two["NodeList"]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                           text=True, check=True).stdout.split()
    assert len(hosts) == 2
    port = 15000 + int(two) % 15000
    assert f"master {hosts[0]}:{port}" in log_two
    assert f"rank 0 of 2 on {hosts[0]}" in log_two and f"rank 1 of 2 on {hosts[1]}" in log_two
    one_host = info_one["NodeList"]
    assert f"rank 0 of 2 on {one_host}" in log_one and f"rank 1 of 2 on {one_host}" in log_one
    assert "kdhpc.distill finished" in log_two and "kdhpc.distill finished" in log_one

    # the hostile run_dir was a directory name, nothing else
    assert (hostile / "report.md").is_file()
    assert not list(tmp_path.glob("pwned*")) and not list(REPO.glob("pwned*"))
    # 2 ranks on 2 nodes and 2 ranks on 1 node: the same weights in every stage
    assert_same_weights(trained_weights(hostile), trained_weights(tmp_path / "one_node"))

    # slurm/teacher_cache.sh, one shard per rank on two nodes, from the trained teacher: the
    # same targets as the cache the recipe filled itself
    from kdhpc.teacher import CachedTeacher

    teacher = tmp_path / "one_node" / "teacher" / "best_model.pt"
    cache = sbatch(cluster, tmp_path, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                   "-o", "cache.out", str(REPO / "slurm" / "teacher_cache.sh"), str(TINY),
                   f"model.teacher_checkpoint={teacher}",
                   f"teacher.cache_dir={tmp_path / 'cache'}", *OVERRIDES)
    info = wait_job(cache, 180)
    assert info["JobState"] == "COMPLETED", (tmp_path / "cache.out").read_text()[-3000:]
    ours = CachedTeacher(tmp_path / "cache")
    recipes = CachedTeacher(tmp_path / "one_node" / "teacher_cache")
    assert (ours.num_samples, ours.num_views) == (recipes.num_samples, recipes.num_views)
    everything = {"index": torch.arange(ours.num_samples).repeat_interleave(ours.num_views),
                  "view": torch.arange(ours.num_views).repeat(ours.num_samples)}
    a, b = ours.targets(everything), recipes.targets(everything)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigusr1_checkpoints_requeues_and_resumes(cluster, tmp_path):
    run_dir = tmp_path / "preempted"
    job = sbatch(cluster, tmp_path, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                 "-o", "job.out", str(REPO / "slurm" / "distill.sh"), str(TINY),
                 f"run_dir={run_dir}", *LONGER)
    out = tmp_path / "job.out"
    requeued = "rank 0: checkpointed after a preemption signal; requeueing job"
    end = time.monotonic() + 180
    while not (run_dir / "teacher" / "checkpoints" / "latest").is_file():
        assert time.monotonic() < end and job_info(job).get("JobState") not in FINISHED, (
            out.read_text()[-3000:])
        time.sleep(0.1)
    # SLURM's warning signal, as --signal=USR1@120 sends it before a time limit. The engine
    # acts on it during training (at a step before the last); elsewhere the rank ignores it.
    # So warn every 0.5 s until rank 0 says it checkpointed and requeued the job.
    sent = 0
    while requeued not in out.read_text():
        assert time.monotonic() < end and job_info(job).get("JobState") not in FINISHED, (
            f"no requeue after {sent} SIGUSR1:\n" + out.read_text()[-3000:])
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        sent += 1
        time.sleep(0.5)
    info = wait_job(job, 240)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert int(info["Restarts"]) == 1, log[-3000:]
    assert f"{requeued} {job}" in log and f"job {job} (restart 1)" in log
    # resumed, not restarted: every stage trained each of its steps exactly once
    logs = sorted(run_dir.glob("*/train_log.csv"))
    assert len(logs) >= 4
    for path in logs:
        with path.open() as fh:
            steps = [int(row["step"]) for row in csv.DictReader(fh)]
        assert steps == list(range(1, 7)), (path, steps)


def _rank_pid(job: str, rank: int) -> int | None:
    """The pid of ``python -m kdhpc.distill`` of ``rank`` in ``job`` (all nodes are this host)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(item.split("=", 1) for item in
                       (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(rank)
                and cmdline[1:3] == [b"-m", b"kdhpc.distill"]):
            return int(proc.name)
    return None


def test_one_failing_rank_fails_the_whole_job_at_once(cluster, tmp_path):
    run_dir = tmp_path / "failing"
    job = sbatch(cluster, tmp_path, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                 "-o", "job.out", str(REPO / "slurm" / "distill.sh"), str(TINY),
                 f"run_dir={run_dir}", *LONGER)
    end = time.monotonic() + 180
    while not (run_dir / "teacher" / "checkpoints" / "latest").is_file():
        assert time.monotonic() < end and job_info(job).get("JobState") not in FINISHED
        time.sleep(0.1)
    pid = _rank_pid(job, 1)
    assert pid is not None
    os.kill(pid, 9)   # rank 1 dies in the middle of training; rank 0 waits in a collective
    killed = time.monotonic()
    info = wait_job(job, 120)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "FAILED" and int(info["Restarts"]) == 0, log[-3000:]
    assert time.monotonic() - killed < 60    # srun --kill-on-bad-exit: no hang in gloo
    assert "requeueing" not in log and "kdhpc.distill finished" not in log


SWEEP_FILE = REPO / "configs" / "sweeps" / "recon_tiny_2x2.yaml"


SEG_SWEEP_FILE = REPO / "configs" / "sweeps" / "seg_tiny_2x2.yaml"


def _sweep(cluster: dict, cwd: Path, sweep_dir: Path, executor: str,
           sweep_file: Path = SWEEP_FILE) -> str:
    out = subprocess.run([sys.executable, "-m", "kdhpc.sweep", str(sweep_file), "--executor",
                          executor, "--sweep-dir", str(sweep_dir)], cwd=cwd, env=cluster["env"],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_sweep_through_slurm_matches_the_same_sweep_run_locally(cluster, tmp_path):
    import numpy as np
    import scipy.stats

    on_slurm = tmp_path / "sweep slurm; touch pwned"
    log = _sweep(cluster, tmp_path, on_slurm, "slurm")
    assert "stage B: job array" in log and "(4 trials, at most 4 at once)" in log
    assert not list(tmp_path.glob("pwned*"))
    # stage A trained the teacher once; every trial reads it through a link
    assert (on_slurm / "shared" / "teacher" / "stage.json").is_file()
    trials = sorted(p.name for p in (on_slurm / "trials").iterdir())
    assert trials == ["alpha0-temperature1", "alpha0-temperature2", "alpha0.5-temperature1",
                      "alpha0.5-temperature2"]
    for name in trials:
        link = on_slurm / "trials" / name / "teacher"
        assert link.is_symlink() and link.resolve() == (on_slurm / "shared" / "teacher").resolve()
    # the table against the trials' own per-volume values
    rows = {(r["trial"], r["metric"]): r
            for r in csv.DictReader((on_slurm / "sweep.csv").open())}
    record = json.loads((on_slurm / "trials" / "alpha0.5-temperature2" / "trial.json").read_text())
    reference = json.loads((on_slurm / "trials" / "alpha0-temperature2" / "trial.json").read_text())
    headline = record["result"]["metrics"][0]
    values = record["result"]["per_volume"]["student"][headline]
    row = rows[("alpha0.5-temperature2", headline)]
    assert float(row["mean"]) == pytest.approx(float(np.mean(values)), rel=1e-12)
    expected = scipy.stats.ttest_rel(values, reference["result"]["per_volume"]["student"][headline])
    if np.isfinite(expected.pvalue):
        assert float(row["p_value"]) == pytest.approx(expected.pvalue, rel=1e-9)
    assert (on_slurm / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    # the same sweep without SLURM: the same table, byte for byte
    local = tmp_path / "local"
    _sweep(cluster, tmp_path, local, "local")
    assert (local / "sweep.csv").read_text() == (on_slurm / "sweep.csv").read_text()

    # a rerun skips the finished work and retries a trial that has no record (a failed one)
    (local / "trials" / "alpha0.5-temperature1" / "trial.json").unlink()
    log = _sweep(cluster, tmp_path, local, "local")
    assert "stage A: done before" in log
    assert "stage B: 1 of 4 trials to run (3 finished before)" in log
    assert (local / "sweep.csv").read_text() == (on_slurm / "sweep.csv").read_text()


def test_segmentation_alpha_temperature_sweep_runs_on_slurm(cluster, tmp_path):
    """Cui et al.'s W x T grid on the cluster: one teacher and one logit cache in stage A, four
    trials in a job array; the temperature reaches the KD student (other weights per T)."""
    sweep_dir = tmp_path / "seg"
    log = _sweep(cluster, tmp_path, sweep_dir, "slurm", SEG_SWEEP_FILE)
    assert "stage B: job array" in log
    shared = json.loads((sweep_dir / "shared" / "sweep_shared.json").read_text())["stages"]
    assert {"data", "teacher", "teacher_cache", "student_nokd"} <= set(shared)
    rows = list(csv.DictReader((sweep_dir / "sweep.csv").open()))
    assert {r["trial"] for r in rows} == {"alpha0.5-temperature1", "alpha0.5-temperature4",
                                          "alpha1-temperature1", "alpha1-temperature4",
                                          "teacher"}
    for alpha in ("0.5", "1"):
        weights = []
        for t in ("1", "4"):
            trial = sweep_dir / "trials" / f"alpha{alpha}-temperature{t}"
            record = json.loads((trial / "student_kd" / "stage.json").read_text())["result"]
            weights.append((trial / record["weights"]).read_bytes())  # run-relative
        assert weights[0] != weights[1]
