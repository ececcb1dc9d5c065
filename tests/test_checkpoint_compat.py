"""Checkpoints and run configs of earlier releases keep loading (caption.checkpoint.migrate_checkpoint,
caption.config.migrate_config), today's format is pinned to frozen keys, and a newer release's
checkpoint is refused in one line naming both formats.

The earlier configs are frozen copies under tests/compat/ (small YAML files, never edited), each
named by the format and the commit that wrote it; the weights are a tiny model's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_checkpoint

from caption.checkpoint import (
    _STEPS,
    FORMAT,
    OLDEST,
    CheckpointError,
    format_number,
    load_checkpoint,
    read_checkpoint,
)
from caption.config import (
    Config,
    ConfigError,
    from_dict,
    load_config,
    load_run_config,
    migrate_config,
    save_config,
    to_dict,
)

COMPAT = Path(__file__).parent / "compat"
REPO = Path(__file__).resolve().parents[1]
EARLIER = sorted(COMPAT.glob("caption-1_*.yaml"))
# precision each frozen config means: train.amp true -> auto, false -> fp32; or its own precision
PRECISION = {"c1cbfd8_shipped": "auto", "a234470_run": "fp32", "eb585e5_run": "fp32", "1f8588a_shipped": "auto"}


def _frozen(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a nested config dict: {'precision', 'model.grid', ...}."""
    out = set()
    for key, value in tree.items():
        out |= _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return out


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` with top-level entries replaced, as an earlier release wrote it."""
    data = torch.load(src, weights_only=True)
    torch.save({**data, **changes}, dst)
    return dst


def test_the_frozen_copies_are_the_formats_this_project_wrote():
    assert {p.stem.split("_", 1)[1] for p in EARLIER} == set(PRECISION)
    assert _frozen(COMPAT / "caption-1_c1cbfd8_shipped.yaml")["train"]["amp"] is True  # the shipped one
    assert _frozen(COMPAT / "caption-1_a234470_run.yaml")["train"]["amp"] is False
    assert len(_STEPS) == format_number(FORMAT) - OLDEST  # one step from each earlier format to the next


def test_todays_config_keys_are_the_frozen_keys_of_todays_format():
    frozen = _frozen(COMPAT / f"{FORMAT.replace('/', '-')}.yaml")
    added, removed = sorted(_keys(to_dict(Config())) - _keys(frozen)), sorted(_keys(frozen) - _keys(to_dict(Config())))
    assert not (added or removed), (
        f"config keys changed (added {added}, removed {removed}) without a new checkpoint format: bump "
        f"caption.checkpoint.FORMAT past {FORMAT}, add the step from it, and freeze the new keys under tests/compat/")


@pytest.mark.parametrize("path", EARLIER, ids=lambda p: p.stem)
def test_each_earlier_config_migrates_to_todays_keys(path):
    data = _frozen(path)
    cfg = from_dict(Config, migrate_config(data))
    assert cfg.precision == PRECISION[path.stem.split("_", 1)[1]]
    assert "amp" not in to_dict(cfg)["train"]
    for section in ("data", "model", "train", "decode"):  # every value it had is kept
        kept = {k: v for k, v in data[section].items() if k != "amp"}
        assert {k: to_dict(cfg)[section][k] for k in kept} == kept, section
    assert migrate_config(to_dict(cfg)) == to_dict(cfg)  # today's configs pass unchanged
    with pytest.raises(ConfigError, match="'train.amp'.*expects bool"):  # the project only ever wrote a bool
        migrate_config({**data, "train": {**data["train"], "amp": "maybe"}})


@pytest.mark.parametrize("path", EARLIER, ids=lambda p: p.stem)
def test_a_checkpoint_with_each_earlier_config_loads(path, tmp_path):
    tiny = make_tiny_checkpoint(tmp_path / "tiny.pt")
    today = load_checkpoint(tiny)
    old = _frozen(path)
    old["model"] = {k: v for k, v in to_dict(today.config.model).items() if k in old["model"]}  # its weights' model
    old["data"]["image_size"] = today.config.data.image_size
    written = _rewrite(tiny, tmp_path / "old.pt", format="caption/1", config=old)
    loaded = load_checkpoint(written)
    assert loaded.config.model == today.config.model
    assert loaded.config.precision == PRECISION[path.stem.split("_", 1)[1]]
    assert loaded.config.train.epochs == old["train"]["epochs"]
    assert loaded.config.decode.max_len == old["decode"]["max_len"]
    for key, value in today.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert read_checkpoint(written)["format"] == FORMAT  # what callers see is today's format


def test_today_writes_its_format_and_a_newer_one_is_refused_in_one_line(tmp_path, capsys):
    from caption.commands.main import main

    tiny = make_tiny_checkpoint(tmp_path / "tiny.pt")
    assert torch.load(tiny, weights_only=True)["format"] == FORMAT
    newer = f"caption/{format_number(FORMAT) + 1}"
    path = _rewrite(tiny, tmp_path / "newer.pt", format=newer)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert newer in message and FORMAT in message and "newer release" in message and "\n" not in message
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 40, 40)).save(image)
    assert main(["predict", str(image), "--checkpoint", str(path), "--device", "cpu"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and newer in lines[0] and FORMAT in lines[0]
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'other/1'"):
        load_checkpoint(_rewrite(tiny, tmp_path / "other.pt", format="other/1"))


@pytest.mark.parametrize("layout", ["GroupNorm", "BatchNorm"])
def test_the_small_cnn_before_0316109_is_refused_with_a_line_that_says_retrain(layout, tmp_path):
    tiny = make_tiny_checkpoint(tmp_path / "tiny.pt")
    weights = dict(torch.load(tiny, weights_only=True)["model"])
    for key in [k for k in weights if ".1.norm." in k and k.startswith("encoder.blocks.")]:  # its layout then
        weights[key.replace(".norm.", ".")] = weights.pop(key)
        if layout == "BatchNorm" and key.endswith("weight"):
            old = key.replace(".norm.", ".")
            weights[old.replace(".weight", ".running_mean")] = torch.zeros_like(weights[old])
    path = _rewrite(tiny, tmp_path / "old_small.pt", format="caption/1", model=weights)
    with pytest.raises(CheckpointError, match=f"{layout}.*0316109.*train it again"):
        load_checkpoint(path)


def test_an_earlier_runs_config_yaml_resumes_but_a_users_config_stays_strict(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(COMPAT / "caption-1_a234470_run.yaml", run_dir / "config.yaml")
    cfg = load_run_config(run_dir / "config.yaml", ["train.epochs=3"])
    assert cfg.precision == "fp32" and cfg.train.epochs == 3 and cfg.model.encoder == "small"
    save_config(cfg, run_dir / "today.yaml")
    assert load_run_config(run_dir / "today.yaml") == cfg == load_config(run_dir / "today.yaml")
    with pytest.raises(ConfigError, match="train.amp"):  # precision replaced it in configs people write
        load_config(run_dir / "config.yaml")


@pytest.mark.slow
def test_eb585e5s_shipped_checkpoint_captions_the_sample_photo(tmp_path):
    """The issue's case: the checkpoint shipped by eb585e5 (from git history), through `caption predict`."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the 'lite' extra (EfficientNet-Lite0) is not installed")
    git = shutil.which("git")
    show = subprocess.run([git, "-C", str(REPO), "show", "eb585e5:caption/assets/flickr8k_lite0_additive.pt"],
                          capture_output=True) if git else None
    if show is None or show.returncode != 0:
        pytest.skip("eb585e5 is not in this checkout's git history")
    old = tmp_path / "eb585e5.pt"
    old.write_bytes(show.stdout)
    assert torch.load(old, weights_only=True)["config"]["train"]["amp"] is True  # the file as shipped
    sample = REPO / "caption" / "assets" / "sample.jpg"
    proc = subprocess.run([sys.executable, "-m", "caption", "predict", str(sample), "--checkpoint", str(old),
                           "--device", "cpu", "--no-guide"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, caption = proc.stdout.strip().split("\t")
    assert path == str(sample) and len(caption.split()) >= 3
    assert load_checkpoint(old).config.precision == "auto"  # train.amp true


def test_int8_matrices_round_trip_and_a_malformed_one_is_refused(tiny_checkpoint, tmp_path):
    from caption.checkpoint import INT8, quantize_int8

    torch.manual_seed(0)
    weights = {"m": torch.randn(64, 128), "bias": torch.randn(64), "small": torch.randn(4, 4)}
    q = quantize_int8(weights)
    assert set(q) == {"m"} and q["m"]["values"].dtype == torch.int8 and q["m"]["scale"].shape == (64, 1)
    back = q["m"]["values"].float() * q["m"]["scale"].float()
    assert (back - weights["m"]).abs().max() <= weights["m"].abs().max() / 127
    data = torch.load(tiny_checkpoint, weights_only=True)
    key = next(k for k, v in data["model"].items() if v.dim() == 2)
    quantized = quantize_int8({key: data["model"][key].float()}, min_size=1)
    rest = {k: v for k, v in data["model"].items() if k != key}
    written = tmp_path / "int8.pt"
    torch.save({**data, "model": rest, INT8: quantized}, written)
    read = read_checkpoint(written)
    assert INT8 not in read and torch.allclose(read["model"][key].float(), data["model"][key].float(),
                                               atol=float(data["model"][key].abs().max()) / 127)
    load_checkpoint(written)  # the model builds from it
    torch.save({**data, "model": rest, INT8: {key: {"values": quantized[key]["values"]}}}, written)
    with pytest.raises(CheckpointError, match="int8 weights are malformed"):
        read_checkpoint(written)


def test_a_caption_2_checkpoint_loads_with_the_distillation_keys_at_their_defaults(tmp_path):
    tiny = make_tiny_checkpoint(tmp_path / "tiny.pt")
    data = torch.load(tiny, weights_only=True)
    frozen = _frozen(COMPAT / "caption-2.yaml")
    config = {**data["config"], "train": {k: v for k, v in data["config"]["train"].items() if k in frozen["train"]}}
    assert _keys(config) - {"name"} <= _keys(frozen)  # what caption/2 wrote
    loaded = load_checkpoint(_rewrite(tiny, tmp_path / "v2.pt", format="caption/2", config=config))
    assert (loaded.config.train.teachers, loaded.config.train.distill_weight) == ("", 0.5)
