import dataclasses

import pytest

from caption.config import (
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    save_config,
)


def test_defaults_are_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.attention = "dot"


def test_overrides_apply_with_types():
    cfg = apply_overrides(Config(), ["model.attention=dot", "train.lr=2e-4", "model.fine_tune=true", "train.epochs=3"])
    assert cfg.model.attention == "dot"
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.fine_tune is True
    assert cfg.train.epochs == 3


@pytest.mark.parametrize("override, key", [
    ("model.atention=dot", "model.atention"),
    ("modle.attention=dot", "modle"),
    ("model=dot", "model"),
    ("train.epochs=three", "train.epochs"),
    ("model.fine_tune=maybe", "model.fine_tune"),
    ("train.lr=[1, 2]", "train.lr"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        apply_overrides(Config(), [override])


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(Config(), ["model.attention"])


def test_yaml_round_trip(tmp_path):
    src = tmp_path / "exp.yaml"
    src.write_text("model:\n  attention: general\n  grid: 7\ntrain:\n  lr: 0.001\n")
    cfg = load_config(src, ["decode.beam_size=5"])
    assert cfg.name == "exp" and cfg.model.grid == 7 and cfg.decode.beam_size == 5
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_yaml_unknown_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_dim: 3\n")
    with pytest.raises(ConfigError, match="'model.hiden_dim'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs, "configs/ must hold at least one YAML file"
    for path in configs:
        assert load_config(path).name == path.stem
