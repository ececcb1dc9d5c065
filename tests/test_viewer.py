"""The HTML viewer's page (caption.viewer): self-contained, its data, the photo as taken, small."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FakeResult
from PIL import Image

from caption.viz import viewer
from caption.viz.overlay import colormap_table

ROOT = Path(__file__).resolve().parents[1]


def fake(words: list[str], gh: int = 3, gw: int = 5, shift: int = 0, **kw) -> FakeResult:
    """Word i looks at cell (i + shift) mod L."""
    alphas = torch.full((len(words), gh, gw), 0.01)
    for i in range(len(words)):
        alphas[i].view(-1)[(i + shift) % (gh * gw)] = 1.0
    alphas /= alphas.sum((1, 2), keepdim=True)
    return FakeResult(words, alphas, " ".join(w for w in words if w != "<end>"), -3.5 - shift, **kw)


def page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    (raw,) = re.findall(r'<script id="data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(raw)


def decode_photo(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


@pytest.fixture
def portrait(tmp_path: Path) -> Path:
    """Stored 1200x500 with EXIF orientation 6: upright it is a 500x1200 portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rng = np.random.default_rng(0)
    path = tmp_path / "portrait.jpg"
    Image.fromarray(rng.integers(0, 255, (500, 1200, 3), dtype=np.uint8)).save(path, exif=exif)
    return path


def test_page_is_self_contained_and_escaped(tmp_path: Path) -> None:
    photo = Image.new("RGB", (90, 60), "gray")
    words = ["a", "<b>dog</b>", "&", "</script><script>alert(1)</script>", "<end>"]
    out = viewer.write_html(fake(words), photo, tmp_path / "view.html", title="<x> & y")
    text = out.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)=["'](?!data:)[^"']+""", text), "only data: URIs allowed"
    assert "<title>&lt;x&gt; &amp; y</title>" in text
    assert text.count("</script>") == 2 and "<b>dog" not in text
    assert "data:image/png" not in text, "heatmaps are drawn in the page, not embedded"
    data = page_data(out)
    assert data["photos"][0]["models"][0]["hyps"][0]["words"] == words
    assert data["gallery"] is False and data["errors"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view.html"]


def test_page_data_maps_and_colormap(tmp_path: Path) -> None:
    result = fake(["a", "dog", "<end>"], 3, 5)
    data = page_data(viewer.write_html(result, Image.new("RGB", (90, 60)), tmp_path / "v.html", alpha=0.4))
    reading = data["photos"][0]["models"][0]
    assert reading["grid"] == [3, 5] and reading["init"] is None
    (hyp,) = reading["hyps"]
    assert hyp["caption"] == "a dog" and hyp["log_prob"] == -3.5
    assert len(hyp["maps"]) == 3 and all(len(m) == 15 for m in hyp["maps"])
    for i, cells in enumerate(hyp["maps"]):  # weights in 1/10,000: the hot cell 1 / 1.14, the others 0.01 / 1.14
        assert cells.index(max(cells)) == i and set(cells) == {round(10_000 / 1.14), round(100 / 1.14)}
    assert data["cell_unit"] == 10_000 and data["scale"] == "uniform" and data["scale_max"] == 16
    assert data["colormap"] == colormap_table("jet").ravel().tolist() and len(data["colormap"]) == 768
    assert data["alpha"] == 0.4


def test_alternatives_init_and_comparison_are_in_the_page(tmp_path: Path) -> None:
    alt = fake(["a", "cat", "<end>"], shift=4)
    init = torch.zeros(3, 5)
    init[2, 4] = 1.0
    first = fake(["a", "dog", "<end>"], alternatives=(alt,), init_alphas=init)
    second = fake(["one", "dog"], shift=7)
    data = page_data(viewer.write_html(first, Image.new("RGB", (90, 60)), tmp_path / "v.html", compare=second,
                                       labels=["additive", "concat"]))
    assert data["labels"] == ["additive", "concat"]
    a, b = data["photos"][0]["models"]
    assert [h["caption"] for h in a["hyps"]] == ["a dog", "a cat"]
    assert a["hyps"][1]["log_prob"] == -7.5 and a["hyps"][1]["maps"][0].index(max(a["hyps"][1]["maps"][0])) == 4
    assert a["init"] == [0] * 14 + [10_000]
    assert b["init"] is None and [h["words"] for h in b["hyps"]] == [["one", "dog"]]


def test_photo_is_upright_at_its_aspect_and_display_size(tmp_path: Path, portrait: Path) -> None:
    entry = viewer.photo_entry("p", portrait, [fake(["a"])])
    img = decode_photo(entry["src"])
    assert img.size == (entry["width"], entry["height"]) == (267, 640)  # 500x1200 upright, long side 640
    small = viewer.photo_entry("s", Image.new("RGB", (40, 30)), [fake(["a"])])
    assert (small["width"], small["height"]) == (40, 30), "never enlarged in the file"


def test_gallery_page_lists_photos_and_errors(tmp_path: Path) -> None:
    photos = [viewer.photo_entry(f"p{i}.png", Image.new("RGB", (50 + 10 * i, 40)), [fake(["a", str(i)])])
              for i in range(3)]
    out = viewer.write_gallery(photos, tmp_path / "g.html", title="three", labels=["m"],
                               errors=["bad.jpg: not an image file"])
    data = page_data(out)
    assert data["gallery"] is True and [p["name"] for p in data["photos"]] == ["p0.png", "p1.png", "p2.png"]
    assert data["errors"] == ["bad.jpg: not an image file"]
    assert [p["width"] for p in data["photos"]] == [50, 60, 70]


def test_flat_and_empty_maps() -> None:
    assert viewer._cells(np.full((2, 2), 0.25)) == [2500] * 4  # absolute weights: the page's scale shows it flat
    assert viewer._cells(np.zeros((2, 3))) == [0] * 6


def test_viewer_assets_ship_in_the_wheel() -> None:
    """Every file the page is built from matches a package-data pattern of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["caption.viz"]
    for name in ("viewer.html", "viewer.css", "viewer.js"):
        asset = Path("assets") / name
        assert (ROOT / "caption" / "viz" / asset).is_file()
        assert any(asset.match(p) for p in patterns), f"{asset} is not package data"
