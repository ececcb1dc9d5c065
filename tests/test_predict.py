"""Inference API (caption.load) and the ``caption predict`` / ``caption attend`` commands.

The checkpoint is an untrained tiny model: its captions are arbitrary but valid, which is all
the plumbing (loading, preprocessing, batching, output, errors) needs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import caption
from caption.checkpoint import CheckpointError
from caption.commands.main import main
from caption.data.images import ImageError

JSON_KEYS = {"image", "caption", "tokens", "log_prob", "beam", "grid", "focus", "attention"}
ALTERNATIVE_KEYS = {"caption", "tokens", "log_prob", "attention"}
INFO_LINE = re.compile(r"^caption \w+: (precision |guidance off: )")  # stderr: what the model runs at, not an error


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops are dominated by thread wake-ups on a shared CPU: one thread is ~100x faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- image makers


def _noise(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def make_rgb(folder: Path, name: str, seed: int = 0, size=(48, 40)) -> Path:
    return _save(Image.fromarray(_noise(*size, seed)), folder / name)


MODES = {
    "rgba": lambda d: _save(Image.fromarray(_noise(40, 30, 1)).convert("RGBA"), d / "rgba.png"),
    "grey": lambda d: _save(Image.fromarray(_noise(40, 30, 2)).convert("L"), d / "grey.png"),
    "i16": lambda d: _save(Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)), d / "i16.png"),
    "cmyk": lambda d: _save(Image.fromarray(_noise(40, 30, 3)).convert("CMYK"), d / "cmyk.jpg"),
    "exif": lambda d: _exif_rotated(d / "exif.jpg"),
    "1x1": lambda d: _save(Image.new("RGB", (1, 1), (200, 10, 10)), d / "one.png"),
}


def _exif_rotated(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    return _save(Image.fromarray(_noise(60, 20, 4)), path, exif=exif)


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> Path:
    """6000x6000: decoded at 1/8 scale by load_image, so it is fast and small in memory."""
    img = Image.linear_gradient("L").resize((6000, 6000)).convert("RGB")
    return _save(img, tmp_path_factory.mktemp("large") / "large.jpg", quality=50)


@pytest.fixture
def good(tmp_path) -> Path:
    return make_rgb(tmp_path, "good.png")


def run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    """Run the CLI in-process: (exit status, stdout lines, stderr lines but the one saying which
    precision and device the model runs at)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), [line for line in err.splitlines() if not INFO_LINE.match(line)]


# ----------------------------------------------------------------------------- library API


def test_load_exposes_config_vocab_grid(tiny_checkpoint, good) -> None:
    model = caption.load(tiny_checkpoint)
    assert isinstance(model, caption.CaptionModel)
    assert model.grid == (3, 3)
    assert len(model.vocab) == 14
    assert model.config.data.image_size == 32
    assert model.options.beam_size == model.config.decode.beam_size == 2
    from_dir = caption.load(tiny_checkpoint.parent)  # a run directory works too: its best.pt
    assert from_dir.name == "best.pt" and from_dir.caption(good).tokens == model.caption(good).tokens


def test_caption_returns_words_with_normalised_attention(tiny_checkpoint, good) -> None:
    result = caption.load(tiny_checkpoint).caption(good)
    assert 1 <= len(result.words) <= 6
    assert result.alphas.shape == (len(result.words), 3, 3)
    torch.testing.assert_close(result.alphas.sum((1, 2)), torch.ones(len(result.words)))
    assert result.log_prob <= 0
    assert result.caption == " ".join(w for w in result.words if w != "<end>")


