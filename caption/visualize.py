"""Per-word attention overlays: matplotlib figures, PNG files and a self-contained HTML viewer.

Input is a decoding result with ``words`` (emitted words, ``<end>`` included when the caption
finished), ``alphas`` of shape (T, gh, gw) aligned 1:1 with ``words``, ``caption`` and
``log_prob``. The grid size is read from ``alphas``, never assumed. ``<start>`` is fed, not
emitted, so it has no attention map: the first figure panel shows the plain photo instead.

The grid is stretched over the whole image as given; pass the image the way the encoder saw
it (same crop, same orientation) or the heatmaps land in the wrong place.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no backend
switching), so this module works headless, in scripts and in notebooks alike.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import textwrap
import unicodedata
from pathlib import Path
from string import Template
from typing import Any, Protocol, Sequence, TypeAlias

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from caption.fileio import atomic_write
from caption.images import load_image, to_rgb

MAX_COLS = 5  # figure columns; rows grow with the caption length
PANEL_INCHES = 2.6  # width of one figure panel
DISPLAY_MAX_SIDE = 512  # photos are downscaled to this for figures and the HTML viewer
UPSAMPLE = 8  # smoothing works on a grid upsampled by this factor (cheap at any image size)
SIGMA_CELLS = 0.4  # Gaussian blur width, in grid cells
CAPTION_WRAP = 34  # characters per line of the caption title on the first panel

ImageSource: TypeAlias = "Image.Image | str | os.PathLike[str]"  # a PIL image or a path
PathLike: TypeAlias = "str | os.PathLike[str]"


class AttentionResult(Protocol):
    """What the visualisers read from a decoding result."""

    words: Sequence[str]
    alphas: Any  # torch.Tensor or np.ndarray, (T, gh, gw)
    caption: str
    log_prob: float


# ----------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    """Tensor or array-like -> float64 ndarray (no torch import needed)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _unpack(result: AttentionResult) -> tuple[list[str], np.ndarray]:
    """Words and their (T, gh, gw) maps, checked to align 1:1."""
    words = [str(w) for w in result.words]
    alphas = _to_numpy(result.alphas)
    if alphas.ndim != 3:
        raise ValueError(f"alphas must have shape (T, gh, gw), got {alphas.shape}")
    if alphas.shape[0] != len(words):
        raise ValueError(
            f"alphas has {alphas.shape[0]} maps but there are {len(words)} words; "
            "they must align 1:1 (include '<end>' in words when it has a map)"
        )
    return words, alphas


def load_rgb(image: ImageSource, max_side: int | None = None) -> Image.Image:
    """RGB and upright, as the model reads it (:func:`caption.images.load_image`), optionally downscaled."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_side)
    img = to_rgb(image)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


def _resize(grid: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize a 2-D float array to size=(W, H) through a PIL float ('F') image."""
    out = Image.fromarray(grid.astype(np.float32)).resize(size, resample)
    return np.asarray(out, dtype=np.float64)


