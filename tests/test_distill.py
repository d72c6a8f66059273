"""Resumable stages: skip when unchanged, rerun what a change affects, restart a changed stage
from an empty folder."""

import json

from kdhpc.recipe import STAGE_RECORD, Stages


def test_stages_skip_rerun_and_propagate(tmp_path):
    calls = []

    def make(name, value):
        def fn(stage_dir):
            calls.append(name)
            (stage_dir / "artifact.txt").write_text(str(value))
            return {"value": value}
        return fn

    def pipeline(teacher_lr, student_alpha):
        stages = Stages(tmp_path, log=lambda msg: None)
        teacher = stages.run("teacher", {"lr": teacher_lr}, make("teacher", teacher_lr * 10))
        student = stages.run("student", {"alpha": student_alpha, "teacher": teacher},
                             make("student", student_alpha + teacher["value"]))
        return stages, teacher, student

    stages, teacher, student = pipeline(0.1, 0.5)
    assert calls == ["teacher", "student"] and student["value"] == 0.5 + 1.0
    record = json.loads((tmp_path / "teacher" / STAGE_RECORD).read_text())
    assert record["result"] == teacher and record["digest"] == teacher["digest"]

    calls.clear()
    stages, _, again = pipeline(0.1, 0.5)               # nothing changed: both skipped
    assert calls == [] and stages.skipped == ["teacher", "student"] and again == student

    stages, _, changed = pipeline(0.1, 0.25)             # only the student's input changed
    assert calls == ["student"] and changed["value"] == 0.25 + 1.0

    calls.clear()
    stages, _, downstream = pipeline(0.2, 0.25)          # the teacher changed: both rerun
    assert calls == ["teacher", "student"] and downstream["value"] == 0.25 + 2.0


def test_changed_stage_starts_from_an_empty_folder_but_unfinished_one_resumes(tmp_path):
    seen = []

    def fn(stage_dir):
        seen.append(sorted(p.name for p in stage_dir.iterdir()))
        (stage_dir / "checkpoint").write_text("x")
        return {}

    stages = Stages(tmp_path, log=lambda msg: None)
    stages.run("s", {"a": 1}, fn)
    (tmp_path / "s" / STAGE_RECORD).unlink()             # as if killed before finishing
    stages.run("s", {"a": 1}, fn)                         # same inputs: keeps its checkpoint
    assert "checkpoint" in seen[-1]
    stages.run("s", {"a": 2}, fn)                         # new inputs: old checkpoint removed
    assert "checkpoint" not in seen[-1]


def test_signal_between_stages_stops_at_the_next_boundary_after_recording(tmp_path):
    import os
    import signal

    import pytest

    from kdhpc import train

    previous = {sig: signal.getsignal(sig) for sig in train.PREEMPT_SIGNALS}
    train.install_preemption_handlers()
    try:
        stages = Stages(tmp_path, log=lambda msg: None)

        def finish_then_signal(stage_dir):
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives after the stage's last training step
            return {"ok": 1}

        with pytest.raises(train.Preempted) as stop:
            stages.run("a", {}, finish_then_signal)
        assert stop.value.code == train.EXIT_REQUEUE and "after a" in str(stop.value)
        assert stages.record("a")["result"]["ok"] == 1       # the finished stage is kept
        assert not train.preemption_requested()              # consumed by the raise
        stages.run("b", {}, lambda d: {})                     # a caller may go on
        assert stages.record("b") is not None
    finally:
        train._preempt_requested = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)
