"""Entry points as a user runs them: ``--help`` everywhere, and ``kdhpc.teacher.cache`` turning
bad input into one line on stderr (the key or path, expected, found) with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ["kdhpc.teacher.cache", "kdhpc.segment", "kdhpc.data.default", "kdhpc.distill",
                "kdhpc.sweep", "kdhpc.teacher.ship", "kdhpc.predict", "kdhpc.evaluate",
                "kdhpc.export", "kdhpc.bench"]
CACHE = [sys.executable, "-m", "kdhpc.teacher.cache"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def _run_all(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run the commands side by side (each imports torch once) and collect their results."""
    procs = [subprocess.Popen(c, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    results = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def test_every_entry_point_prints_help_and_nothing_on_stderr(tmp_path):
    results = _run_all([[sys.executable, "-W", "error::RuntimeWarning", "-m", name, "--help"]
                        for name in ENTRY_POINTS], tmp_path)
    for name, result in zip(ENTRY_POINTS, results):
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout.startswith(f"usage: python -m {name} "), name
        assert result.stderr == "", name


def test_teacher_cache_bad_input_is_one_line_with_exit_2(tmp_path, capsys):
    from kdhpc.models import build_model
    from kdhpc.teacher.cache.__main__ import main

    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("dccnn_teacher").state_dict(), teacher)
    config = REPO / "configs" / "recon_default.yaml"
    run = f"run_dir={tmp_path / 'run'}"
    cases = {
        "missing config": ([str(tmp_path / "nope.yaml")],
                           f"{tmp_path / 'nope.yaml'}: config file not found"),
        "unknown key": ([str(config), "optim.lrr=1e-4"],
                        "command line: optim.lrr: unknown key; expected one of name, lr"),
        "bad value": ([str(config), "optim.lr=fast"],
                      "command line: optim.lr: expected a number, found 'fast'"),
        "missing teacher": ([str(config), run, f"model.teacher_checkpoint={tmp_path / 'no.pt'}"],
                            f"model.teacher_checkpoint: expected a weights file or "
                            f"pretrained:<name>, found '{tmp_path / 'no.pt'}' (no such file)"),
        "missing data": ([str(config), run, f"model.teacher_checkpoint={teacher}",
                          "data.dataset=fastmri", f"data.root={tmp_path / 'none'}"],
                         f"data.root: expected one of the folders singlecoil_train, train under "
                         f"{tmp_path / 'none'} for split 'train', found none"),
    }
    for case, (args, message) in cases.items():
        assert main(args) == 2, case
        err = capsys.readouterr().err
        assert err.startswith(f"python -m kdhpc.teacher.cache: error: {message}"), (case, err)
        assert err.count("\n") == 1, (case, err)
    assert not (tmp_path / "run").exists()  # nothing was written for a refused input
    # The same through the real entry point: one line, no traceback, no runpy warning.
    (result,) = _run_all([CACHE + cases["unknown key"][0]], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("python -m kdhpc.teacher.cache: error: command line: "
                                    "optim.lrr: unknown key") and result.stderr.count("\n") == 1


def test_teacher_cache_verify_of_no_cache_names_the_manifest(tmp_path, capsys):
    from kdhpc.teacher.cache.__main__ import main

    assert main([str(REPO / "configs" / "recon_default.yaml"), f"run_dir={tmp_path}",
                 "--verify"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.splitlines()[0] == (
        f"{tmp_path / 'teacher_cache' / 'manifest.json'}: missing: no teacher cache here; fill it "
        f"with python -m kdhpc.teacher.cache CONFIG")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_recipe_mistakes_exit_2_in_one_line_and_leave_a_finished_run_as_it_was(tmp_path, capsys,
                                                                                monkeypatch):
    from kdhpc import distill

    monkeypatch.setenv("KDHPC_DATA", str(tmp_path / "data"))
    config = str(REPO / "configs" / "recon_tiny.yaml")
    run_dir = tmp_path / "run"
    assert distill.main([config, f"run_dir={run_dir}", "train.progress=false"]) == 0
    finished = _tree(run_dir)
    capsys.readouterr()
    mistakes = {
        "unknown model": (["model.student=dccnn_tiniest"], "model name: expected one of"),
        "missing data.root": (["data.dataset=fastmri", f"data.root={tmp_path / 'none'}"],
                              "data.root: expected a dataset folder"),
        "wrong dataset kind": (["data.dataset=default_cardiac"], "data.dataset: expected"),
        "missing teacher": ([f"model.teacher_checkpoint={tmp_path / 'no.pt'}"],
                            "model.teacher_checkpoint: expected a weights file"),
        "unknown recipe": (["recipe=nope"], "recipe: expected one of"),
    }
    for case, (overrides, message) in mistakes.items():
        assert distill.main([config, f"run_dir={run_dir}", *overrides]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (case, err)
        assert _tree(run_dir) == finished, case
