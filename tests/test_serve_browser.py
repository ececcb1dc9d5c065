"""``caption serve``'s page in real headless Chromium (selenium, offline; the viewer tests' browser):
upload a photo, its caption, runners-up and guide labels appear, hovering a word redraws the map.
The shipped model serves (it has a guide), on 127.0.0.1 at a free port."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from conftest import CANVAS_HASH  # noqa: E402

from caption.serve.client import Client, ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow  # headless Chromium

ASSETS = Path(__file__).resolve().parents[1] / "caption" / "assets"
SAMPLE_PHOTO = ASSETS / "sample.jpg"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    if not list(ASSETS.glob("*.pt")):
        pytest.skip("the shipped model is not in this checkout")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with ServerProcess(["--threads", "1", "--max-wait-ms", "0"], log) as running:
        yield running
    assert running.returncode == 0, log.read_text()


def _by(css: str):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, css


def _wait(driver, css: str, seconds: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds).until(lambda d: [e for e in d.find_elements(*_by(css)) if e.is_displayed()])


def test_the_page_is_self_contained(shipped):
    page = Client(shipped.url).request("GET", "/")
    text = page.body.decode()
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)=["'](?!data:)[^"']+""", text) and "<script src" not in text
    assert "captionViewer" in text and 'id="file"' in text  # the viewer's script, and the upload form


def test_upload_a_photo_see_its_caption_and_hover_its_words(shipped, driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    driver.get(shipped.url + "/")
    driver.find_element(*_by("#file")).send_keys(str(SAMPLE_PHOTO))
    words = _wait(driver, ".column .word")
    want = Client(shipped.url).caption(SAMPLE_PHOTO.read_bytes(), SAMPLE_PHOTO.name).json()
    assert [w.text for w in words] == want["tokens"]
    assert driver.find_element(*_by(".column .guide")).text.startswith("ImageNet: "), "the guide's labels"
    hyps = driver.find_elements(*_by(".column .hyp"))
    assert len(hyps) == 1 + len(want["alternatives"]) > 1, "the runners-up"
    assert want["alternatives"][0]["caption"] in hyps[1].text

    canvas = driver.find_element(*_by(".column canvas"))
    first = driver.execute_script(CANVAS_HASH, canvas)
    ActionChains(driver).move_to_element(words[3]).perform()
    assert canvas.get_attribute("data-pos") == "3"
    hovered = driver.execute_script(CANVAS_HASH, canvas)
    assert hovered[:2] == first[:2] and hovered[2] != first[2], "hovering a word redraws the map"
    img = driver.find_element(*_by(".column img"))
    w, h = driver.execute_script("var r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", img)
    assert abs(w / h - first[0] / first[1]) < 0.02, "the photo keeps its aspect"

    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    driver.find_element(*_by("#file")).send_keys(str(bad))
    status = _wait(driver, "#status.failed")[0]
    assert "not an image" in status.text
    assert [w.text for w in driver.find_elements(*_by(".column .word"))] == want["tokens"], "the last photo stays"
