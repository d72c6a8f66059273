"""kdhpc.models.external and kdhpc.models.taps: a user-defined module kdhpc has never seen, built
from a factory spec and loaded from checkpoints in foreign layouts (Lightning, DDP), frozen
TorchScript / torch.export teachers, and named-layer taps with their errors."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from kdhpc.models import build_model, feature_layers
from kdhpc.models.external import (ModelSpecError, build_from_spec, checkpoint_kind,
                                   load_program, load_state_dict_file, load_teacher,
                                   read_state_dict, strip_prefix)
from kdhpc.models.taps import (ChannelProjection, LayerPathError, LayerTaps, projections_for,
                               tap_channels)

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        """A lab's own network: two convs and a residual."""
        def __init__(self, width=4, depth=2):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 1, 3, padding=1))
            self.depth = depth

        def forward(self, x):
            return x + self.body(x)

    def make(width=4, depth=2):
        return TinyNet(width, depth)

    def not_a_module(width=4):
        return [width]
''')


pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A module ``lab_nets`` written by the test, importable as a factory spec."""
    (tmp_path / "lab_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lab_nets"


def _tiny_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TinyNet's forward written out from its parameters."""
    c1, c2 = model.body[0], model.body[2]
    h = torch.relu(torch.nn.functional.conv2d(x, c1.weight, c1.bias, padding=1))
    return x + torch.nn.functional.conv2d(h, c2.weight, c2.bias, padding=1)


# ---------------------------------------------------------------- specs

def test_factory_spec_builds_user_module_with_kwargs(user_package):
    model = build_from_spec(f"{user_package}:make", {"width": 6, "depth": 3})
    assert type(model).__name__ == "TinyNet" and model.depth == 3
    assert model.body[0].out_channels == 6
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(model(x), _tiny_reference(model, x))
    by_class = build_from_spec(f"{user_package}:TinyNet", {"width": 2})
    assert by_class.body[0].weight.shape == (2, 1, 3, 3)


def test_registry_spec_takes_kwargs_as_overrides():
    model = build_from_spec("dccnn_student", {"channels": 8})
    # 5 cascades x (conv 1->8, conv 8->8, conv 8->1), weights and biases
    expected = 5 * ((9 * 8 + 8) + (9 * 64 + 8) + (9 * 8 + 1))
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("spec, kwargs, match", [
    ("lab_nets:make", {"colour": 1}, r"unknown keyword argument\(s\) \['colour'\]; expected "
                                      r"some of \['width', 'depth'\]"),
    ("lab_nets:nothing", {}, r"'lab_nets' has no attribute 'nothing'; found .*TinyNet"),
    ("lab_nets_missing:make", {}, r"cannot import module 'lab_nets_missing'"),
    ("lab_nets:not_a_module", {}, r"expected the factory to return a torch.nn.Module, found "
                                  r"list"),
    (":make", {}, r"expected 'package.module:callable'"),
])
def test_bad_factory_specs_say_what_is_wrong(user_package, spec, kwargs, match):
    with pytest.raises(ModelSpecError, match=match):
        build_from_spec(spec, kwargs)


# ---------------------------------------------------------------- checkpoints

def _trained_tiny(user_package) -> nn.Module:
    torch.manual_seed(3)
    return build_from_spec(f"{user_package}:make", {"width": 4})


@pytest.mark.parametrize("layout", ["plain", "lightning", "ddp", "lightning_ddp", "nested_model"])
def test_checkpoint_layouts_load_to_the_same_outputs(tmp_path, user_package, layout):
    source = _trained_tiny(user_package)
    state = source.state_dict()
    if layout == "plain":
        saved = state
    elif layout == "lightning":  # LightningModule with self.model = TinyNet(...)
        saved = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 7,
                 "global_step": 70, "pytorch-lightning_version": "2.4.0",
                 "hyper_parameters": {"lr": 1e-3, "width": 4}}
    elif layout == "ddp":
        saved = {f"module.{k}": v for k, v in state.items()}
    elif layout == "lightning_ddp":
        saved = {"state_dict": {f"model.module.{k}": v for k, v in state.items()}}
    else:
        saved = {"model": state, "optimizer": {"lr": 0.1}}
    path = tmp_path / "teacher.ckpt"
    torch.save(saved, path)
    torch.manual_seed(99)  # a different initialisation to overwrite
    fresh = build_from_spec(f"{user_package}:make", {"width": 4})
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(fresh(x), source(x))
    report = load_state_dict_file(fresh, path)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(fresh(x), source(x))


def test_explicit_prefix_picks_one_submodule_of_a_lightning_checkpoint(tmp_path, user_package):
    teacher, student = _trained_tiny(user_package), build_model("vdsr_student", n_convs=3,
                                                                channels=4)
    state = {**{f"teacher.{k}": v for k, v in teacher.state_dict().items()},
             **{f"student.{k}": v for k, v in student.state_dict().items()}}
    path = tmp_path / "kd.ckpt"
    torch.save({"state_dict": state}, path)
    loaded = read_state_dict(path, prefix="teacher.")
    assert set(loaded) == set(teacher.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ModelSpecError, match=r"prefix 'net\.': no key starts with it; found "
                                             r"keys student\.body"):
        read_state_dict(path, prefix="net.")


def test_strict_load_lists_missing_and_unexpected_keys(tmp_path, user_package):
    model = _trained_tiny(user_package)
    state = dict(model.state_dict())
    state.pop("body.2.bias")
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ModelSpecError) as info:
        load_state_dict_file(_trained_tiny(user_package), path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "missing keys body.2.bias" in message and "unexpected keys head.weight" in message
    fresh = _trained_tiny(user_package)
    report = load_state_dict_file(fresh, path, strict=False)
    assert report.missing == ["body.2.bias"] and report.unexpected == ["head.weight"]
    assert torch.equal(fresh.body[0].weight, model.body[0].weight)


def test_shape_mismatch_names_both_shapes(tmp_path, user_package):
    path = tmp_path / "wide.pt"
    torch.save(build_from_spec(f"{user_package}:make", {"width": 8}).state_dict(), path)
    with pytest.raises(ModelSpecError, match=r"shape mismatch for TinyNet: body\.0\.bias "
                                             r"\(model \(4,\), file \(8,\)\)"):
        load_state_dict_file(_trained_tiny(user_package), path)


class _Pickled:
    """Not a tensor container: weights_only loading must refuse it."""


def test_non_weights_only_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"weights": _Pickled()}, path)
    with pytest.raises(ModelSpecError, match=rf"{path}: cannot load as a weights-only"):
        read_state_dict(path)
    other = tmp_path / "counts.pt"
    torch.save({"epoch": 3, "lr": 0.1}, other)
    with pytest.raises(ModelSpecError, match=r"expected a state dict .* found a dict with keys "
                                             r"epoch, lr"):
        read_state_dict(other)
    with pytest.raises(ModelSpecError, match="checkpoint file not found"):
        read_state_dict(tmp_path / "absent.pt")


def test_strip_prefix_auto_only_strips_wrapper_prefixes_on_every_key():
    t = torch.zeros(1)
    assert set(strip_prefix({"module.model.a": t, "module.model.b": t})) == {"a", "b"}
    assert set(strip_prefix({"model.a": t, "head.b": t})) == {"model.a", "head.b"}
    assert set(strip_prefix({"_orig_mod.a": t}, "")) == {"_orig_mod.a"}


# ---------------------------------------------------------------- frozen programs

@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_frozen_teacher_programs_run_like_eager(tmp_path, user_package, kind):
    model = _trained_tiny(user_package).eval()
    x = torch.randn(1, 1, 8, 8)
    if kind == "torchscript":
        path = tmp_path / "teacher.ts"
        torch.jit.save(torch.jit.trace(model, x), str(path))
    else:
        path = tmp_path / "teacher.pt2"
        torch.export.save(torch.export.export(model, (x,)), str(path))
    assert checkpoint_kind(path) == kind
    teacher = load_teacher("ignored:spec", checkpoint=path)  # a program needs no spec
    with torch.no_grad():
        assert torch.allclose(teacher(x), _tiny_reference(model, x), atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ModelSpecError, match=f"expected a state dict, found a {kind} program"):
        read_state_dict(path)


def test_load_teacher_from_state_dict_is_frozen_and_in_eval(tmp_path, user_package):
    source = _trained_tiny(user_package)
    path = tmp_path / "t.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    teacher = load_teacher(f"{user_package}:make", {"width": 4}, path)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(teacher(x), source(x))
    assert checkpoint_kind(path) == "state_dict"
    with pytest.raises(ModelSpecError, match="expected a TorchScript or torch.export archive"):
        load_program(path)


# ---------------------------------------------------------------- taps

@pytest.mark.parametrize("name", ["dccnn_teacher", "dccnn_student"])
def test_taps_equal_return_features(name):
    torch.manual_seed(0)
    model = build_model(name, channels=8, n_cascades=2)
    x = torch.randn(2, 1, 16, 16)
    k0 = torch.fft.fft2(torch.randn(2, 1, 16, 16), norm="ortho")
    mask = (torch.arange(16) % 3 == 0).float().reshape(1, 16)
    out, features = model(x, k0 * mask, mask, return_features=True)
    with LayerTaps(model, feature_layers(model)) as taps:
        out2 = model(x, k0 * mask, mask)
        tapped = taps.outputs()
    assert torch.equal(out, out2)
    assert len(tapped) == len(features) == 2
    assert all(torch.equal(a, b) for a, b in zip(tapped, features))
    # hooks are gone after the block
    assert all(not m._forward_hooks for m in model.modules())


def test_taps_carry_gradients_and_persist_across_forwards(user_package):
    model = _trained_tiny(user_package)
    taps = LayerTaps(model, ["body.1"]).attach()
    x = torch.randn(1, 1, 8, 8)
    model(x)
    first = taps.outputs()[0]
    model(x * 2)
    (second,) = taps.outputs()
    expected = torch.relu(torch.nn.functional.conv2d(x * 2, model.body[0].weight,
                                                     model.body[0].bias, padding=1))
    assert torch.allclose(second, expected) and not torch.allclose(first, second)
    second.sum().backward()
    assert model.body[0].weight.grad is not None and model.body[2].weight.grad is None
    taps.remove()
    with pytest.raises(LayerPathError, match=r"layer\(s\) \['body.1'\] of TinyNet did not run"):
        taps.outputs()


def test_wrong_layer_path_lists_the_real_layers_closest_first():
    model = build_model("dccnn_student", n_cascades=2)
    with pytest.raises(LayerPathError) as info:
        LayerTaps(model, ["cascades.0.conv.1"])
    message = str(info.value)
    assert "\n" not in message
    closest = message.split("closest: ")[1].split(";")[0].split(", ")
    assert closest[0] in ("cascades.0.convs.1", "cascades.0.convs")
    assert "cascades.0.convs.1" in closest
    listed = closest + message.split("; layers: ")[1].split(", ")
    assert sorted(listed) == sorted(n for n, _ in model.named_modules() if n)


def test_tuple_output_layer_is_refused_with_a_hint():
    model = build_model("dccnn_student", n_cascades=1)
    x = torch.randn(1, 1, 8, 8)
    k0 = torch.fft.fft2(x, norm="ortho").to(torch.complex64)
    with LayerTaps(model, ["cascades.0"]):
        with pytest.raises(LayerPathError, match=r"layer 'cascades.0' \(ConvStack\): expected a "
                                                 r"tensor output to tap, found tuple"):
            model(x, k0, torch.ones(1, 8))


def test_channel_projection_is_a_trainable_1x1_conv():
    torch.manual_seed(0)
    proj = ChannelProjection(3, 5)
    x = torch.randn(2, 3, 4, 4)
    expected = torch.einsum("oc,bchw->bohw", proj.proj.weight[:, :, 0, 0], x)
    assert torch.allclose(proj(x), expected, atol=1e-6)
    proj(x).sum().backward()
    assert proj.proj.weight.grad is not None
    pairs = projections_for([32, 16], [32, 64])
    assert isinstance(pairs[0], nn.Identity) and isinstance(pairs[1], ChannelProjection)
    assert pairs[1].proj.weight.shape == (64, 16, 1, 1)
    with pytest.raises(ValueError, match="as many student as teacher layers, found 1 and 2"):
        projections_for([1], [1, 2])


def test_tap_channels_of_named_layers():
    teacher = build_model("vdsr_teacher", n_convs=5, channels=12)
    student = build_model("vdsr_student", n_convs=3, channels=6)
    x = torch.randn(1, 1, 8, 8)
    t = tap_channels(teacher, ["body.acts.2", "body.convs.4"], x)
    s = tap_channels(student, ["body.acts.1", "body.convs.2"], x)
    assert t == [12, 1] and s == [6, 1]


def test_user_teacher_distils_into_registry_student_through_named_layers(tmp_path, user_package):
    """The pieces compose: a teacher class kdhpc has never seen, from a Lightning-style file
    written here, taught to a registry student by attention transfer on named layers plus a
    projected feature term (the channels differ) and the imitation loss; the student's
    distillation losses fall and the projection trains."""
    from kdhpc.losses import attention_transfer_loss

    torch.manual_seed(0)
    source = build_from_spec(f"{user_package}:make", {"width": 6})
    ckpt = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
                "epoch": 1}, ckpt)
    teacher = load_teacher(f"{user_package}:make", {"width": 6}, ckpt)
    student = build_model("vdsr_student", n_convs=3, channels=4)
    t_layers, s_layers = ["body.1"], ["body.acts.1"]
    x = torch.rand(4, 1, 12, 12)
    s_channels = tap_channels(student, s_layers, x)
    t_channels = tap_channels(teacher, t_layers, x)
    assert (s_channels, t_channels) == ([4], [6])
    projections = projections_for(s_channels, t_channels)
    optimiser = torch.optim.Adam([*student.parameters(), *projections.parameters()], lr=1e-2)
    before = projections[0].proj.weight.detach().clone()
    losses = []
    with LayerTaps(teacher, t_layers, detach=True) as t_taps, LayerTaps(student,
                                                                         s_layers) as s_taps:
        with torch.no_grad():
            t_out = teacher(x)
        t_feats = t_taps.outputs()
        for _ in range(30):
            s_out = student(x)
            s_feats = s_taps.outputs()
            at = attention_transfer_loss(s_feats, t_feats)["at"]
            hint = sum(torch.nn.functional.mse_loss(p(s), t)
                       for p, s, t in zip(projections, s_feats, t_feats))
            loss = at + hint + torch.nn.functional.l1_loss(s_out, t_out)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(before, projections[0].proj.weight)
    assert all(p.grad is None for p in teacher.parameters())