def test_configured_is_a_copy_and_the_model_knows_its_paths(tiny_checkpoint, tmp_path) -> None:
    from caption.config import ConfigError

    model = caption.load(tiny_checkpoint)
    greedy = model.configured(beam=1, max_len=3, no_repeat_ngram=2)
    assert (greedy.options.beam_size, greedy.options.max_len, greedy.options.no_repeat_ngram) == (1, 3, 2)
    assert model.options == model.config.decode and model.options.beam_size == 2  # unchanged
    assert greedy.model is model.model and greedy.encoder is model.encoder  # the weights are shared
    assert greedy.configured(max_len=None).options == greedy.options  # None keeps a setting
    assert model.paths == (tiny_checkpoint,) and caption.load(tiny_checkpoint.parent).paths == (tiny_checkpoint.parent,)
    assert caption.load([tiny_checkpoint, tiny_checkpoint]).paths == (tiny_checkpoint, tiny_checkpoint)
    with pytest.raises(ConfigError, match="beam_size"):
        model.configured(beam=0)
    with pytest.raises(TypeError, match="beams"):
        model.configured(beams=2)
    image = make_rgb(tmp_path, "one.png", seed=3, size=(40, 30))
    assert len(greedy.caption(image).words) <= 3
    assert model.caption(image).tokens == model.configured().caption(image).tokens
    assert model.configured(guide=True).guide is None  # nothing to take back: this encoder has no classifier


def test_the_model_offers_three_methods_and_load_prints_nothing(tiny_checkpoint, capsys, caplog) -> None:
    import logging

    methods = sorted(n for n, v in vars(caption.CaptionModel).items() if callable(v) and not n.startswith("_"))
    assert methods == ["caption", "captions", "configured"]
    with caplog.at_level(logging.INFO, logger="caption.inference"):
        model = caption.load(tiny_checkpoint, threads=1)
    assert capsys.readouterr() == ("", "")
    assert [r.getMessage() for r in caplog.records] == [model.runtime.describe(), f"guidance off: {model.guide_off}"]


def test_batch_call_equals_single_calls(tiny_checkpoint, tmp_path) -> None:
    model = caption.load(tiny_checkpoint)
    paths = [make_rgb(tmp_path, f"{i}.png", seed=i, size=(30 + 7 * i, 40)) for i in range(5)]
    inputs = paths[:2] + [tmp_path / "missing.png"] + paths[2:]
    outcomes = list(model.captions(inputs, batch_size=2))
    assert [o.image for o in outcomes] == inputs  # input order, the unreadable one in its place
    batched = [o.result for o in outcomes]
    assert isinstance(batched[2], ImageError) and "no such file" in str(batched[2])
    batched = batched[:2] + batched[3:]
    for path, got in zip(paths, batched):
        want = model.caption(path)
        assert got.tokens == want.tokens
        assert got.log_prob == pytest.approx(want.log_prob, abs=1e-4)
        torch.testing.assert_close(got.alphas, want.alphas, atol=1e-5, rtol=0)
    # the images really differ, so a row mix-up in the batch would be caught above
    assert not torch.allclose(batched[0].alphas[0], batched[4].alphas[0], atol=1e-5)


def test_a_pil_image_of_the_model_input_captions_as_the_file(tiny_checkpoint, tmp_path) -> None:
    from torchvision.transforms.functional import to_pil_image

    from caption.data.images import preprocess

    model = caption.load(tiny_checkpoint).configured(beam=1)
    path = make_rgb(tmp_path, "wide.png", size=(90, 30))
    seen = to_pil_image(preprocess(path, model.transform, pixels=True))  # the square image the encoder sees
    assert seen.size == (32, 32) and seen.mode == "RGB"
    from_file, from_seen = model.caption(path), model.caption(seen)
    assert from_seen.tokens == from_file.tokens
    torch.testing.assert_close(from_seen.alphas, from_file.alphas)


def test_beam_and_max_len_override_the_run_config(tiny_checkpoint, good) -> None:
    model = caption.load(tiny_checkpoint)
    assert len(model.configured(beam=1, max_len=2).caption(good).words) <= 2
    with pytest.raises(ValueError):
        model.configured(beam=0)


def test_caption_raises_image_error_for_a_bad_file(tiny_checkpoint, tmp_path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="notes.txt"):
        caption.load(tiny_checkpoint).caption(bad)


def test_default_checkpoint_is_the_shipped_model() -> None:
    from caption import inference

    shipped = list(inference.SHIPPED_MODELS)
    assert inference.default_checkpoint() == shipped and all(p.is_file() for p in shipped)
    files = list(inference.ASSETS.glob("*.pt"))  # every model file ships inside the package
    assert set(shipped + list(inference.SHIPPED_ENSEMBLE)) <= set(files)
    assert sum(p.stat().st_size for p in files) <= 60 * 2**20


