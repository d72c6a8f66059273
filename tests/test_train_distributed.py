"""kdhpc.train on two CPU ranks (gloo) through torchrun, against one rank, plus kill-and-resume.

Launches (each imports DeepSpeed once and runs several scenarios):
- ``torchrun --nproc-per-node=2 tests/test_train_distributed.py kill KILL``: the ZeRO-0 scenario
  with SIGTERM sent to rank 1 only, after step 2 (launched through ``tests/drills.py``);
- ``torchrun --nproc-per-node=2 tests/test_train_distributed.py matrix OUT KILL``: the restart,
  which resumes KILL, then ZeRO 0, 1, 2, 3 (fp32, stage 3 with every parameter partitioned) and
  ZeRO 1 in bf16, each with a streamed teacher kept outside the engine, 6 steps with
  evaluation and checkpoints;
- ``python tests/test_train_distributed.py reference OUT`` (no launcher: rank 0 of 1), running
  meanwhile: the ZeRO-0 scenario at the same global batch, which every 2-rank run must match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCENARIOS = {"z0": (0, "fp32"), "z1": (1, "fp32"), "z2": (2, "fp32"), "z3": (3, "fp32"),
             "z1_bf16": (1, "bf16")}


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _torchrun(*args: str, drill: tuple[str, ...] = ()) -> list[str]:
    """torchrun of this file; with ``drill`` (tests/drills.py options), through that launcher."""
    launch = [str(HERE / "drills.py"), *drill] if drill else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "--max-restarts=0", *launch, str(Path(__file__)), *args]


def _run(cmd: list[str], **env) -> subprocess.Popen:
    # A session of its own, so that a hung launch can be killed with all its workers.
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch timed out after {timeout} s: {' '.join(proc.args)}\n{out[-3000:]}")
    return proc.returncode, out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    one = _run([sys.executable, str(Path(__file__)), "reference", str(root / "one")])
    killed = _run(_torchrun("kill", str(root / "kill"),
                            drill=("--sigterm-at-step", "2", "--rank", "1")))
    rc_killed, out_killed = _finish(killed)
    after_kill = sorted(p.name for p in (root / "kill" / "z0" / "checkpoints").glob("step*"))
    # The restart resumes the killed run, then runs the ZeRO matrix in the same processes.
    two = _run(_torchrun("matrix", str(root / "two"), str(root / "kill")))
    rc_two, out_two = _finish(two)
    assert rc_two == 0, out_two[-4000:]
    rc_one, out_one = _finish(one)
    assert rc_one == 0, out_one[-4000:]
    return {"root": root, "killed": (rc_killed, out_killed), "after_kill": after_kill}


def test_two_ranks_agree_with_one_rank_for_every_zero_stage(launches):
    root = launches["root"]
    init = _weights(root / "one" / "init.pt")
    assert _max_diff(_weights(root / "two" / "init.pt"), init) == 0
    reference = _weights(root / "one" / "z0" / "final_model.pt")
    moved = _max_diff(reference, init)
    assert moved > 0.02  # 6 Adam steps at lr 1e-2: a run that did not train cannot pass below
    one = json.loads((root / "one" / "z0" / "summary.json").read_text())
    assert one["world_size"] == 1 and one["steps"] == 6
    for name, (stage, precision) in SCENARIOS.items():
        summary = json.loads((root / "two" / name / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 6
        assert summary["zero_stage"] == stage
        two = _weights(root / "two" / name / "final_model.pt")
        assert _max_diff(two, reference) < (2e-2 if precision == "bf16" else 2e-5), name
        # Evaluation: per-volume sums all-reduced across ranks give the 1-rank metrics.
        assert [h["step"] for h in summary["history"]] == [3, 6]  # eval_every=3
        for h1, h2 in zip(one["history"], summary["history"]):
            rel = 5e-2 if precision == "bf16" else 1e-4
            assert h2["val_loss"] == pytest.approx(h1["val_loss"], rel=rel), name


def test_zero3_partitions_the_student_on_each_rank(launches):
    summary = json.loads((launches["root"] / "two" / "z3" / "summary.json").read_text())
    # Each rank holds about half of every parameter (ZeRO-3), the teacher none of it.
    total = summary["student_numel"]
    assert sum(summary["local_numel"]) >= total
    assert max(summary["local_numel"]) < 0.75 * total
    assert summary["teacher_in_engine"] is False


def test_zero_to_fp32_converts_the_two_rank_zero3_checkpoint(launches):
    # DeepSpeed's converter reads a kdhpc checkpoint (the client state and the file-hash
    # record beside its own files do not disturb it) and gives the gathered final weights.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = launches["root"] / "two" / "z3"
    ckpt = run / "checkpoints"
    tag = (ckpt / "latest").read_text()
    converted = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    final = _weights(run / "final_model.pt")
    assert converted.keys() == final.keys()
    for key in final:
        assert torch.equal(converted[key].float(), final[key]), key


def test_sigterm_on_one_rank_checkpoints_all_and_resume_matches(launches):
    root = launches["root"]
    rc, out = launches["killed"]
    assert rc != 0, out[-3000:]
    exits = [json.loads((root / "kill" / f"exit_rank{r}.json").read_text()) for r in range(2)]
    # Rank 1 got the signal after step 2; the ranks agreed at the next all-reduce and both
    # stopped after step 3 with the requeue exit code.
    assert [(e["code"], e["step"]) for e in exits] == [(75, 3), (75, 3)]
    assert launches["after_kill"] == ["step00000002", "step00000003"]
    ckpt = root / "kill" / "z0" / "checkpoints"
    summary = json.loads((root / "kill" / "z0" / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and summary["steps"] == 6
    final = _weights(root / "kill" / "z0" / "final_model.pt")
    uninterrupted = _weights(root / "two" / "z0" / "final_model.pt")
    for key in uninterrupted:
        assert torch.equal(final[key], uninterrupted[key]), key
    # keep_last=2 after the resumed run's checkpoints at 4 and 6
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000004", "step00000006"]
    # Logs: each step once, despite the restart.
    steps = [json.loads(line)["step"] for line in
             (root / "kill" / "z0" / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# worker (run by torchrun or plain python)

def _scenario(name: str, out: Path) -> None:
    import torch.distributed as dist

    from kdhpc import train as T
    from kdhpc.teacher import StreamTeacher
    from test_train import ToyViews, toy_config, toy_extract, toy_loss, toy_student, toy_teacher

    stage, precision = SCENARIOS[name]
    cfg = toy_config(stage, precision)
    if stage == 3:
        # Partition every parameter (the shipped template keeps small ones whole, as DeepSpeed
        # does by default), so that this tiny student really is sharded.
        template = json.loads((REPO / "configs" / "deepspeed" / "zero3_fp32.json").read_text())
        template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = out / "zero3_all_partitioned.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(template))
        cfg.train.deepspeed_config = str(path)
    student = toy_student()
    teacher = StreamTeacher(toy_teacher(), toy_extract)
    result = T.train(cfg, student, toy_loss, ToyViews(), val_set=ToyViews(3, 3, seed=1),
                     teacher=teacher, run_dir=out / name, progress=False)
    local = [0]
    if stage == 3:
        local = [sum(p.ds_tensor.numel() for p in student.parameters())]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local[0])
    if dist.get_rank() == 0:
        summary = {"world_size": dist.get_world_size(), "steps": result.steps,
                   "zero_stage": stage, "history": result.history,
                   "resumed_from": result.resumed_from, "local_numel": gathered,
                   "student_numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                        for p in student.parameters()),
                   "teacher_in_engine": any(hasattr(p, "ds_id") for p in teacher.model.parameters())}
        (out / name / "summary.json").write_text(json.dumps(summary))


def main(argv: list[str]) -> None:
    mode, out = argv[0], Path(argv[1])
    sys.path.insert(0, str(HERE))
    from kdhpc import train as T
    from test_train import toy_student

    T.init_distributed()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(toy_student().state_dict(), out / "init.pt")
    if mode == "reference":
        _scenario("z0", out)
        return
    if mode == "matrix":
        if len(argv) > 2:  # restart of a killed run first
            _scenario("z0", Path(argv[2]))
        for name in SCENARIOS:
            _scenario(name, out)
        return
    try:
        _scenario("z0", out)
    except SystemExit as stop:
        step = getattr(stop, "step", None)
        (out / f"exit_rank{dist.get_rank()}.json").write_text(
            json.dumps({"code": stop.code, "step": step}))
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
    # Leave together and close the group: a rank that exits while its peer is still in the
    # group's last collective can abort at interpreter exit (SIGABRT seen on a busy machine).
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