def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) row-normalised Gaussian blur operator (edges renormalised, no dark border)."""
    idx = np.arange(n)
    k = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def _blend(photo: np.ndarray, heat: np.ndarray, cmap: str, alpha: float) -> np.ndarray:
    """Alpha-blend a colour-mapped heatmap (H, W) in [0, 1] over an RGB photo (H, W, 3)."""
    colour = colormaps[cmap](heat)[..., :3] * 255.0  # (H, W, 3)
    mixed = (1.0 - alpha) * photo.astype(np.float64) + alpha * colour
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _heat_rgb(heat: np.ndarray, cmap: str) -> np.ndarray:
    """Colour-mapped heatmap (H, W) -> uint8 RGB (H, W, 3)."""
    return (colormaps[cmap](heat)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(rgb)).decode("ascii")


def safe_filename(word: str, max_len: int = 40) -> str:
    """ASCII-only, filesystem-safe stem for a word ('<end>' -> 'end', '' -> 'tok')."""
    ascii_word = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode("ascii")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_word).strip("_-")[:max_len]
    return stem or "tok"


def _word_overlays(
    result: AttentionResult,
    image: ImageSource,
    cmap: str,
    alpha: float | None,
    max_side: int | None,
) -> tuple[Image.Image, list[str], list[np.ndarray]]:
    """Photo, words and per-word RGB images (blended, or raw heat colours if alpha is None)."""
    words, maps = _unpack(result)
    photo = load_rgb(image, max_side)
    base = np.asarray(photo)
    heats = (attention_map(m, photo.size) for m in maps)
    if alpha is None:
        return photo, words, [_heat_rgb(h, cmap) for h in heats]
    return photo, words, [_blend(base, h, cmap, alpha) for h in heats]


# ----------------------------------------------------------------------------- public API


def attention_map(alpha: Any, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """Upsample one (gh, gw) attention grid to an image of size=(W, H); returns (H, W) in [0, 1].

    smooth=True: bilinear upsampling plus a light Gaussian blur (done at UPSAMPLE x the grid,
    so its cost does not depend on the image size). smooth=False: nearest-neighbour, showing
    the raw cells. Values are min-max normalised for display; a flat map becomes all zeros.
    """
    grid = _to_numpy(alpha)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"alpha must be a non-empty (gh, gw) grid, got shape {grid.shape}")
    if not np.isfinite(grid).all():
        raise ValueError("alpha contains NaN or infinite values")
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"size must be (W, H) with both >= 1, got {size}")
    if smooth:
        gh, gw = grid.shape
        fine = _resize(grid, (gw * UPSAMPLE, gh * UPSAMPLE), Image.Resampling.BILINEAR)
        sigma = SIGMA_CELLS * UPSAMPLE
        fine = _gauss_matrix(gh * UPSAMPLE, sigma) @ fine @ _gauss_matrix(gw * UPSAMPLE, sigma).T
        heat = _resize(fine, (width, height), Image.Resampling.BILINEAR)
    else:
        heat = _resize(grid, (width, height), Image.Resampling.NEAREST)
    lo, hi = float(heat.min()), float(heat.max())
    if hi - lo <= 1e-12:
        return np.zeros((height, width))
    return (heat - lo) / (hi - lo)


def overlay(
    result: AttentionResult,
    image: ImageSource,
    *,
    cols: int | None = None,
    cmap: str = "jet",
    alpha: float = 0.6,
    title: bool = True,
) -> Figure:
    """Figure with 1 + T panels: the photo titled with the full caption, then one per word.

    ``<start>`` has no attention map (it is fed, never emitted), so the first panel is the
    plain photo; each following panel is that word's heatmap blended over the photo, ``<end>``
    included. At most ``cols`` (default 5) panels per row; the figure grows with the rows.
    """
    photo, words, blended = _word_overlays(result, image, cmap, alpha, DISPLAY_MAX_SIDE)
    n = 1 + len(words)
    cols = max(1, min(cols or MAX_COLS, n))
    rows = math.ceil(n / cols)
    aspect = min(max(photo.height / photo.width, 0.25), 4.0)
    panel_h = PANEL_INCHES * aspect + (0.5 if title else 0.1)
    fig = Figure(figsize=(cols * PANEL_INCHES, rows * panel_h), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        fig.delaxes(ax)
    caption = textwrap.fill(result.caption or " ".join(words), CAPTION_WRAP)
    panels = [(np.asarray(photo), caption)] + list(zip(blended, words))
    for ax, (img, label) in zip(axes, panels):
        ax.imshow(img)
        ax.set_axis_off()
        if title:
            ax.set_title(label, fontsize=9 if ax is axes[0] else 11)
    return fig


def save_overlay(
    result: AttentionResult, image: ImageSource, path: PathLike, **kw: Any
) -> Path:
    """Render ``overlay(result, image, **kw)`` to a PNG at ``path`` (atomic write)."""
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"save_overlay writes PNG; use a .png path, got {str(path)!r}")
    fig = overlay(result, image, **kw)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def save_per_word(
    result: AttentionResult,
    image: ImageSource,
    out_dir: PathLike,
    *,
    cmap: str = "jet",
    alpha: float = 0.6,
    max_side: int | None = 1024,
) -> list[Path]:
    """One blended overlay PNG per word, named ``{index:02d}_{word}.png`` (e.g. ``03_dog.png``)."""
    _, words, blended = _word_overlays(result, image, cmap, alpha, max_side)
    digits = max(2, len(str(max(len(words) - 1, 0))))
    paths = []
    for i, (word, rgb) in enumerate(zip(words, blended)):
        png = _png_bytes(rgb)
        target = Path(out_dir) / f"{i:0{digits}d}_{safe_filename(word)}.png"
        paths.append(atomic_write(target, lambda f, data=png: f.write(data)))
    return paths


HTML_TEMPLATE = Template(
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.2em;font-weight:600}
.stage{position:relative;display:inline-block;line-height:0}
#photo{max-width:min(92vw,640px);height:auto}
#overlay{position:absolute;left:0;top:0;width:100%;height:100%;opacity:$alpha;pointer-events:none}
#overlay[src=""]{display:none}
.caption{font-size:1.4em;line-height:1.9;max-width:640px;margin:.6em 0}
.word{cursor:pointer;padding:.1em .3em;border-radius:.3em}
.word:hover{background:#dbe5ff}
.word.active{background:#2457d6;color:#fff}
.meta{color:#666;font-size:.9em}
</style></head><body>
<h1>$title</h1>
<div class="stage"><img id="photo" src="$photo" alt="photo">
<img id="overlay" src="$first" alt="attention of the selected word" data-index="0"></div>
<p class="caption">$spans</p>
<p class="meta">log p = $logp &middot; hover or click a word; Left/Right arrows step words
&middot; <label>heatmap opacity
<input id="opacity" type="range" min="0" max="1" step="0.05" value="$alpha"></label></p>
<script>
(function () {
  var words = Array.prototype.slice.call(document.querySelectorAll(".word"));
  var ov = document.getElementById("overlay");
  var active = 0;
  function show(i) {
    ov.src = words[i].getAttribute("data-src");
    ov.setAttribute("data-index", String(i));
  }
  function activate(i) {
    if (!words.length) { return; }
    active = Math.max(0, Math.min(words.length - 1, i));
    words.forEach(function (w, j) {
      w.classList.toggle("active", j === active);
      w.setAttribute("aria-pressed", j === active ? "true" : "false");
    });
    show(active);
  }
  words.forEach(function (w, i) {
    w.addEventListener("mouseenter", function () { show(i); });
    w.addEventListener("mouseleave", function () { show(active); });
    w.addEventListener("click", function () { activate(i); });
    w.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { activate(i); e.preventDefault(); }
    });
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "ArrowRight") { activate(active + 1); e.preventDefault(); }
    else if (e.key === "ArrowLeft") { activate(active - 1); e.preventDefault(); }
  });
  document.getElementById("opacity").addEventListener("input", function (e) {
    ov.style.opacity = e.target.value;
  });
  activate(0);
})();
</script>
</body></html>
"""
)


