"""Attention overlays: heatmap geometry, figure panels over the photo as taken, atomic PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FakeResult
from PIL import Image

from caption.viz.overlay import (
    INIT_TITLE,
    SCALE_MAX,
    attention_map,
    colormap_table,
    legend_strip,
    overlay,
    ratio_value,
    safe_filename,
    save_overlay,
    save_per_word,
)


def make_result(words: list[str], gh: int, gw: int, tensor: bool = True) -> FakeResult:
    """Each word attends to a different cell (word i -> cell i mod L), maps sum to 1."""
    t = len(words)
    alphas = np.full((t, gh, gw), 0.01 / max(gh * gw - 1, 1))
    for i in range(t):
        alphas[i].flat[i % (gh * gw)] = 0.99 if gh * gw > 1 else 1.0
    alphas /= alphas.sum(axis=(1, 2), keepdims=True)
    caption = " ".join(w for w in words if w != "<end>")
    return FakeResult(words, torch.tensor(alphas) if tensor else alphas, caption, -4.25)


WORDS = ["a", "dog", "on", "the", "grass", "<end>"]


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))


def panels(fig) -> list:
    """The figure's photo panels (its colour bar, the legend, left out)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


# ----------------------------------------------------------------------------- attention_map


def test_attention_map_shape_and_peak_on_non_square_grid() -> None:
    alpha = np.full((3, 5), 0.02)
    alpha[0, 0] = 1.0 - 0.02 * 14
    heat = attention_map(alpha, (200, 120), scale="minmax")
    assert heat.shape == (120, 200)
    assert heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert y < 60 and x < 100, "peak must stay in the top-left quadrant"


def test_attention_map_peak_bottom_right_and_raw_cells() -> None:
    alpha = torch.zeros(7, 7)
    alpha[6, 6] = 1.0
    for smooth in (True, False):
        heat = attention_map(alpha, (70, 35), smooth=smooth)
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        assert heat.shape == (35, 70) and y >= 17 and x >= 35
    raw = attention_map(alpha, (70, 35), smooth=False)
    assert raw[-1, -1] == 1.0 and raw[0, 0] == 0.0  # nearest: exactly the hot cell


def test_attention_map_flat_and_bad_input() -> None:
    assert not attention_map(np.full((6, 6), 1 / 36), (10, 4)).any()
    assert attention_map(np.ones((1, 1)), (1, 1)).shape == (1, 1)
    with pytest.raises(ValueError, match="gh, gw"):
        attention_map(np.ones((2, 2, 2)), (4, 4))
    with pytest.raises(ValueError, match="NaN"):
        attention_map(np.array([[np.nan, 1.0]]), (4, 4))


# ----------------------------------------------------------------------------- overlay figure


@pytest.mark.parametrize("grid", [(7, 7), (3, 5), (14, 14)])
def test_overlay_one_panel_per_word_plus_photo(photo: Image.Image, grid: tuple[int, int]) -> None:
    fig = overlay(make_result(WORDS, *grid), photo)
    assert len(panels(fig)) == 1 + len(WORDS)
    titles = [ax.get_title() for ax in panels(fig)]
    assert titles[1:] == WORDS
    assert titles[0] == "a dog on the grass"


def test_overlay_long_caption_wraps_into_rows(photo: Image.Image) -> None:
    words = [f"w{i}" for i in range(17)] + ["<end>"]
    fig = overlay(make_result(words, 7, 7), photo)
    assert len(panels(fig)) == 19
    cols = {round(ax.get_position().x0, 3) for ax in panels(fig)}
    assert len(cols) <= 5
    width, height = fig.get_size_inches()
    assert height > width / 5 * 3, "figure height grows with the number of rows"
    assert len(panels(overlay(make_result(words, 7, 7), photo, cols=3, title=False))) == 19
    untitled = overlay(make_result(WORDS, 7, 7), photo, title=False)
    assert all(ax.get_title() == "" for ax in panels(untitled))


def test_overlay_odd_images() -> None:
    result = make_result(WORDS, 7, 7, tensor=False)
    tiny = Image.new("RGB", (1, 1), "red")
    assert len(panels(overlay(result, tiny))) == 7
    rgba = Image.new("RGBA", (2000, 1300), (0, 128, 255, 100))
    assert len(panels(overlay(result, rgba))) == 7
    gray = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (1500, 8)))  # "L", 2048x1500
    fig = overlay(make_result(WORDS, 3, 5), gray)
    assert len(panels(fig)) == 7 and panels(fig)[1].get_images()[0].get_array().shape[-1] == 3


def test_overlay_rejects_misaligned_words(photo: Image.Image) -> None:
    result = make_result(WORDS, 7, 7)
    result.words = WORDS[:-1]
    with pytest.raises(ValueError, match="align"):
        overlay(result, photo)


# ----------------------------------------------------------------------------- files


def test_save_overlay_writes_png_atomically(tmp_path: Path, photo: Image.Image) -> None:
    src = tmp_path / "photo.png"
    photo.save(src)
    out = save_overlay(make_result(WORDS, 7, 7), src, tmp_path / "sub" / "ov.png", cols=3)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 100
    assert sorted(p.name for p in out.parent.iterdir()) == ["ov.png"]
    with pytest.raises(ValueError, match="png"):
        save_overlay(make_result(WORDS, 7, 7), photo, tmp_path / "ov.jpg")


