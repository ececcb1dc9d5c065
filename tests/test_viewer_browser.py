"""The viewer pages in real headless Chromium (selenium, offline): words, keys, photos, comparison.

The heatmap is drawn by the page on a canvas, so the tests read its pixels back; the photo must
keep its aspect ratio on screen (a portrait fixture, EXIF-rotated). One browser per module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CANVAS_HASH, make_tiny_checkpoint
from PIL import Image
from test_viewer import fake

from caption.commands.main import main
from caption.viz import viewer

pytestmark = pytest.mark.slow  # headless Chromium

ASPECT = """
var r = arguments[0].getBoundingClientRect(), c = arguments[1].getBoundingClientRect();
return [r.width, r.height, c.left - r.left, c.top - r.top, c.width, c.height];
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return make_tiny_checkpoint(folder / "additive.pt"), make_tiny_checkpoint(folder / "concat.pt", "concat", seed=2)  # 3-4 words


def _portrait(path: Path) -> Path:
    """Stored 80x40 with EXIF orientation 6: upright a 40x80 portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(path, exif=exif)
    return path


def _landscape(path: Path, seed: int) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (36, 60, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- page helpers


def _by(css: str):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, css


def _press(driver, *keys: str) -> None:
    from selenium.webdriver.common.keys import Keys

    body = driver.find_element(*_by("body"))
    for key in keys:
        body.send_keys(getattr(Keys, key))


def _column(driver, model: int = 0):
    return driver.find_element(*_by(f'.column[data-model="{model}"]'))


def _canvas(driver, model: int = 0):
    return _column(driver, model).find_element(*_by("canvas"))


def _heat(driver, model: int = 0) -> list:
    return driver.execute_script(CANVAS_HASH, _canvas(driver, model))


def _active(driver, model: int = 0) -> list[str]:
    words = _column(driver, model).find_elements(*_by(".word.active"))
    return [w.get_attribute("data-pos") for w in words]


def _words(driver, model: int = 0):
    return _column(driver, model).find_elements(*_by(".word"))


def _assert_aspect(driver, model: int, width: int, height: int) -> None:
    """The photo on screen has the photo's aspect, and the heatmap canvas covers it exactly."""
    col = _column(driver, model)
    w, h, dx, dy, cw, ch = driver.execute_script(ASPECT, col.find_element(*_by("img")), _canvas(driver, model))
    assert w > 100 and abs(w / h - width / height) < 0.02, (w, h)
    assert max(abs(dx), abs(dy), abs(cw - w), abs(ch - h)) < 1, "the heatmap covers the photo exactly"


def _step_words(driver, model: int = 0) -> None:
    """Click a word, step with the arrow keys, hover: the heatmap follows, with its own pixels."""
    words = _words(driver, model)
    first = _heat(driver, model)
    assert _active(driver, model) == ["0"]
    words[1].click()
    assert _active(driver, model) == ["1"]
    second = _heat(driver, model)
    assert second[:2] == first[:2] and second[2] != first[2], "the drawn heatmap changes with the word"
    _press(driver, "ARROW_LEFT")
    assert _active(driver, model) == ["0"] and _heat(driver, model) == first
    _press(driver, "ARROW_RIGHT", "ARROW_RIGHT")
    assert _active(driver, model) == ["2"]


# ----------------------------------------------------------------------------- single photo