def test_default_checkpoint_missing_says_run_demo(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    from caption import inference

    monkeypatch.setattr(inference, "SHIPPED_MODELS", (tmp_path / "absent.pt",))  # a build without the asset
    assert inference.default_checkpoint() == [inference.DEMO_RUN_DIR]
    with pytest.raises(CheckpointError, match="caption demo"):
        caption.load()


def test_visualize_is_a_lazy_attribute() -> None:
    assert callable(caption.visualize.overlay) and callable(caption.viewer.write_html)
    assert "load" in dir(caption)
    with pytest.raises(AttributeError):
        caption.no_such_thing  # noqa: B018


# ----------------------------------------------------------------------------- caption predict


def test_predict_files_and_folder_plain(tiny_checkpoint, tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    inside = [make_rgb(folder, name, seed=i) for i, name in enumerate(["b.jpg", "a.png", "c.bmp"])]
    (folder / "readme.txt").write_text("ignored: not an image extension")
    single = make_rgb(tmp_path, "single.png", seed=9)
    code, out, err = run(capsys, "predict", str(single), str(folder), "--checkpoint", str(tiny_checkpoint))
    assert code == 0 and err == []
    assert [line.split("\t")[0] for line in out] == [str(single)] + [str(p) for p in sorted(inside)]
    for line in out:
        path, text = line.split("\t")
        assert text == caption.load(tiny_checkpoint).caption(path).caption


def test_predict_json_lines(tiny_checkpoint, tmp_path, capsys) -> None:
    paths = [make_rgb(tmp_path, f"{i}.png", seed=i) for i in range(3)]
    code, out, err = run(capsys, "predict", *map(str, paths), "--checkpoint", str(tiny_checkpoint),
                         "--json", "--beam", "3", "--batch-size", "2")
    assert code == 0 and err == []
    records = [json.loads(line) for line in out]
    assert [r["image"] for r in records] == [str(p) for p in paths]
    model = caption.load(tiny_checkpoint)
    for path, r in zip(paths, records):
        assert set(r) == JSON_KEYS | {"alternatives"}
        assert r["beam"] == 3 and r["grid"] == [3, 3]
        assert 1 <= len(r["tokens"]) <= 6 and all(isinstance(t, str) for t in r["tokens"])
        assert r["caption"] == " ".join(t for t in r["tokens"] if t != "<end>")
        assert isinstance(r["log_prob"], float) and r["log_prob"] <= 0
        want = model.configured(beam=3, alternatives=True).caption(path)
        _assert_maps(r["attention"], want.alphas)
        flat = want.alphas.double().flatten(1).clamp_min(1e-12)  # (T, L)
        spread = (-(flat * flat.log()).sum(1)).exp()  # exp(entropy): cells the map is spread over
        assert r["focus"] == pytest.approx(spread.tolist(), abs=0.051) and all(1 <= f <= 9.05 for f in r["focus"])
        assert len(r["alternatives"]) == len(want.alternatives) <= 2
        for got, alt in zip(r["alternatives"], want.alternatives):
            assert set(got) == ALTERNATIVE_KEYS and got["tokens"] == alt.words and got["caption"] == alt.caption
            assert got["log_prob"] == pytest.approx(alt.log_prob, abs=1e-5) and got["log_prob"] <= r["log_prob"]
            _assert_maps(got["attention"], alt.alphas)
    assert any(r["alternatives"] for r in records)


def _assert_maps(got: list, alphas: torch.Tensor) -> None:
    """T lists of gh lists of gw weights, rounded to 4 decimals."""
    assert np.asarray(got).shape == tuple(alphas.shape)
    assert all(round(v, 4) == v for v in np.asarray(got).ravel().tolist())
    np.testing.assert_allclose(np.asarray(got), alphas.numpy(), atol=5e-5 + 1e-7)


def test_predict_json_greedy_has_no_alternatives(tiny_checkpoint, good, capsys) -> None:
    code, out, _ = run(capsys, "predict", str(good), "--checkpoint", str(tiny_checkpoint), "--json", "--beam", "1")
    (record,) = [json.loads(line) for line in out]
    assert code == 0 and set(record) == JSON_KEYS and record["beam"] == 1


def test_predict_json_init_attention() -> None:
    """A result with a map before the first word (model.init_state=attend) prints it as init_attention."""
    from caption.decoding import DecodingResult
    from caption.guidance.record import as_json, caption_record

    init = torch.tensor([[0.123456, 0.876544]])
    alphas = torch.tensor([[[0.25, 0.75]], [[0.5, 0.5]]])
    result = DecodingResult(tokens=[5, 3], words=["dog", "<end>"], log_prob=-1.5, score=-1.5, alphas=alphas,
                            finished=True, init_alphas=init)
    record = as_json(caption_record("x.jpg", result, beam=1))
    assert record["init_attention"] == [[0.1235, 0.8765]]
    assert record["attention"] == [[[0.25, 0.75]], [[0.5, 0.5]]] and record["grid"] == [1, 2]


def _bad_input(kind: str, tmp: Path) -> Path:
    if kind == "missing":
        return tmp / "nope.jpg"
    if kind == "empty folder":
        (tmp / "empty").mkdir()
        (tmp / "empty" / "notes.txt").write_text("no images here")
        return tmp / "empty"
    if kind == "text file":
        (tmp / "notes.txt").write_text("hello")
        return tmp / "notes.txt"
    if kind == "text named .jpg":
        (tmp / "fake.jpg").write_text("hello")
        return tmp / "fake.jpg"
    data = (make_rgb(tmp, "full.jpg", size=(200, 150))).read_bytes()  # truncated JPEG
    (tmp / "cut.jpg").write_bytes(data[: len(data) // 2])
    return tmp / "cut.jpg"


@pytest.mark.parametrize("kind", ["missing", "empty folder", "text file", "text named .jpg", "truncated jpeg"])
def test_predict_bad_input_one_line_exit_1_others_captioned(kind, tiny_checkpoint, tmp_path, good, capsys) -> None:
    bad = _bad_input(kind, tmp_path)
    other = make_rgb(tmp_path, "other.png", seed=5)
    code, out, err = run(capsys, "predict", str(good), str(bad), str(other), "--checkpoint", str(tiny_checkpoint))
    assert code == 1
    assert len(err) == 1 and err[0].startswith(f"caption predict: error: {bad}: "), err
    assert [line.split("\t")[0] for line in out] == [str(good), str(other)]


def test_predict_missing_checkpoint_exit_2(tmp_path, good, capsys) -> None:
    code, out, err = run(capsys, "predict", str(good), "--checkpoint", str(tmp_path / "nothing.pt"))
    assert code == 2 and out == []
    assert len(err) == 1 and "nothing.pt" in err[0] and err[0].startswith("caption predict: error: ")


def test_predict_corrupt_checkpoint_exit_2(tmp_path, good, capsys) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    code, out, err = run(capsys, "predict", str(good), "--checkpoint", str(bad))
    assert code == 2 and out == []
    assert len(err) == 1 and "cannot read checkpoint" in err[0]


def test_predict_default_checkpoint_missing_says_run_demo(tmp_path, good, capsys, monkeypatch) -> None:
    from caption import inference

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inference, "SHIPPED_MODELS", (tmp_path / "absent.pt",))  # a build without the asset
    code, out, err = run(capsys, "predict", str(good))
    assert code == 2 and out == []
    assert len(err) == 1 and "caption demo" in err[0] and "--checkpoint" in err[0]


def test_predict_unknown_device_exit_2(tiny_checkpoint, good, capsys) -> None:
    code, out, err = run(capsys, "predict", str(good), "--checkpoint", str(tiny_checkpoint), "--device", "nonsense")
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith("caption predict: error: --device nonsense")


@pytest.mark.parametrize("kind", sorted(MODES))
def test_predict_any_mode_and_size(kind, tiny_checkpoint, tmp_path, capsys) -> None:
    path = MODES[kind](tmp_path)
    code, out, err = run(capsys, "predict", str(path), "--checkpoint", str(tiny_checkpoint), "--json")
    assert code == 0 and err == []
    assert json.loads(out[0])["grid"] == [3, 3]


def test_predict_large_image(tiny_checkpoint, large_jpeg, capsys) -> None:
    code, out, err = run(capsys, "predict", str(large_jpeg), "--checkpoint", str(tiny_checkpoint))
    assert code == 0 and err == [] and out[0].startswith(f"{large_jpeg}\t")


def test_exif_orientation_is_applied(tiny_checkpoint, tmp_path) -> None:
    from caption.data.images import open_rgb

    upright = open_rgb(MODES["exif"](tmp_path))  # what CaptionModel.captions reads it with (preprocess)
    assert upright.size == (20, 60)  # stored 60x20, displayed rotated
    assert caption.load(tiny_checkpoint).caption(MODES["exif"](tmp_path)).tokens == \
        caption.load(tiny_checkpoint).caption(upright).tokens


# ----------------------------------------------------------------------------- caption attend


def test_attend_writes_png_html_and_per_word(tiny_checkpoint, good, tmp_path, capsys) -> None:
    out_png = tmp_path / "out" / "attn.png"
    code, out, err = run(capsys, "attend", str(good), "--out", str(out_png), "--checkpoint", str(tiny_checkpoint),
                         "--html", "--per-word", "--beam", "1")
    assert code == 0 and err == []
    words = caption.load(tiny_checkpoint).configured(beam=1).caption(good).words
    assert out[0] == f"{good}\t{' '.join(w for w in words if w != '<end>')}"
    written = [Path(p) for p in out[1:]]
    assert written[:2] == [out_png, out_png.with_suffix(".html")]
    with Image.open(out_png) as img:
        img.load()
        assert img.format == "PNG" and img.width > 100
    assert '<script id="data" type="application/json">' in out_png.with_suffix(".html").read_text()
    folder = tmp_path / "out" / "attn_words"
    assert sorted(folder.iterdir()) == sorted(written[2:]) and len(written[2:]) == len(words)
    for p in written[2:]:
        with Image.open(p) as img:
            assert img.size == (48, 40 + 30)  # the photo as taken (not the 32x32 square the model saw), then the legend


def test_attend_html_only(tiny_checkpoint, good, tmp_path, capsys) -> None:
    target = tmp_path / "view.html"
    code, out, err = run(capsys, "attend", str(good), "--out", str(target), "--checkpoint", str(tiny_checkpoint))
    assert code == 0 and err == [] and out[1:] == [str(target)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.png", "view.html"]


def test_attend_per_word_replaces_an_earlier_longer_run(tiny_checkpoint, good, tmp_path, capsys) -> None:
    folder = tmp_path / "a_words"
    folder.mkdir()
    for i in range(9):
        (folder / f"{i:02d}_old.png").write_bytes(b"stale")
    (folder / "keep.txt").write_text("not ours")
    code, out, _ = run(capsys, "attend", str(good), "--out", str(tmp_path / "a.png"), "--per-word",
                       "--checkpoint", str(tiny_checkpoint))
    assert code == 0
    assert sorted(folder.iterdir()) == sorted([Path(p) for p in out[2:]] + [folder / "keep.txt"])


def test_attend_bad_image_and_bad_out(tiny_checkpoint, tmp_path, good, capsys) -> None:
    code, out, err = run(capsys, "attend", str(tmp_path / "nope.png"), "--out", str(tmp_path / "o.png"),
                         "--checkpoint", str(tiny_checkpoint))
    assert code == 1 and out == [] and len(err) == 1 and "nope.png: no such file" in err[0]
    code, out, err = run(capsys, "attend", str(good), "--out", str(tmp_path / "o.jpg"),
                         "--checkpoint", str(tiny_checkpoint))
    assert code == 2 and out == [] and len(err) == 1 and ".png" in err[0]
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.jpg").exists()


def test_attend_missing_checkpoint(tmp_path, good, capsys) -> None:
    code, out, err = run(capsys, "attend", str(good), "--out", str(tmp_path / "o.png"),
                         "--checkpoint", str(tmp_path / "run"))
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith("caption attend: error: ")


@pytest.mark.slow
def test_console_script_help() -> None:
    exe = shutil.which("caption")
    if exe is None:
        pytest.skip("the `caption` console script is not on PATH (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "predict" in proc.stdout and "attend" in proc.stdout


# ----------------------------------------------------------------------------- caption attend: galleries, --compare


def _page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S).group(1))


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> Path:
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("second") / "general.pt", "general", seed=2)


def test_attend_folder_writes_one_gallery(tiny_checkpoint, tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    good = [make_rgb(folder, "a.png", seed=1), make_rgb(folder, "c.jpg", seed=2, size=(30, 50))]
    (folder / "b.jpg").write_text("not a photo")
    extra = make_rgb(tmp_path, "extra.png", seed=3)
    page = tmp_path / "gallery.html"
    code, out, err = run(capsys, "attend", str(folder), str(extra), str(tmp_path / "gone.png"), "--out", str(page),
                         "--checkpoint", str(tiny_checkpoint), "--batch-size", "2")
    assert code == 1
    assert err == [f"caption attend: error: {tmp_path / 'gone.png'}: no such file or folder",
                   f"caption attend: error: {folder / 'b.jpg'}: not an image file (or an unsupported format)"]
    model = caption.load(tiny_checkpoint)
    photos = [*good, extra]
    assert out == [f"{p}\t{model.caption(p).caption}" for p in photos] + [str(page)]
    data = _page_data(page)
    assert data["gallery"] is True and data["labels"] == ["best.pt (additive)"]
    assert [p["name"] for p in data["photos"]] == [str(p) for p in photos]
    assert [line.split(":")[0] for line in data["errors"]] == [str(tmp_path / "gone.png"), str(folder / "b.jpg")]
    assert (data["photos"][1]["width"], data["photos"][1]["height"]) == (30, 50)
    hyps = data["photos"][0]["models"][0]["hyps"]
    want = model.configured(alternatives=True).caption(good[0])
    assert [h["caption"] for h in hyps] == [want.caption] + [a.caption for a in want.alternatives]


def test_attend_gallery_of_bad_files_writes_nothing(tiny_checkpoint, tmp_path, capsys) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.jpg").write_text("no")
    page = tmp_path / "g.html"
    code, out, err = run(capsys, "attend", str(tmp_path / "photos"), "--out", str(page),
                         "--checkpoint", str(tiny_checkpoint))
    assert code == 1 and out == [] and not page.exists()
    assert len(err) == 2 and "x.jpg: not an image file" in err[0] and "not written" in err[1]


@pytest.mark.parametrize("name, flags, message", [("g.png", (), "gallery page"), ("g.html", ("--per-word",), "--per-word")])
def test_attend_gallery_bad_options_exit_2(name, flags, message, tiny_checkpoint, tmp_path, good, capsys) -> None:
    code, out, err = run(capsys, "attend", str(tmp_path), "--out", str(tmp_path / name), *flags,
                         "--checkpoint", str(tiny_checkpoint))
    assert code == 2 and out == [] and len(err) == 1 and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.png"]


def test_attend_compare_single_photo(tiny_checkpoint, second_checkpoint, good, tmp_path, capsys) -> None:
    target = tmp_path / "both.png"
    code, out, err = run(capsys, "attend", str(good), "--out", str(target), "--html", "--beam", "2",
                         "--checkpoint", str(tiny_checkpoint), "--compare", str(second_checkpoint))
    assert code == 0 and err == []
    first, second = (caption.load(c).configured(beam=2).caption(good)
                     for c in (tiny_checkpoint, second_checkpoint))
    assert out == [f"{good}\t{first.caption}\t{second.caption}", str(target), str(target.with_suffix(".html"))]
    data = _page_data(target.with_suffix(".html"))
    assert data["labels"] == ["best.pt (additive)", "general.pt (general)"]
    readings = data["photos"][0]["models"]
    assert [r["hyps"][0]["words"] for r in readings] == [first.words, second.words]


def test_attend_compare_same_file_twice_and_missing(tiny_checkpoint, good, tmp_path, capsys) -> None:
    page = tmp_path / "v.html"
    code, _, _ = run(capsys, "attend", str(good), "--out", str(page), "--checkpoint", str(tiny_checkpoint),
                     "--compare", str(tiny_checkpoint))
    assert code == 0 and _page_data(page)["labels"] == ["best.pt (additive)", "best.pt (additive) (--compare)"]
    code, out, err = run(capsys, "attend", str(good), "--out", str(tmp_path / "w.html"),
                         "--checkpoint", str(tiny_checkpoint), "--compare", str(tmp_path / "absent.pt"))
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith("caption attend: error: --compare ")
    assert not (tmp_path / "w.html").exists()