def write_html(
    result: AttentionResult,
    image: ImageSource,
    path: PathLike,
    *,
    title: str | None = None,
    cmap: str = "jet",
    alpha: float = 0.6,
    max_side: int = DISPLAY_MAX_SIDE,
) -> Path:
    """Write ONE self-contained HTML viewer (base64 PNGs, inline CSS/JS, no URLs; atomic).

    The photo is shown with the caption as ``<span class="word" data-index="i">`` elements;
    hovering or clicking a word lays its heatmap (``<img id="overlay">``, CSS opacity) over the
    photo, Left/Right arrows step the active (highlighted) word.
    """
    photo, words, heats = _word_overlays(result, image, cmap, None, max_side)
    uris = [_data_uri(h) for h in heats]
    spans = " ".join(
        f'<span class="word" data-index="{i}" tabindex="0" role="button" data-src="{uri}">'
        f"{html.escape(word)}</span>"
        for i, (word, uri) in enumerate(zip(words, uris))
    )
    page = HTML_TEMPLATE.substitute(
        title=html.escape(title if title is not None else (result.caption or "caption")),
        photo=_data_uri(np.asarray(photo)),
        first=uris[0] if uris else "",
        spans=spans,
        logp=html.escape(f"{float(result.log_prob):.3f}"),
        alpha=f"{min(max(float(alpha), 0.0), 1.0):g}",
    )
    return atomic_write(path, lambda f: f.write(page.encode("utf-8")))
