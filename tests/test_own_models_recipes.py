"""Networks of your own in the segmentation and enhancement recipes: user-defined modules
(written here, never seen by kdhpc) train as teacher, student and multi-task student through
``kdhpc.distill`` at tiny size, built by the one builder every recipe uses
(:func:`kdhpc.models.external.build_run_network`); the teacher cache holds exactly what the
user's module computes; a network that breaks the recipe's call is refused before anything is
written."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from kdhpc.config import ConfigError, load_config
from kdhpc.predict import load_run_model
from kdhpc.recipe import preflight
from kdhpc.recipes import enhancement as E
from kdhpc.recipes import segmentation as S
from kdhpc.teacher import CachedTeacher
from test_own_models import _run, lab_folder

REPO = Path(__file__).resolve().parent.parent
SEG_TINY = REPO / "configs" / "seg_tiny.yaml"
ENH_TINY = REPO / "configs" / "enh_tiny.yaml"

LAB_MODULE = textwrap.dedent('''
    """A lab's own segmentation and enhancement networks."""
    import torch
    import torch.nn.functional as F
    from torch import nn


    class SegTeacher(nn.Module):
        """Four deep-supervision levels: full-resolution logits and their 2x, 4x, 8x pools."""

        def __init__(self, width=8):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 4, 3, padding=1))

        def forward(self, image):
            logits = self.body(image)
            return [logits, F.avg_pool2d(logits, 2), F.avg_pool2d(logits, 4),
                    F.avg_pool2d(logits, 8)]


    class SegStudent(nn.Module):
        """One level: a plain logits tensor."""

        def __init__(self, width=4):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 4, 1))

        def forward(self, image):
            return self.body(image)


    class Denoiser(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 1, 3, padding=1))

        def forward(self, image):
            return image + self.body(image)


    class MultiTask(nn.Module):
        """Task-conditioned: a learned offset per task after the first convolution."""

        def __init__(self, width=4, tasks=2):
            super().__init__()
            self.first = nn.Conv2d(1, width, 3, padding=1)
            self.embed = nn.Embedding(tasks, width)
            self.last = nn.Conv2d(width, 1, 3, padding=1)

        def forward(self, image, task):
            hidden = torch.relu(self.first(image) + self.embed(task)[:, :, None, None])
            return image + self.last(hidden)


    def enh_teacher(width=6):
        return Denoiser(width)


    def enh_student(width=3):
        return Denoiser(width)


    def multitask():
        return MultiTask(3)


    def wrong_shape(width=4):
        return nn.Conv2d(1, 2, 3, padding=1)
