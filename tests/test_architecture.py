"""The package's structure and the settings each have one source: import graph, feature-cache key,
decoding options from the config, where evaluation writes, and which errors reach the user."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_WORDS, evaluate_checkpoint, make_tiny_checkpoint, tiny_model_config

from caption.config import DecodeConfig, EncoderConfig, ModelConfig, load_config
from caption.data.shapes import generate_shapes
import caption.decoding
from caption.runtime import resolve_runtime
from caption.vocab import END_ID, Vocabulary

PACKAGE = Path(__file__).resolve().parents[1] / "caption"


def _caption_imports(path: Path) -> set[str]:
    """Every ``caption.*`` module a file imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("caption"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "caption")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("caption"))
    return found


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


# each layer may import its own modules and the layers before it, never one after it
LAYERS = (
    ("caption.config", "caption.errors", "caption.fileio", "caption.runtime", "caption.vocab"),
    ("caption.data",),
    ("caption.model",),
    ("caption.decoding",),
    ("caption.guidance",),  # evidence of what a photo shows, the searches that make captions say it, the record
    ("caption.checkpoint", "caption.pipeline"),
    ("caption.evaluation",),
    ("caption.training",),
    ("caption.viz",),
    ("caption.inference",),  # the user API: caption.load and CaptionModel
    ("caption.serve",),  # caption serve: the HTTP app over the user API
    ("caption.commands", "caption.__main__"),
)


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS")


def test_import_graph_points_one_way():
    modules = {_module(p): _caption_imports(p) for p in PACKAGE.rglob("*.py")}
    for name, imports in modules.items():
        if name == "caption":  # the package's lazy public names
            continue
        upward = sorted(m for m in imports if m != "caption" and _layer(m) > _layer(name))
        assert not upward, f"{name} (layer {_layer(name)}) imports {upward} from a layer above it"


def test_no_import_circle():
    graph = {_module(p): {m for m in _caption_imports(p) if m != "caption"} for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in imports if m in graph} for name, imports in graph.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join(path + (name,))}"
        if name not in done:
            for other in sorted(graph[name]):
                visit(other, path + (name,))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_the_package_root_holds_at_most_ten_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 10, root


@pytest.mark.slow
def test_importing_the_model_loads_no_nltk():
    code = "import sys, caption.model; print('nltk' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- feature cache key


def test_encoder_depends_on_its_encoder_config_alone():
    """Changing any model setting outside EncoderConfig leaves the encoder's features unchanged."""
    base = ModelConfig(encoder="small", grid=3, small_channels=8)
    images = torch.rand(2, 3, 32, 32)

    def features(cfg: ModelConfig) -> torch.Tensor:
        torch.manual_seed(0)
        from caption.model import build_encoder

        return build_encoder(cfg).eval()(images)

    reference = features(base)
    others = {"fine_tune": True, "fine_tune_blocks": 1, "attention": "dot", "embed_dim": 7, "hidden_dim": 9,
              "attention_dim": 5, "dropout": 0.1, "gate": "none", "deep_output": True, "init_state": "zeros",
              "blend": "hard"}
    encoder_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    assert set(others) | encoder_fields == {f.name for f in dataclasses.fields(ModelConfig)}
    for field, value in others.items():
        torch.testing.assert_close(features(dataclasses.replace(base, **{field: value})), reference, msg=field)


def test_feature_cache_is_not_reused_across_coord_features(tmp_path):
    """Two runs sharing one cache folder, differing only in model.coord_features (which widens the features)."""
    from caption.model import build_model
    from caption.training.splits import split_data

    data = tmp_path / "shapes"
    generate_shapes(data, n=10, seed=0, image_size=48)
    overrides = [f"data.train_captions={data}/captions_train.json", f"data.images={data}/images",
                 "data.image_size=32", f"data.cache_dir={tmp_path / 'cache'}", "model.encoder=small",
                 "model.small_channels=8", "model.grid=2", "model.weights=none"]
    vocab = Vocabulary(TINY_WORDS)
    for coords in (False, True):
        cfg = load_config(None, [*overrides, f"model.coord_features={coords}"])
        torch.manual_seed(cfg.train.seed)  # as training does: the same encoder weights in both runs
        model = build_model(cfg.model, len(vocab))
        split = split_data(cfg, "train", vocab, model.encoder, tmp_path / f"run{coords}",
                           runtime=resolve_runtime("cpu", "fp32"), progress=False)
        assert split.features is not None and split.features.shape[2] == model.encoder.out_dim == 8 + 2 * coords


# ----------------------------------------------------------------------------- decoding options


def test_decoding_options_are_the_decode_config():
    assert caption.decoding.DecodeConfig is DecodeConfig  # one options type: what a config's decode section holds
    assert not hasattr(caption.decoding, "DecodingOptions")
    decode = DecodeConfig(beam_size=4, max_len=9, min_len=2, length_penalty=0.5, suppress_unk=False)
    assert decode.with_overrides(beam_size=1, length_penalty=None) == dataclasses.replace(decode, beam_size=1)
    assert decode.with_overrides(length_penalty=None) == decode
    with pytest.raises(TypeError, match="beam"):
        decode.with_overrides(beam=3)
    with pytest.raises(ValueError, match="decode.beam_size"):
        decode.with_overrides(beam_size=0)


def _end_loving_checkpoint(path: Path, min_len: int) -> Path:
    """A tiny checkpoint whose decoder says <end> first unless decode.min_len forbids it."""
    from caption.checkpoint import save_checkpoint
    from caption.config import Config, DataConfig
    from caption.model import build_model

    cfg = Config(name="end", data=DataConfig(image_size=32), model=tiny_model_config(),
                 decode=DecodeConfig(beam_size=2, max_len=6, min_len=min_len))
    vocab = Vocabulary(TINY_WORDS)
    model = build_model(cfg.model, len(vocab))
    with torch.no_grad():
        model.decoder.out.bias[END_ID] = 100.0
    return save_checkpoint(path, model, cfg, vocab)


