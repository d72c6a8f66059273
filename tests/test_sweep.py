"""kdhpc.sweep without a cluster: grid parsing, trial names, plans, shared stages, job options,
the dry run and the aggregation (against scipy directly). The sweeps that really run, through
SLURM and locally, are in tests/test_slurm.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from kdhpc.config import ConfigError, digest, load_config, to_dict, write_atomic
from kdhpc.recipe import Stages
from kdhpc.sweep import (TRIAL_RECORD, SlurmOptions, SweepError, TrialStages, aggregate,
                         parse_grid, plan_sweep, read_sweep_file, check_recipe,
                         resolve_executor, safe_name, stage_key, trial_names)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "enh_tiny.yaml"  # any committed recipe config: only loaded here


def test_grid_ranges_are_inclusive_and_rounded_lists_are_yaml_scalars():
    grid = parse_grid(["loss.alpha=0:1:0.25", "loss.temperature=1,2,4.5",
                       "train.seed=7", "loss.at_mode=paper,kdmri_code"])
    assert grid[0] == ("loss.alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
    assert grid[1] == ("loss.temperature", [1, 2, 4.5])
    assert grid[2] == ("train.seed", [7])
    assert grid[3] == ("loss.at_mode", ["paper", "kdmri_code"])
    tenths = parse_grid(["loss.alpha=0:0.3:0.1"])[0][1]
    assert tenths == [0.0, 0.1, 0.2, 0.3]       # not 0.30000000000000004, and 0.3 included


@pytest.mark.parametrize("spec, words", [
    ("loss.alpha", "expected KEY=VALUES"),
    ("loss.alpha=1:0:0.5", "stop >= start"),
    ("loss.alpha=0:1:0", "step > 0"),
    ("loss.alpha=0:x:0.5", "'x' is not a number"),
    ("loss.alpha=0.5,0.5", "appears twice"),
    ("run_dir=a,b", "set by the sweep itself"),
    ("loss.alpha=1:2", "expected KEY=start:stop:step"),
])
def test_bad_grid_specs_are_refused_with_the_reason(spec, words):
    with pytest.raises(SweepError, match=words):
        parse_grid([spec])


def test_a_key_swept_twice_is_refused():
    with pytest.raises(SweepError, match="already swept"):
        parse_grid(["loss.alpha=0,1", "loss.alpha=0.5"])


def test_trial_names_are_deterministic_unique_and_safe():
    grid = parse_grid(["loss.alpha=0:1:0.5", "loss.temperature=1,2"])
    named = trial_names(grid)
    assert [n for n, _ in named] == [
        "alpha0-temperature1", "alpha0-temperature2", "alpha0.5-temperature1",
        "alpha0.5-temperature2", "alpha1-temperature1", "alpha1-temperature2"]
    assert named[3][1] == {"loss.alpha": 0.5, "loss.temperature": 2}
    assert trial_names(grid) == named
    # two swept keys with one last component are told apart by their whole dotted key
    both = trial_names([("model.teacher", ["a"]), ("loss.teacher", ["a"])])
    assert both[0][0] == "model_teacher_a-loss_teacher_a"
    # values that differ only in characters a name cannot hold collide: refused
    with pytest.raises(SweepError, match="both get the trial name"):
        trial_names([("run_tag", ["a;b", "a b"])])
    assert safe_name("x; touch /tmp/pwned\n$(id)") == "x_touch_tmp_pwned_id_"


def test_plan_resolves_every_trial_and_shares_one_cache(tmp_path):
    plan = plan_sweep(str(TINY), ["train.max_steps=1"],
                      ["loss.alpha=0,0.5", "loss.temperature=1,3"], tmp_path / "sw")
    assert len(plan.trials) == 4
    for trial in plan.trials:
        assert trial.cfg.loss.alpha == trial.point["loss.alpha"]
        assert trial.cfg.loss.temperature == trial.point["loss.temperature"]
        assert trial.cfg.train.max_steps == 1
        assert Path(trial.cfg.run_dir) == tmp_path / "sw" / "trials" / trial.name
        assert trial.cfg.teacher.cache_dir == str(tmp_path / "sw" / "shared" / "teacher_cache")
    assert Path(plan.shared_cfg.run_dir) == tmp_path / "sw" / "shared"
    assert plan.shared_cfg.teacher.cache_dir == plan.trials[0].cfg.teacher.cache_dir


def test_plan_checks_every_grid_value_like_an_override(tmp_path):
    with pytest.raises(ConfigError, match="loss.alpha: expected a value in"):
        plan_sweep(str(TINY), [], ["loss.alpha=0,1.5"], tmp_path)
    with pytest.raises(SweepError, match="control character or '%'"):
        plan_sweep(str(TINY), [], ["loss.alpha=0"], tmp_path / "a%jb")


def test_a_config_that_names_no_runnable_recipe_is_refused_naming_the_recipes(tmp_path):
    plan = plan_sweep(str(TINY), ["recipe=data"], ["loss.alpha=0"], tmp_path)
    with pytest.raises(SweepError, match=r"recipe 'data': recipe: expected one of "
                                         r"reconstruction, superres, enhancement, segmentation"):
        check_recipe(plan.shared_cfg)


def test_stage_key_is_the_digest_stages_records(tmp_path):
    depends = {"lr": 0.1, "nested": {"a": [1, 2]}}
    Stages(tmp_path, log=lambda m: None).run("teacher", depends, lambda d: {"x": 1})
    record = json.loads((tmp_path / "teacher" / "stage.json").read_text())
    assert stage_key("teacher", depends) == record["digest"]
    assert stage_key("teacher", {**depends, "lr": 0.2}) != record["digest"]


def test_trial_stages_reuse_shared_results_and_never_touch_them(tmp_path):
    shared, trial_dir = tmp_path / "shared", tmp_path / "trials" / "t0"
    calls = []

    def fn(name, value):
        def run(stage_dir):
            calls.append((name, stage_dir))
            (stage_dir / "weights.txt").write_text(str(value))
            return {"weights": f"{name}/weights.txt", "value": value}
        return run

    stage_a = Stages(shared, log=lambda m: None)
    teacher = stage_a.run("teacher", {"lr": 1}, fn("teacher", 10))
    calls.clear()

    stages = TrialStages(trial_dir, shared, ["teacher"], log=lambda m: None)
    again = stages.run("teacher", {"lr": 1}, fn("teacher", 99))
    student = stages.run("student", {"teacher": again, "alpha": 0.5}, fn("student", 3))
    assert again == teacher and stages.skipped == ["teacher"]
    assert calls == [("student", trial_dir / "student")]   # only the trial's own stage ran
    # the recipe's run_dir-relative path reaches the shared file through the link
    assert (trial_dir / again["weights"]).read_text() == "10"
    assert (trial_dir / "teacher").is_symlink()
    assert student["value"] == 3 and (trial_dir / "student" / "stage.json").is_file()

    # a trial whose inputs to a shared stage differ is refused; the shared stage is intact
    with pytest.raises(SweepError, match="shared stage 'teacher': this trial's inputs differ"):
        TrialStages(tmp_path / "trials" / "t1", shared, ["teacher"],
                    log=lambda m: None).run("teacher", {"lr": 2}, fn("teacher", 0))
    assert (shared / "teacher" / "weights.txt").read_text() == "10"
    assert json.loads((shared / "teacher" / "stage.json").read_text())["result"] == teacher
    with pytest.raises(SweepError, match="no finished record"):
        TrialStages(trial_dir, shared, ["teacher_cache"], log=lambda m: None).run(
            "teacher_cache", {}, fn("teacher_cache", 0))


@pytest.mark.parametrize("extra, words", [
    ({"x\nrm -rf /": "1"}, "expected an sbatch option name"),
    ({"Constraint": "a100"}, "expected an sbatch option name"),
    ({"comment": "ok\n#SBATCH --wrap=id"}, "control character"),
])
def test_slurm_options_refuse_anything_that_could_become_a_script_line(extra, words):
    with pytest.raises(SweepError, match=words):
        SlurmOptions(extra=extra).check()
    with pytest.raises(SweepError, match="control character"):
        SlurmOptions(partition="gpu\nsrun id").check()


def test_sweep_files_resolve_their_config_and_grid_and_refuse_unknown_keys(tmp_path):
    assert read_sweep_file(TINY) is None            # a recipe config is not a sweep file
    for path in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        spec = read_sweep_file(path)
        assert spec is not None and Path(spec["config"]).is_file(), path
        plan = plan_sweep(spec["config"], spec["overrides"], spec["grid"], tmp_path / path.stem)
        SlurmOptions(**spec["slurm"]).check()
        assert len(plan.trials) == int(np.prod([len(v) for _, v in plan.grid]))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"config: {TINY}\ngrid:\n  loss.alpha: [0, 0.5]\n"
                     f"  loss.temperature: '1:3:1'\n")
    spec = read_sweep_file(sweep)
    assert parse_grid(spec["grid"]) == [("loss.alpha", [0, 0.5]),
                                        ("loss.temperature", [1.0, 2.0, 3.0])]
    sweep.write_text(f"config: {TINY}\ngrid: {{loss.alpha: [0]}}\nslurm_options: {{}}\n")
    with pytest.raises(SweepError, match="unknown key.*slurm_options"):
        read_sweep_file(sweep)
    sweep.write_text(f"config: {TINY}\ngrid: {{loss.alpha: [0]}}\nslurm: {{nodes: two}}\n")
    with pytest.raises(SweepError, match="--nodes: expected an integer, found 'two'"):
        SlurmOptions(**read_sweep_file(sweep)["slurm"]).check()


def test_auto_executor_is_slurm_exactly_when_sbatch_is_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))          # a laptop: no sbatch
    assert resolve_executor("auto") == "local" and resolve_executor("local") == "local"
    with pytest.raises(SweepError, match="sbatch is not on PATH"):
        resolve_executor("slurm")
    sbatch = tmp_path / "sbatch"                        # a login node: sbatch is there
    sbatch.write_text("#!/bin/sh\nexit 1\n")
    sbatch.chmod(0o755)
    assert resolve_executor("auto") == "slurm"
    with pytest.raises(SweepError, match="expected one of auto, slurm, local"):
        resolve_executor("kubernetes")


def test_dry_run_prints_the_plan_and_sbatch_scripts_and_submits_nothing(tmp_path):
    sweep_dir = tmp_path / "sw x; touch pwned"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "kdhpc.sweep", str(TINY), "--grid", "loss.alpha=0:1:0.5",
         "--grid", "loss.temperature=1,2", "--dry-run", "--executor", "local",
         "--sweep-dir", str(sweep_dir), "--cpus-per-task", "2", "--array-parallelism", "3",
         "--slurm-arg", "constraint=a100", f"run_dir={tmp_path}/ignored"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "stage B: 6 trials, at most 3 at once" in text
    assert "alpha0.5-temperature2: loss.alpha=0.5 loss.temperature=2" in text
    assert "#SBATCH --array=0-5%3" in text and "#SBATCH --constraint=a100" in text
    assert "#SBATCH --cpus-per-task=2" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --signal=USR2@120" in text
    assert "#SBATCH --job-name=kdhpc-sweep-sw_x_touch_pwned-trials" in text
    assert not sweep_dir.exists() and not (tmp_path / "pwned").exists()


def test_command_line_values_win_over_the_sweep_file(tmp_path, capsys):
    from kdhpc.sweep import main

    code = main([str(REPO / "configs" / "sweeps" / "recon_tiny_2x2.yaml"), "--dry-run",
                 "--executor", "local", "--sweep-dir", str(tmp_path / "sw"),
                 "--grid", "loss.alpha=0.25", "--array-parallelism", "1", "train.seed=5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "stage B: 2 trials, at most 1 at once:" in out
    assert "alpha0.25-temperature1: loss.alpha=0.25 loss.temperature=1" in out
    assert "#SBATCH --time=15" in out and "#SBATCH --array=0-1%1" in out
    assert main([str(TINY), "--dry-run", "--grid", "loss.alpha=3"]) == 2
    assert "loss.alpha: expected a value in [0.0, 1.0], found 3" in capsys.readouterr().err


def _write_trial(plan, trial, student, teacher, volumes, no_kd=None):
    per_volume = {"student": student, "teacher": teacher}
    if no_kd is not None:
        per_volume["no_kd"] = no_kd
    record = {"name": trial.name, "point": trial.point, "config_digest": digest(to_dict(trial.cfg)),
              "result": {"volumes": volumes, "metrics": ["psnr", "ssim"],
                         "per_volume": per_volume}}
    write_atomic(plan.trial_dir(trial.name) / TRIAL_RECORD, json.dumps(record))


def test_aggregate_table_tests_and_plot_match_an_independent_computation(tmp_path):
    plan = plan_sweep(str(TINY), [], ["loss.alpha=0,0.5", "loss.temperature=1,2"],
                      tmp_path / "sw")
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    volumes = [f"vol{i}" for i in range(5)]
    teacher = {"psnr": list(rng.normal(32, 1, 5)), "ssim": list(rng.uniform(0.8, 0.9, 5))}
    values = {}
    for trial in plan.trials[:3]:   # the last trial "failed": no record
        values[trial.name] = {"psnr": list(rng.normal(30, 1, 5)),
                              "ssim": list(rng.uniform(0.7, 0.9, 5))}
        _write_trial(plan, trial, values[trial.name], teacher, volumes)
    summary = aggregate(plan)

    rows = list(csv.DictReader((plan.sweep_dir / "sweep.csv").open()))
    by = {(r["trial"], r["metric"]): r for r in rows}
    # alpha0.5-temperature1 is compared with alpha0-temperature1 (same temperature)
    a, ref = values["alpha0.5-temperature1"], values["alpha0-temperature1"]
    for metric in ("psnr", "ssim"):
        row = by[("alpha0.5-temperature1", metric)]
        assert float(row["mean"]) == pytest.approx(np.mean(a[metric]), rel=1e-12)
        assert float(row["std"]) == pytest.approx(np.std(a[metric], ddof=1), rel=1e-12)
        expected = scipy.stats.ttest_rel(a[metric], ref[metric])
        assert float(row["p_value"]) == pytest.approx(expected.pvalue, rel=1e-9)
        assert float(row["mean_diff"]) == pytest.approx(np.mean(a[metric]) - np.mean(ref[metric]))
        assert row["reference"] == "alpha0-temperature1"
    assert by[("alpha0-temperature1", "psnr")]["p_value"] == ""      # the reference itself
    # every alpha = 0 trial is its own temperature's reference
    assert by[("alpha0-temperature2", "psnr")]["reference"] == "alpha0-temperature2"
    assert float(by[("teacher", "psnr")]["mean"]) == pytest.approx(np.mean(teacher["psnr"]))
    assert ("alpha0.5-temperature2", "psnr") not in by
    md = (plan.sweep_dir / "sweep.md").read_text()
    assert "3 of 4 trials finished" in md and "| alpha0.5-temperature2 | 0.5 | 2 | failed" in md
    png = (plan.sweep_dir / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and summary["plot"].endswith("sweep.png")


def test_aggregate_uses_the_no_kd_model_without_an_alpha_zero_trial(tmp_path):
    plan = plan_sweep(str(TINY), [], ["loss.temperature=1,2"], tmp_path / "sw")
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    volumes = ["a", "b", "c", "d"]
    teacher = {"psnr": list(rng.normal(32, 1, 4)), "ssim": list(rng.uniform(0.8, 0.9, 4))}
    no_kd = {"psnr": list(rng.normal(29, 1, 4)), "ssim": list(rng.uniform(0.7, 0.8, 4))}
    student = {"psnr": list(rng.normal(30, 1, 4)), "ssim": list(rng.uniform(0.7, 0.9, 4))}
    for trial in plan.trials:
        _write_trial(plan, trial, student, teacher, volumes, no_kd=no_kd)
    aggregate(plan)
    rows = {(r["trial"], r["metric"]): r for r in
            csv.DictReader((plan.sweep_dir / "sweep.csv").open())}
    row = rows[("temperature2", "psnr")]
    assert row["reference"] == "no-KD model"
    assert float(row["p_value"]) == pytest.approx(
        scipy.stats.ttest_rel(student["psnr"], no_kd["psnr"]).pvalue, rel=1e-9)


def test_aggregate_refuses_trials_evaluated_on_different_volumes(tmp_path):
    plan = plan_sweep(str(TINY), [], ["loss.alpha=0,1"], tmp_path / "sw")
    values = {"psnr": [1.0, 2.0, 3.0], "ssim": [0.1, 0.2, 0.3]}
    _write_trial(plan, plan.trials[0], values, values, ["a", "b", "c"])
    _write_trial(plan, plan.trials[1], values, values, ["a", "b", "x"])
    with pytest.raises(SweepError, match="evaluated other volumes"):
        aggregate(plan)


# ---------------------------------------------------------------------------------------------
# every sweep file runs

SWEEP_FILES = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
TEST_SIZE = {"reconstruction": "recon_tiny.yaml", "superres": "recon_tiny.yaml",
             "enhancement": "enh_tiny.yaml", "segmentation": "seg_tiny.yaml",
             "varnet": "varnet_tiny.yaml"}


def _flat(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        elif key not in ("recipe", "run_dir"):
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_every_sweep_file_runs_locally_at_test_size(sweep_file, tmp_path):
    """A published-size sweep file runs with its recipe's tiny config values as overrides (and
    a teacher trained in the sweep), each grid key cut to its first and last value."""
    spec = read_sweep_file(sweep_file)
    recipe = load_config(spec["config"]).recipe
    tiny = REPO / "configs" / TEST_SIZE[recipe]
    # Every value of the tiny config (resolved: keys the published config sets and the tiny
    # one leaves at the default are reset too); the sweep trains its own tiny teacher.
    overrides = [] if Path(spec["config"]).resolve() == tiny.resolve() else [
        *_flat(to_dict(load_config(tiny))), 'model.teacher_checkpoint=""']
    grid = [f"{key}={values[0]},{values[-1]}" for key, values in parse_grid(spec["grid"])]
    args = [str(sweep_file), *overrides, *[a for g in grid for a in ("--grid", g)],
            "--executor", "local", "--sweep-dir", str(tmp_path / "sweep")]
    out = subprocess.run([sys.executable, "-m", "kdhpc.sweep", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "KDHPC_DATA": str(tmp_path / "data")})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep.csv").open()))
    trials = {r["trial"] for r in rows} - {"teacher"}
    assert len(trials) == np.prod([2 for _ in grid])
    headline = rows[0]["metric"]
    results = {}
    for trial in trials:
        record = json.loads((tmp_path / "sweep" / "trials" / trial / TRIAL_RECORD).read_text())
        values = record["result"]["per_volume"]["student"][headline]
        row = next(r for r in rows if r["trial"] == trial and r["metric"] == headline)
        assert float(row["mean"]) == pytest.approx(float(np.mean(values)), rel=1e-12)
        results[trial] = values
    if "loss.temperature" in dict(parse_grid(spec["grid"])) and recipe == "segmentation":
        # The temperature reaches the KD student: each T trains other weights (at test size
        # every student may still predict background only, so Dice alone cannot show it).
        for trial in trials:  # (at alpha 0 there is no KD term, so T cannot matter)
            other = trial.replace("temperature1", "temperature4")
            if other != trial and not trial.startswith("alpha0-"):
                assert _kd_weights(tmp_path / "sweep", trial) != _kd_weights(tmp_path / "sweep",
                                                                              other)


def _kd_weights(sweep_dir: Path, trial: str) -> bytes:
    record = json.loads((sweep_dir / "trials" / trial / "student_kd" / "stage.json").read_text())
    weights = Path(record["result"]["weights"])
    return (weights if weights.is_absolute() else sweep_dir / "trials" / trial / weights
            ).read_bytes()