def test_save_per_word_one_file_per_word(tmp_path: Path, photo: Image.Image) -> None:
    words = ["a", "dog/cat", "..", "café", "<end>"]
    paths = save_per_word(make_result(words, 6, 6), photo, tmp_path / "words")
    names = ["00_a.png", "01_dog_cat.png", "02_tok.png", "03_cafe.png", "04_end.png"]
    assert [p.name for p in paths] == names
    assert sorted(p.name for p in (tmp_path / "words").iterdir()) == sorted(p.name for p in paths)
    for p in paths:
        with Image.open(p) as img:
            assert img.size == (photo.width, photo.height + 30) and img.mode == "RGB"  # photo + legend
    assert safe_filename("") == "tok" and safe_filename("a" * 99) == "a" * 40


# ----------------------------------------------------------------------------- the photo as taken


def _exif_portrait(path: Path) -> Path:
    """Stored 90x40 with EXIF orientation 6 (rotate on display): upright it is 40x90."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(path, exif=exif)
    return path


def test_overlay_draws_on_the_upright_photo_at_its_aspect(tmp_path: Path) -> None:
    path = _exif_portrait(tmp_path / "portrait.jpg")
    fig = overlay(make_result(WORDS, 7, 7), path)
    for ax in panels(fig):
        img = ax.get_images()[0].get_array()
        assert img.shape[:2] == (90, 40), "upright, never squashed to a square"
    width, height = fig.get_size_inches()
    assert height > 0.9 * width, "two rows of portrait panels: about as tall as five are wide"


def test_grid_cells_map_onto_rectangles_of_the_photo() -> None:
    """The model sees the whole photo resized to a square, so cell (i, j) covers the rectangle
    [j/gw, (j+1)/gw) x [i/gh, (i+1)/gh) of the photo whatever its aspect."""
    alpha = np.zeros((2, 4))
    alpha[1, 3] = 1.0
    raw = attention_map(alpha, (400, 100), smooth=False)  # (H, W)
    ys, xs = np.nonzero(raw)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (50, 99, 300, 399)


def test_overlay_init_panel_and_comparison(photo: Image.Image) -> None:
    first = make_result(WORDS, 3, 5)
    first.init_alphas = torch.full((3, 5), 1 / 15)
    second = make_result(["one", "cat", "<end>"], 3, 5)
    fig = overlay(first, photo, compare=second, labels=["additive", "concat"])
    titles = [ax.get_title() for ax in panels(fig)]
    # first model: photo, "before the first word", 6 words (8 panels = 2 rows of 5); then the second's rows
    assert titles[1] == INIT_TITLE and titles[2:8] == WORDS
    assert titles[0].startswith("additive: a dog") and titles[8].startswith("concat: one cat")
    assert titles[9:] == ["one", "cat", "<end>"]
    second_row_y = {round(ax.get_position().y0, 3) for ax in panels(fig)[8:]}
    assert len(second_row_y) == 1 and max(second_row_y) < min(ax.get_position().y0 for ax in panels(fig)[:5])
    assert len(panels(overlay(first, photo))) == 1 + 1 + len(WORDS)


def test_colormap_table_is_the_overlay_colormap() -> None:
    table = colormap_table("jet")
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert tuple(table[0]) == (0, 0, 128) and tuple(table[-1]) == (128, 0, 0)


# ----------------------------------------------------------------------------- the fixed colour scale


def test_flat_map_looks_flat_on_the_uniform_scale() -> None:
    """A nearly flat map stays at the bottom of the scale (min-max would stretch its noise to a blob)."""
    rng = np.random.default_rng(1)
    noisy = 1 / 49 + rng.uniform(-0.002, 0.002, (7, 7))
    noisy /= noisy.sum()
    assert attention_map(noisy, (70, 70)).max() < 0.05
    assert attention_map(noisy, (70, 70), scale="minmax").max() == pytest.approx(1.0)


def test_uniform_scale_is_the_same_for_every_map() -> None:
    """weight x L on one log scale: 16x flat is the top colour, 4x flat is half-way, on any grid."""
    for gh, gw in [(7, 7), (14, 14)]:
        L = gh * gw
        alpha = np.full((gh, gw), (1 - 4 / L) / (L - 1))
        alpha[0, 0] = 4 / L  # four times a flat map's weight
        raw = attention_map(alpha, (gw, gh), smooth=False)
        assert raw[0, 0] == pytest.approx(0.5) and raw[-1, -1] == 0.0
    hot = np.zeros((7, 7))
    hot[3, 3] = 1.0
    assert attention_map(hot, (7, 7), smooth=False)[3, 3] == 1.0  # 49x flat: clipped at the top
    assert ratio_value(SCALE_MAX) == pytest.approx(1.0) and ratio_value(1.0) == 0.0
    with pytest.raises(ValueError, match="scale"):
        attention_map(hot, (7, 7), scale="log")


def test_figure_and_per_word_pngs_carry_the_legend(tmp_path: Path, photo: Image.Image) -> None:
    fig = overlay(make_result(WORDS, 7, 7), photo)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "flat" in bars[0].get_xlabel()
    minmax = overlay(make_result(WORDS, 7, 7), photo, scale="minmax")
    assert "min-max" in [ax for ax in minmax.axes if ax.get_label() == "<colorbar>"][0].get_xlabel()
    paths = save_per_word(make_result(WORDS, 7, 7), photo, tmp_path)
    with Image.open(paths[0]) as png:
        assert png.size == (photo.width, photo.height + 30)  # the photo, then the legend strip
    strip = legend_strip(90)
    assert strip.shape == (30, 90, 3) and tuple(strip[0, 0]) == tuple(colormap_table("jet")[0])