def test_evaluate_honours_decode_min_len(tmp_path, monkeypatch):

    data = tmp_path / "shapes"
    generate_shapes(data, n=10, seed=0, image_size=48)
    monkeypatch.chdir(tmp_path)
    for min_len, words in ((0, 0), (3, 3)):
        ckpt = _end_loving_checkpoint(tmp_path / f"min{min_len}.pt", min_len)
        scores = evaluate_checkpoint(ckpt, captions=str(data / "captions_test.json"), images=str(data / "images"),
                                     java=False, progress=False)
        assert scores["mean_words"] == words


def test_evaluate_writes_a_pt_files_results_under_the_working_directory(tmp_path, monkeypatch):

    data = tmp_path / "shapes"
    generate_shapes(data, n=10, seed=0, image_size=48)
    package = tmp_path / "site-packages" / "assets"
    ckpt = make_tiny_checkpoint(package / "model.pt")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    evaluate_checkpoint(ckpt, captions=str(data / "captions_test.json"), images=str(data / "images"),
                        java=False, progress=False)
    assert sorted(p.name for p in package.iterdir()) == ["model.pt"]  # nothing written beside the file
    assert (work / "runs" / "eval" / "model" / "captions_captions_test.json").is_file()
    scores = json.loads((work / "runs" / "eval" / "model" / "scores_captions_test.json").read_text())
    assert scores["images"] == 1  # 10 images, a tenth of them in the test split
    assert {"repeated_bigram_rate", "distinct_captions", "no_repeat_ngram"} <= set(scores)


# ----------------------------------------------------------------------------- errors


def test_an_internal_bug_keeps_its_traceback(monkeypatch):
    """Only CaptionError is a user error; a ValueError from a bug is not turned into one line."""
    from caption.commands import main as cli

    def broken(args):
        raise ValueError("a bug")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["shapes"].set_defaults(func=broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["shapes", "--out", "nowhere"])


def test_a_java_failure_is_one_line(tmp_path, monkeypatch, capsys):
    from caption.commands.main import main

    data = tmp_path / "shapes"
    generate_shapes(data, n=10, seed=0, image_size=48)
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt")
    fake = tmp_path / "bin" / "java"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Error: could not create the Java Virtual Machine.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    code = main(["evaluate", "--checkpoint", str(ckpt), "--captions", str(data / "captions_test.json"),
                 "--images", str(data / "images")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert code == 2
    assert len(err) == 1 and err[0].startswith("caption evaluate: error: ") and "--no-java" in err[0]


@pytest.mark.parametrize("override", ["model.attention=bahdanau", "model.gate=sometimes", "model.init_state=random",
                                      "model.encoder=resnet9000", "model.attention=dot", "data.metric=bleu",
                                      "train.select_metric=accuracy", "train.lr_schedule=linear"])
def test_a_bad_choice_fails_before_anything_is_written(tmp_path, capsys, override):
    from caption.commands.main import main

    data = tmp_path / "shapes"
    generate_shapes(data, n=10, seed=0, image_size=48)
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  train_captions: {data}/captions_train.json\n  val_captions: {data}/captions_val.json\n"
                      f"  images: {data}/images\n  image_size: 32\nmodel:\n  encoder: small\n  small_channels: 8\n"
                      "  grid: 2\n  hidden_dim: 16\ntrain:\n  epochs: 1\n")
    for command in ("train", "prepare"):
        run = tmp_path / f"run_{command}"
        code = main([command, "--config", str(config), "--run-dir", str(run), override])
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not a progress bar
        assert code == 2 and len(err) == 1 and override.split("=")[0] in err[0], err
        assert not run.exists()


def test_a_registered_task_metric_is_scored_and_selectable():
    """A data set's own metric plugs in by name: check_config accepts its keys, score_results adds them."""
    from caption.config import ConfigError
    from caption.data.records import ImageRecord
    from caption.decoding import DecodingResult
    from caption.evaluation import scoring
    from caption.training.splits import check_config

    class Length:
        keys = ("mean_tokens",)

        def __init__(self, captions_file):
            self.file = captions_file

        def score(self, results):
            return {"mean_tokens": sum(len(r.tokens) for r in results.values()) / len(results)}

    scoring.register_task_metric("test-length", Length)
    cfg = load_config(None, ["model.encoder=small", "data.metric=test-length", "train.select_metric=mean_tokens"])
    check_config(cfg)
    with pytest.raises(ConfigError, match="select_metric"):
        check_config(load_config(None, ["model.encoder=small", "train.select_metric=mean_tokens"]))
    metric = scoring.task_metric("test-length", "captions.json")
    result = DecodingResult([4, 5, END_ID], ["a", "red", "<end>"], -1.0, -1.0, torch.ones(3, 1, 1), True)
    records = [ImageRecord(7, Path("x.png"), ("a red circle",))]
    scores = scoring.score_results({7: result}, records, java=False, metric=metric).scores
    assert scores["mean_tokens"] == 3 and "CIDEr" in scores


def test_models_are_loaded_in_one_place():
    """Only caption.inference builds a CaptionModel; the commands and the demo go through its load()."""
    builders = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                if "CaptionModel(" in p.read_text() and p.name != "inference.py"]
    assert builders == []
    readers = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                     if "load_checkpoints(" in p.read_text())
    assert readers == ["checkpoint.py", "inference.py", "training/pretrained.py"]  # the last: distillation's teachers
