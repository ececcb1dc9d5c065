"""Attention overlays: heatmap geometry, figure panels, atomic PNGs, and the HTML viewer."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from caption.visualize import (
    attention_map,
    overlay,
    safe_filename,
    save_overlay,
    save_per_word,
    write_html,
)


@dataclass
class FakeResult:
    """Stand-in for caption.decoding's result: same fields."""

    words: list[str]
    alphas: Any
    caption: str
    log_prob: float


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


# ----------------------------------------------------------------------------- attention_map


def test_attention_map_shape_and_peak_on_non_square_grid() -> None:
    alpha = np.full((3, 5), 0.02)
    alpha[0, 0] = 1.0 - 0.02 * 14
    heat = attention_map(alpha, (200, 120))
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
    assert len(fig.axes) == 1 + len(WORDS)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1:] == WORDS
    assert titles[0] == "a dog on the grass"


def test_overlay_long_caption_wraps_into_rows(photo: Image.Image) -> None:
    words = [f"w{i}" for i in range(17)] + ["<end>"]
    fig = overlay(make_result(words, 7, 7), photo)
    assert len(fig.axes) == 19
    cols = {round(ax.get_position().x0, 3) for ax in fig.axes}
    assert len(cols) <= 5
    width, height = fig.get_size_inches()
    assert height > width / 5 * 3, "figure height grows with the number of rows"
    assert len(overlay(make_result(words, 7, 7), photo, cols=3, title=False).axes) == 19
    untitled = overlay(make_result(WORDS, 7, 7), photo, title=False)
    assert all(ax.get_title() == "" for ax in untitled.axes)


def test_overlay_odd_images() -> None:
    result = make_result(WORDS, 7, 7, tensor=False)
    tiny = Image.new("RGB", (1, 1), "red")
    assert len(overlay(result, tiny).axes) == 7
    rgba = Image.new("RGBA", (2000, 1300), (0, 128, 255, 100))
    assert len(overlay(result, rgba).axes) == 7
    gray = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (1500, 8)))  # "L", 2048x1500
    fig = overlay(make_result(WORDS, 3, 5), gray)
    assert len(fig.axes) == 7 and fig.axes[1].get_images()[0].get_array().shape[-1] == 3


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
            assert img.size == photo.size and img.mode == "RGB"
    assert safe_filename("") == "tok" and safe_filename("a" * 99) == "a" * 40


def test_write_html_self_contained(tmp_path: Path, photo: Image.Image) -> None:
    words = ["a", "<b>dog</b>", "&", "\"cat\"", "<end>"]
    out = write_html(make_result(words, 3, 5), photo, tmp_path / "view.html", title="<x> & y")
    text = out.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)=["'](?!data:)[^"']+""", text), "only data: URIs allowed"
    spans = re.findall(r'<span class="word" data-index="(\d+)"', text)
    assert spans == [str(i) for i in range(len(words))]
    assert text.count("data:image/png;base64,") == 1 + len(words) + 1  # photo, per word, #overlay
    assert 'id="overlay"' in text
    assert "&lt;b&gt;dog&lt;/b&gt;" in text and "<b>dog" not in text and "&lt;end&gt;" in text
    assert "<title>&lt;x&gt; &amp; y</title>" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view.html"]


# ----------------------------------------------------------------------------- real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Headless Chromium via selenium, fully offline; skips only if a piece is missing."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium not installed (pip install selenium)"
    )
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = _chromium(), shutil.which("chromedriver")
    if browser is None or chromedriver is None:
        pytest.skip("chromium/chromedriver not found (apt-get install chromium chromium-driver)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let selenium-manager download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--window-size=1000,900", f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(flag)
    service = Service(executable_path=chromedriver, log_output=subprocess.DEVNULL)
    drv = webdriver.Chrome(options=opts, service=service)
    drv.set_page_load_timeout(15)
    try:
        yield drv
    finally:
        drv.quit()


def test_html_viewer_in_headless_chromium(tmp_path: Path, photo: Image.Image, driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page = write_html(make_result(WORDS, 3, 5), photo, tmp_path / "view.html")
    driver.get(page.as_uri())
    words = driver.find_elements(By.CSS_SELECTOR, "span.word")
    ov = driver.find_element(By.ID, "overlay")
    assert [w.text for w in words] == WORDS
    assert driver.execute_script("return document.querySelectorAll('img').length") == 2
    first_src = ov.get_attribute("src")
    assert first_src.startswith("data:image/png;base64,")
    assert "active" in words[0].get_attribute("class")

    words[2].click()
    assert ov.get_attribute("src") == words[2].get_attribute("data-src") != first_src
    assert ov.get_attribute("data-index") == "2"
    active = [w.get_attribute("data-index") for w in words if "active" in w.get_attribute("class")]
    assert active == ["2"]

    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    active = [w.get_attribute("data-index") for w in words if "active" in w.get_attribute("class")]
    assert active == ["3"]
    assert ov.get_attribute("src") == words[3].get_attribute("data-src")
    loaded = driver.execute_script(
        "var o = document.getElementById('overlay'); return o.complete && o.naturalWidth;"
    )
    assert loaded == photo.width

    ActionChains(driver).move_to_element(words[5]).perform()  # hover previews, leave restores
    assert ov.get_attribute("src") == words[5].get_attribute("data-src")
    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
    assert ov.get_attribute("src") == words[3].get_attribute("data-src")