''')


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from lab_folder(tmp_path_factory, "own_recipes_lab", LAB_MODULE)


def _all_views(views) -> dict:
    """Every (sample, view) of a dataset of views as one batch, with its index and view."""
    return default_collate([{**views.get_view(i, v), "index": torch.tensor(i),
                             "view": torch.tensor(v)}
                            for i in range(len(views)) for v in range(views.num_views)])


SEG_MODELS = ["model.teacher=own_recipes_lab:SegTeacher", "model.teacher_kwargs={width: 8}",
              "model.student=own_recipes_lab:SegStudent", "model.student_kwargs={width: 4}",
              "teacher.cache_dtype=float32"]


@pytest.mark.parametrize("teacher_kind", ["factory", "torchscript"])
def test_user_networks_train_as_segmentation_teacher_and_student(lab, tmp_path, teacher_kind):
    """The teacher is the user's factory, trained by the run, or that module scripted to a
    TorchScript file and only run (model.teacher_checkpoint)."""
    import own_recipes_lab

    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *SEG_MODELS]
    if teacher_kind == "torchscript":
        torch.manual_seed(7)
        scripted = own_recipes_lab.SegTeacher(width=8).eval()
        torch.jit.save(torch.jit.script(scripted), str(tmp_path / "seg_teacher.pt"))
        overrides.append(f"model.teacher_checkpoint={tmp_path / 'seg_teacher.pt'}")
    cfg = load_config(SEG_TINY, overrides)
    results, stages = _run(cfg)
    assert {"teacher", "teacher_cache", "student_nokd", "student_kd", "evaluate",
            "report"} <= set(stages.ran)
    teacher, _ = load_run_model(run_dir, "teacher")
    student, _ = load_run_model(run_dir, "student_kd")
    if teacher_kind == "torchscript":
        assert not results["teacher"]["trained"]
        teacher = scripted  # the cache must hold what the user's own module computes
    assert type(teacher) is own_recipes_lab.SegTeacher and teacher.body[0].out_channels == 8
    assert type(student) is own_recipes_lab.SegStudent and student.body[0].out_channels == 4
    # The cache holds the user's teacher on each whole view, every level centre-cropped to the
    # student's patch (its pixels of that image), computed here with the module itself.
    views = S.CardiacData(cfg, Path(results["data"]["root"])).views("train")
    batch = _all_views(views)
    cached = CachedTeacher(run_dir / "teacher_cache").targets(batch)
    size, patch = cfg.data.crop[0], cfg.data.patch_size
    with torch.no_grad():
        levels = teacher(batch["context"])
    assert len(cached) == len(levels) == 4
    for i, level in enumerate(levels):
        start, width = (size - patch) // 2 >> i, patch >> i
        expected = level[..., start:start + width, start:start + width]
        assert expected.abs().sum() > 0
        torch.testing.assert_close(cached[f"logits_{i}"], expected, rtol=1e-5, atol=1e-5)
    # The evaluation's KD-student Dice is the user's student's own argmax on the test slices.
    rows = json.loads((run_dir / "evaluate" / "volumes.json").read_text())
    test = S.CardiacData(cfg, Path(results["data"]["root"])).views("test")
    volume = sorted({test.volume_of(i) for i in range(len(test))})[0]
    items = [test.get_view(i, 0) for i in range(len(test)) if test.volume_of(i) == volume]
    with torch.no_grad():
        pred = student(torch.stack([v["image"] for v in items])).argmax(1).numpy()
    truth = np.stack([v["label"].numpy() for v in items])
    row = next(r for r in rows if r["model"] == "student_kd" and r["volume"] == volume)
    for k, name in S.CLASSES.items():
        both = int(((pred == k) & (truth == k)).sum())
        total = int((pred == k).sum() + (truth == k).sum())
        assert row[f"dice_{name}"] == pytest.approx(2 * both / total if total else 1.0)


def test_segmentation_network_breaking_the_call_is_refused_before_anything_is_written(lab,
                                                                                        tmp_path):
    run_dir = tmp_path / "run"
    wrong = load_config(SEG_TINY, [f"run_dir={run_dir}", *SEG_MODELS,
                                   "model.student=own_recipes_lab:wrong_shape",
                                   "model.student_kwargs={}"])
    with pytest.raises(ConfigError, match=r"model\.student: expected 'own_recipes_lab:wrong_shape'"
                                          r" to return level 0 of shape \(2, 4, 64, 64\)"):
        preflight(wrong)
    # A student with more levels than the teacher: KD pairs level i with level i.
    swapped = load_config(SEG_TINY, [f"run_dir={run_dir}", "model.teacher=own_recipes_lab:SegStudent",
                                     "model.student=unet_teacher_small"])
    with pytest.raises(ConfigError, match=r"model\.student: expected at most as many "
                                          r"deep-supervision levels as the teacher \(1"):
        preflight(swapped)
    assert not run_dir.exists()


ENH_MODELS = ["model.teacher=own_recipes_lab:enh_teacher", "model.teacher_kwargs={width: 6}",
              "model.student=own_recipes_lab:enh_student", "model.student_kwargs={width: 3}",
              "model.multitask_student=own_recipes_lab:multitask", "loss.perceptual_weight=0",
              "teacher.cache_dtype=float32"]


def test_user_networks_train_as_enhancement_teacher_students_and_multitask(lab, tmp_path):
    import own_recipes_lab

    run_dir = tmp_path / "run"
    cfg = load_config(ENH_TINY, [f"run_dir={run_dir}", *ENH_MODELS])
    results, stages = _run(cfg)
    assert {"teacher", "teacher_cache", "expert_cache", "multitask_kd", "report"} <= set(
        stages.ran)
    teacher, _ = load_run_model(run_dir, "teacher")
    multitask, _ = load_run_model(run_dir, "multitask_kd")
    student, _ = load_run_model(run_dir, E.alpha_name(0.5))
    assert type(teacher) is own_recipes_lab.Denoiser and teacher.body[0].out_channels == 6
    assert type(student) is own_recipes_lab.Denoiser and student.body[0].out_channels == 3
    assert type(multitask) is own_recipes_lab.MultiTask
    data = E.EnhancementData(cfg, Path(results["data"]["root"]))
    batch = _all_views(data.views("train", "denoise"))
    cached = CachedTeacher(run_dir / "teacher_cache").targets(batch)
    with torch.no_grad():
        expected = teacher(batch["input"])
    assert expected.abs().sum() > 0
    torch.testing.assert_close(cached["output"], expected, rtol=1e-5, atol=1e-6)
    # The multi-task student was called with each sample's task: its evaluated outputs are the
    # module's own on the test inputs of each task.
    from kdhpc.recipe import read_predictions

    for task in E.TASKS:
        views = data.views("test", task)
        kept = read_predictions([run_dir / "evaluate" / f"task_based_{task}-rank00000.h5"])
        volumes = sorted(k.split("/", 1)[1] for k in kept if k.startswith("index/"))
        index = np.concatenate([kept[f"index/{v}"] for v in volumes])
        saved = np.concatenate([kept[f"multi-task EDSR KD/{v}"] for v in volumes])
        items = [views.get_view(int(i), 0) for i in index]
        with torch.no_grad():
            out = multitask(torch.stack([v["input"] for v in items]),
                            torch.stack([v["task"] for v in items]))
        scale = torch.stack([v["scale"] for v in items])[:, None, None]
        np.testing.assert_allclose(saved, (out[:, 0] * scale).numpy(), rtol=1e-5, atol=1e-6)


def test_enhancement_user_teacher_needs_a_perceptual_source_and_a_multitask_student(lab,
                                                                                   tmp_path):
    run_dir = tmp_path / "run"
    perceptual = load_config(ENH_TINY, [f"run_dir={run_dir}", *ENH_MODELS,
                                        "loss.perceptual_weight=0.1"])
    with pytest.raises(ConfigError, match=r"loss\.perceptual_weight: .* SwinIR or EDSR teacher, "
                                          r"found 'own_recipes_lab:enh_teacher' \(Denoiser\)"):
        preflight(perceptual)
    single = load_config(ENH_TINY, [f"run_dir={run_dir}", *ENH_MODELS,
                                    "model.multitask_student=''"])
    with pytest.raises(ConfigError, match=r"model\.student: .*model\.multitask_student"):
        preflight(single)
    not_multi = load_config(ENH_TINY, [f"run_dir={run_dir}", *ENH_MODELS,
                                       "model.multitask_student=own_recipes_lab:enh_student"])
    with pytest.raises(ConfigError, match=r"model\.multitask_student: expected a multi-task "
                                          r"network whose forward takes a 'task' argument"):
        preflight(not_multi)
    assert not run_dir.exists()