def test_single_page_words_keys_and_hover(tmp_path: Path, driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    words = ["a", "dog", "on", "the", "grass", "<end>"]
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    page = viewer.write_html(fake(words), photo, tmp_path / "view.html")
    driver.get(page.as_uri())
    assert [w.text for w in _words(driver)] == words
    assert driver.find_element(*_by("#grid")).get_attribute("hidden") is not None
    assert not driver.find_element(*_by("#compare-toggle")).is_displayed()
    assert _heat(driver)[:2] == [90, 60]
    _step_words(driver)
    _press(driver, "ARROW_RIGHT", "ARROW_RIGHT", "ARROW_RIGHT", "ARROW_RIGHT")
    assert _active(driver) == ["5"], "stops at the last word"
    ActionChains(driver).move_to_element(driver.find_element(*_by("h1"))).perform()  # away from the clicked word
    shown = _heat(driver)
    ActionChains(driver).move_to_element(_words(driver)[1]).perform()  # hover previews, leaving restores
    assert _canvas(driver).get_attribute("data-pos") == "1" and _heat(driver) != shown
    ActionChains(driver).move_to_element(driver.find_element(*_by("h1"))).perform()
    assert _canvas(driver).get_attribute("data-pos") == "5" and _heat(driver) == shown
    _assert_aspect(driver, 0, 90, 60)


def test_single_page_init_map_and_runner_up(tmp_path: Path, driver) -> None:
    init = torch.zeros(3, 5)
    init[2, 4] = 1.0  # the bottom-right corner; word 0 looks at the top-left
    runner_up = fake(["one", "cat", "sat", "<end>"], shift=6)
    result = fake(["a", "cat", "<end>"], alternatives=(runner_up,), init_alphas=init)
    page = viewer.write_html(result, Image.new("RGB", (50, 50), "white"), tmp_path / "v.html")
    driver.get(page.as_uri())
    first = _words(driver)[0]
    assert first.text == "before the first word" and first.get_attribute("data-pos") == "-1"
    word0 = _heat(driver)
    _press(driver, "ARROW_LEFT")
    assert _active(driver) == ["-1"] and _heat(driver) != word0
    hyps = _column(driver).find_elements(*_by(".hyp"))
    assert [h.get_attribute("data-hyp") for h in hyps] == ["0", "1"]
    hyps[1].click()
    assert [w.text for w in _words(driver)][1:] == ["one", "cat", "sat", "<end>"]
    assert "active" in hyps[1].get_attribute("class")
    _press(driver, "ARROW_RIGHT", "ARROW_RIGHT", "ARROW_RIGHT", "ARROW_RIGHT")
    assert _active(driver) == ["3"], "the runner-up's own words"


def test_attend_single_photo_compare_in_browser(tmp_path: Path, driver, checkpoints, capsys) -> None:
    first, second = checkpoints
    photo = _portrait(tmp_path / "portrait.jpg")
    out = tmp_path / "view.html"
    assert main(["attend", str(photo), "--out", str(out), "--checkpoint", str(first), "--compare", str(second),
                 "--beam", "2"]) == 0
    capsys.readouterr()
    driver.get(out.as_uri())
    labels = [e.text for e in driver.find_elements(*_by(".column h2"))]
    assert labels == ["additive.pt (additive)", "concat.pt (concat)"]
    _assert_aspect(driver, 0, 40, 80)
    _assert_aspect(driver, 1, 40, 80)
    _step_words(driver, 0)
    other = _heat(driver, 1)
    _press(driver, "ARROW_LEFT")  # one step for both models
    assert _active(driver, 1) == ["1"] and _heat(driver, 1) != other
    toggle = driver.find_element(*_by("#compare"))
    toggle.click()
    assert not _column(driver, 1).is_displayed() and _column(driver, 0).is_displayed()
    toggle.click()
    assert _column(driver, 1).is_displayed()


# ----------------------------------------------------------------------------- gallery


def test_gallery_in_browser(tmp_path: Path, driver, checkpoints, capsys) -> None:
    first, second = checkpoints
    folder = tmp_path / "photos"
    folder.mkdir()
    _landscape(folder / "a.png", 1)
    _portrait(folder / "b.jpg")
    _landscape(folder / "c.png", 2)
    (folder / "d.jpg").write_text("not a photo")
    out = tmp_path / "gallery.html"
    code = main(["attend", str(folder), "--out", str(out), "--checkpoint", str(first), "--compare", str(second)])
    _, err = capsys.readouterr()
    errs = [line for line in err.splitlines() if ": error: " in line]
    assert code == 1 and errs == [f"caption attend: error: {folder / 'd.jpg'}: not an image file (or an unsupported format)"]
    driver.get(out.as_uri())
    errors = driver.find_elements(*_by("#errors li"))
    assert [e.text for e in errors] == [f"could not caption {folder / 'd.jpg'}: not an image file (or an "
                                        "unsupported format)"]
    cards = driver.find_elements(*_by(".card"))
    assert len(cards) == 3 and not driver.find_element(*_by("#detail")).is_displayed()
    assert all(c.find_element(*_by(".second")).is_displayed() for c in cards)

    cards[1].click()  # the portrait
    assert driver.find_element(*_by("#detail")).is_displayed() and not driver.find_element(*_by("#grid")).is_displayed()
    assert driver.find_element(*_by("#counter")).text == "2 / 3"
    _assert_aspect(driver, 0, 40, 80)
    _step_words(driver, 0)
    for key, shown in (("ARROW_DOWN", "3 / 3"), ("PAGE_DOWN", "3 / 3"), ("PAGE_UP", "2 / 3"), ("ARROW_UP", "1 / 3"),
                       ("ARROW_UP", "1 / 3")):
        _press(driver, key)
        assert driver.find_element(*_by("#counter")).text == shown, key
    assert _active(driver, 0) == ["0"], "a new photo starts at its first word"
    _assert_aspect(driver, 1, 60, 36)

    driver.find_element(*_by("#compare")).click()
    assert not _column(driver, 1).is_displayed()
    _press(driver, "ESCAPE")
    assert driver.find_element(*_by("#grid")).is_displayed() and not driver.find_element(*_by("#detail")).is_displayed()
    assert not any(c.find_element(*_by(".second")).is_displayed() for c in cards), "the toggle hides the second captions"
