"""Config tree: defaults, YAML overrides, dotted CLI overrides and their error messages."""

import dataclasses

import pytest
import yaml

from kdhpc.config import (Config, ConfigError, describe, digest, from_dict, load_config,
                          parse_override, save_config, to_dict)


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_layers_apply_in_order(tmp_path):
    path = write(tmp_path, "loss:\n  alpha: 0.25\ntrain:\n  epochs: 7\n")
    cfg = load_config(path, ["train.epochs=3", "data.crop=[64, 48]"])
    assert cfg.loss.alpha == 0.25            # from YAML
    assert cfg.train.epochs == 3             # CLI wins over YAML
    assert cfg.data.crop == [64, 48]
    assert cfg.optim.lr == Config().optim.lr  # untouched default


def test_int_is_accepted_for_float_but_nothing_else_is_coerced(tmp_path):
    cfg = load_config(None, ["loss.temperature=2"])
    assert cfg.loss.temperature == 2.0 and isinstance(cfg.loss.temperature, float)
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, found 2\.5"):
        load_config(None, ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"loss\.kl_t2_scaling: expected true or false, found 'yes please'"):
        load_config(None, ["loss.kl_t2_scaling=yes please"])


def test_yaml12_numbers_are_accepted_for_float_fields(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; both the command line and a file accept it.
    assert yaml.safe_load("1e-4") == "1e-4"
    cfg = load_config(None, ["optim.lr=1e-4", "loss.temperature=2E+1", "mask.acceleration=0x8",
                             "degrade.noise_jitter=[5e-1, 15e-1]"])
    assert (cfg.optim.lr, cfg.loss.temperature, cfg.mask.acceleration) == (0.0001, 20.0, 8.0)
    assert cfg.degrade.noise_jitter == [0.5, 1.5]
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-4\n  weight_decay: 3.e-2\n"
                                      "loss:\n  at_p: 0o2\n"))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.at_p) == (1e-4, 0.03, 2.0)
    assert type(cfg.optim.lr) is float
    # Only float fields convert: an int field or a string field keeps YAML 1.1's reading.
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, found '1e2'"):
        load_config(None, ["train.epochs=1e2"])
    assert load_config(None, ["run_dir=1e2"]).run_dir == "1e2"
    for bad, message in (("1e-4x", "a number"), ("e5", "a number"), ("1e999", "a finite number"),
                         ("-1e-3", r"a value in \(0\.0, inf\)")):
        with pytest.raises(ConfigError, match=rf"^command line: optim\.lr: expected {message}"):
            load_config(None, [f"optim.lr={bad}"])


@pytest.mark.parametrize("override, message", [
    ("loss.alpha=1.5", r"loss\.alpha: expected a value in \[0\.0, 1\.0\], found 1\.5"),
    ("loss.alpha=-0.1", r"loss\.alpha: expected a value in \[0\.0, 1\.0\]"),
    ("loss.temperature=0", r"loss\.temperature: expected a value in \(0\.0, inf\), found 0\.0"),
    ("mask.acceleration=0.5", r"mask\.acceleration: expected a value in \[1\.0, inf\)"),
    ("mask.center_fraction=1", r"mask\.center_fraction: expected a value in \(0\.0, 1\.0\)"),
    ("mask.center_fraction=0", r"mask\.center_fraction"),
    ("loss.at_mode=foo", r"loss\.at_mode: expected one of 'paper', 'kdmri_code', found 'foo'"),
    ("loss.alhpa=0.5", r"loss\.alhpa: unknown key; expected one of alpha"),
    ("nosuch.key=1", r"nosuch: unknown key"),
    ("loss.temperature=.nan", r"loss\.temperature: expected a finite number"),
])
def test_cli_errors_name_source_key_expected_and_found(override, message):
    with pytest.raises(ConfigError, match="^command line: " + message):
        load_config(None, [override])


def test_yaml_errors_name_the_file(tmp_path):
    path = write(tmp_path, "train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: train\.epochz: unknown key"):
        load_config(path)
    path = write(tmp_path, "mask:\n  acceleration: 0\n", "b.yaml")
    with pytest.raises(ConfigError, match=rf"^{path}: mask\.acceleration: expected a value"):
        load_config(path)
    path = write(tmp_path, "loss: 3\n", "c.yaml")
    with pytest.raises(ConfigError, match=rf"^{path}: loss: expected a mapping, found 3"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    path = write(tmp_path, "loss: [unclosed\n", "d.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"default_data\.split: expected three non-negative"):
        load_config(None, ["default_data.split=[0.5, 0.5, 0.5]"])
    with pytest.raises(ConfigError, match=r"mask\.path: expected a \.npy file"):
        load_config(None, ["mask.kind=file"])
    with pytest.raises(ConfigError, match=r"degrade\.noise_jitter"):
        load_config(None, ["degrade.noise_jitter=[2.0, 1.0]"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("loss.alpha")
    assert parse_override("model.teacher=unet_teacher") == ("model.teacher", "unet_teacher")


def test_resolved_config_round_trips_through_run_dir(tmp_path):
    cfg = load_config(None, ["loss.alpha=0.75", "train.epochs=2"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    back = from_dict(yaml.safe_load(path.read_text()))
    assert back == cfg
    assert not list((tmp_path / "run").glob(".*tmp*"))  # written atomically, no leftovers


def test_digest_changes_with_any_value():
    a, b = Config(), Config()
    assert digest(a) == digest(b)
    b.loss.alpha = 0.3
    assert digest(a) != digest(b)
    assert digest(a.mask) == digest(to_dict(a)["mask"])


def test_every_field_is_documented():
    rows = describe()
    undocumented = [key for key, help_text, _ in rows if len(help_text) < 8]
    assert not undocumented
    n_leaves = sum(1 for f in dataclasses.fields(Config)
                   if not dataclasses.is_dataclass(f.type) and f.name in ("recipe", "run_dir"))
    assert len(rows) > 50 and n_leaves == 2
