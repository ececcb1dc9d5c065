"""Make the README's two pictures by hand (tests never write into the checkout):

    python scripts/screenshots.py            # from the repository root

- ``docs/gallery.png``: ``caption attend ../shared/data/photos --html --out gallery.html`` with the
  shipped model, opened in headless Chromium (selenium, offline), the grid as a user first sees it;
- ``docs/portrait_overlay.png``: ``caption attend parrot.jpg --out parrot.png`` (a portrait photo),
  the overlay figure drawn over the photo as taken.

Both are shrunk and palette-quantised until they are at most ``--max-kb`` (200) KB. Needs
chromium and chromedriver on PATH (``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def attend(*argv: str) -> None:
    """Run ``caption attend`` as a user would; stop on failure."""
    proc = subprocess.run([sys.executable, "-m", "caption", "attend", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"caption attend failed ({proc.returncode}):\n{proc.stderr}")


def browser_screenshot(page: Path, size: tuple[int, int]) -> Image.Image:
    """The page in headless Chromium at ``size`` (W, H), as a PIL image."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never download a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", f"--window-size={size[0]},{size[1]}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver") or "chromedriver",
                                                            log_output=subprocess.DEVNULL))
    try:
        driver.get(page.as_uri())
        driver.execute_script("return document.readyState")
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    return Image.open(io.BytesIO(png)).convert("RGB")


def save_small(image: Image.Image, path: Path, max_kb: int, width: int) -> int:
    """Save as a 128-colour PNG no larger than ``max_kb``, shrinking the width until it fits; returns bytes."""
    while True:
        scaled = image if image.width <= width else image.resize(
            (width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        scaled.quantize(128, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_kb * 1024:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buf.getvalue())
            return buf.tell()
        width = int(width * 0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    parser.add_argument("--portrait", default="parrot.jpg", help="a portrait photo in --photos")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--max-kb", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Path(tmp) / "gallery.html"
        attend(os.path.relpath(args.photos), "--html", "--out", str(gallery))  # the page's title names it
        shot = browser_screenshot(gallery, (1280, 1000))
        size = save_small(shot, args.out / "gallery.png", args.max_kb, 1100)
        print(f"{args.out / 'gallery.png'}\t{shot.size} -> {size / 1024:.0f} KB")
        figure = Path(tmp) / "portrait.png"
        attend(str(args.photos / args.portrait), "--out", str(figure))
        with Image.open(figure) as img:
            overlay = img.convert("RGB")
        size = save_small(overlay, args.out / "portrait_overlay.png", args.max_kb, 760)
        print(f"{args.out / 'portrait_overlay.png'}\t{overlay.size} -> {size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
