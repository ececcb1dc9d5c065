"""Shared fixtures: tiny configs and models that run on CPU in milliseconds."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import socket
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from caption.config import Config, ModelConfig, load_config
from caption.data.shapes import generate_shapes
from caption.guidance.record import as_json, caption_record
from caption.inference import load
from caption.serve.client import ServerProcess  # the standard library only: no serve extra needed


def tiny_model_config(attention: str = "additive", **overrides) -> ModelConfig:
    """A decoder small enough to train in a second; dot attention needs hidden == feature dim."""
    cfg = ModelConfig(
        encoder="small", grid=3, small_channels=16, attention=attention,
        embed_dim=16, hidden_dim=16 if attention == "dot" else 24, attention_dim=12, dropout=0.0,
    )
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than they save
    yield


# ----------------------------------------------------------------------------- tiny checkpoints

TINY_WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "left", "of", "the")


def make_tiny_checkpoint(path, attention: str = "additive", seed: int = 0):
    """An untrained checkpoint (small CNN, 32-pixel images, 3x3 grid, 14 words) written to ``path``.

    Its captions are arbitrary but valid, which is all the inference plumbing tests need.
    """
    from caption.checkpoint import save_checkpoint
    from caption.config import Config, DataConfig, DecodeConfig
    from caption.model import build_model
    from caption.vocab import Vocabulary

    cfg = Config(name=f"tiny-{attention}", data=DataConfig(image_size=32),
                 model=tiny_model_config(attention), decode=DecodeConfig(beam_size=2, max_len=6))
    vocab = Vocabulary(TINY_WORDS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(cfg.model, len(vocab))
    return save_checkpoint(path, model, cfg, vocab)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny untrained checkpoint file, shared by the whole test session."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_run") / "best.pt")


@dataclass
class FakeResult:
    """Stand-in for caption.decoding.DecodingResult: the fields the overlays and the viewer read."""

    words: list[str]
    alphas: Any
    caption: str
    log_prob: float
    alternatives: tuple = ()
    init_alphas: Any = None


# ----------------------------------------------------------------------------- shapes runs


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, n=40, seed=1, image_size=48)
    return out


def tiny_config(shapes_dir, *overrides: str) -> Config:
    data = [f"data.{s}_captions={shapes_dir}/captions_{s}.json" for s in ("train", "val", "test")]
    return load_config(None, [
        "name=tiny", "data.format=coco", f"data.images={shapes_dir}/images", "data.image_size=48", "data.min_freq=1",
        "data.metric=shapes",
        "model.encoder=small", "model.small_channels=8", "model.grid=3", "model.embed_dim=8", "model.hidden_dim=16",
        "model.attention_dim=8", "model.dropout=0.3", "model.fine_tune=true", "model.fine_tune_blocks=4",
        "train.epochs=2", "train.batch_size=16", "train.lr=0.003", "train.encoder_lr=0.003", "precision=fp32",
        "decode.max_len=12", *data, *overrides,
    ])


class Killed(Exception):
    """Raised from an ``on_step`` callback to stop a training mid-run (resume tests)."""


def evaluate_checkpoint(checkpoint, **kwargs) -> dict:
    """``caption.evaluation.evaluate.evaluate`` of a checkpoint loaded by ``caption.load``."""
    from caption.evaluation.evaluate import evaluate
    from caption.inference import load

    return evaluate(load(checkpoint), **kwargs)


# ----------------------------------------------------------------------------- browsers and servers


CANVAS_HASH = """
var c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, h = 7;
for (var i = 0; i < d.length; i++) { h = (h * 31 + d[i]) >>> 0; }
return [c.width, c.height, h];
"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """Headless Chromium via selenium, fully offline; skips only if a piece is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = _chromium(), shutil.which("chromedriver")
    if browser is None or chromedriver is None:
        pytest.skip("chromium/chromedriver not found (apt-get install chromium chromium-driver)")
    before = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # never let selenium-manager download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--window-size=1000,900", f"--user-data-dir={tmp_path_factory.mktemp('profile')}",
    ):
        opts.add_argument(flag)
    service = Service(executable_path=chromedriver, log_output=subprocess.DEVNULL)
    drv = webdriver.Chrome(options=opts, service=service)
    drv.set_page_load_timeout(15)
    try:
        yield drv
    finally:
        drv.quit()
        if before is None:
            os.environ.pop("SE_OFFLINE", None)
        else:
            os.environ["SE_OFFLINE"] = before


MAX_WAIT_MS = 300  # long enough that concurrent requests surely share a batch


def png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def exif_jpeg(w: int, h: int, seed: int) -> bytes:
    """A JPEG stored w x h with EXIF orientation 6 (upright it is h x w)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        buf, "JPEG", exif=exif)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its data is a stub): a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Files of several kinds; the large JPEG is decoded at a reduced scale, as caption predict does."""
    folder = tmp_path_factory.mktemp("photos")
    made = {f"noise{i}.png": png(40 + 3 * i, 30 + i, i) for i in range(8)}
    made["portrait.jpg"] = exif_jpeg(60, 20, 9)
    made["large.jpg"] = exif_jpeg(1200, 900, 10)
    for name, data in made.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in made}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load(tiny_checkpoint, precision="fp32", threads=1)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--checkpoint", str(tiny_checkpoint), "--precision", "fp32", "--threads", "1", "--max-batch", "8",
            "--max-wait-ms", str(MAX_WAIT_MS), "--max-upload-mb", "1"]
    with ServerProcess(args, log) as running:
        yield running
    assert running.returncode == 0, log.read_text()


def expected(model, path: Path, beam: int = 2, **kw) -> dict:
    """What caption predict --json says of the file (the record the server must match)."""
    runners_up = kw.pop("alternatives", beam > 1)
    result = model.configured(beam=beam, alternatives=runners_up, **kw).caption(path)
    return as_json(caption_record(path.name, result, beam, alternatives=runners_up))


def assert_same(got: dict, want: dict) -> None:
    """Equal words; equal numbers up to float noise between batch sizes."""
    assert set(got) == set(want)
    assert (got["image"], got["caption"], got["tokens"], got["beam"], got["grid"]) == \
        (want["image"], want["caption"], want["tokens"], want["beam"], want["grid"])
    assert got["log_prob"] == pytest.approx(want["log_prob"], abs=1e-4)
    if "attention" in want:
        np.testing.assert_allclose(got["attention"], want["attention"], atol=2e-4)
    for a, b in zip(got.get("alternatives", []), want.get("alternatives", [])):
        assert a["tokens"] == b["tokens"] and a["log_prob"] == pytest.approx(b["log_prob"], abs=1e-4)
    assert len(got.get("alternatives", [])) == len(want.get("alternatives", []))


# ----------------------------------------------------------------------------- answers


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping what it sends first); inf when it
    is still open after ``seconds``."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return float("inf")
    return time.monotonic() - t0
