"""Per-word attention overlays drawn over the photo as taken: matplotlib figures and PNG files.

Input is a decoding result with ``words`` (emitted words, ``<end>`` included when the caption
finished), ``alphas`` of shape (T, gh, gw) aligned 1:1 with ``words``, ``caption`` and
``log_prob``; optionally ``init_alphas`` (gh, gw), the map of the query-free pool used before the
first word. The grid size is read from ``alphas``, never assumed. ``<start>`` is fed, not
emitted, so it has no attention map: the first figure panel shows the plain photo instead.

The model sees the whole photo resized to a square without cropping, so grid cell (i, j) covers
the rectangle [j/gw, (j+1)/gw) x [i/gh, (i+1)/gh) of the photo whatever its aspect: the grid is
stretched over the upright photo (a path is loaded EXIF-upright) and drawn at the photo's own
aspect ratio. The HTML viewer is :mod:`caption.viewer`.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no backend
switching), so this module works headless, in scripts and in notebooks alike.
"""

from __future__ import annotations

import io
import math
import os
import re
import textwrap
import unicodedata
from pathlib import Path
from typing import Any, Protocol, Sequence, TypeAlias

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from caption.data.images import load_image, to_rgb
from caption.fileio import atomic_write

MAX_COLS = 5  # figure columns; rows grow with the caption length
PANEL_INCHES = 2.6  # width of one figure panel
DISPLAY_MAX_SIDE = 512  # photos are downscaled to this for figures
UPSAMPLE = 8  # smoothing works on a grid upsampled by this factor (cheap at any image size)
SIGMA_CELLS = 0.4  # Gaussian blur width, in grid cells
CAPTION_WRAP = 34  # characters per line of the caption title on the first panel
INIT_TITLE = "before the first word"  # the panel of ``init_alphas``
# Colour scale: a cell's weight against a flat map's (weight × L, 1 = flat), on one log scale for every
# word and photo, so a flat map looks flat and two maps compare. Top colour at SCALE_MAX times flat: a
# map that puts all its weight on 1/16 of the grid (3 of 49 cells) reaches it.
SCALE_MAX = 16.0
SCALES = ("uniform", "minmax")  # "minmax": each map stretched to its own range (other tools' look)
LEGEND = "attention ÷ flat (1 = as if it looked everywhere)"
LEGEND_MINMAX = "min-max per map: not comparable across words"

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


def word_maps(result: AttentionResult) -> tuple[list[str], np.ndarray]:
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


def init_map(result: AttentionResult) -> np.ndarray | None:
    """The (gh, gw) map used before the first word (``result.init_alphas``), or None if it has none."""
    init = getattr(result, "init_alphas", None)
    if init is None:
        return None
    grid = _to_numpy(init)
    if grid.ndim != 2:
        raise ValueError(f"init_alphas must have shape (gh, gw), got {grid.shape}")
    return grid


def load_rgb(image: ImageSource, max_side: int | None = None) -> Image.Image:
    """RGB and upright, as the model reads it (:func:`caption.data.images.load_image`), optionally downscaled."""
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


def colormap_table(cmap: str = "jet", n: int = 256) -> np.ndarray:
    """(n, 3) uint8 RGB table of a matplotlib colormap: the HTML viewer paints with the PNGs' colours."""
    return (colormaps[cmap](np.linspace(0.0, 1.0, n))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def safe_filename(word: str, max_len: int = 40) -> str:
    """ASCII-only, filesystem-safe stem for a word ('<end>' -> 'end', '' -> 'tok')."""
    ascii_word = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode("ascii")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_word).strip("_-")[:max_len]
    return stem or "tok"


def _panels(
    result: AttentionResult, photo: Image.Image, cmap: str, alpha: float, label: str | None, scale: str
) -> list[tuple[np.ndarray, str]]:
    """(image, title) panels of one result: the photo titled with the caption, the map before the
    first word when there is one, then one blended overlay per word."""
    words, maps = word_maps(result)
    base = np.asarray(photo)
    caption = result.caption or " ".join(words)
    panels = [(base, textwrap.fill(f"{label}: {caption}" if label else caption, CAPTION_WRAP))]
    init = init_map(result)
    if init is not None:
        panels.append((_blend(base, attention_map(init, photo.size, scale=scale), cmap, alpha), INIT_TITLE))
    panels += [(_blend(base, attention_map(m, photo.size, scale=scale), cmap, alpha), w)
               for w, m in zip(words, maps)]
    return panels


# ----------------------------------------------------------------------------- public API


def attention_map(alpha: Any, size: tuple[int, int], smooth: bool = True, scale: str = "uniform") -> np.ndarray:
    """Upsample one (gh, gw) attention grid to an image of size=(W, H); returns (H, W) in [0, 1].

    smooth=True: bilinear upsampling plus a light Gaussian blur (done at UPSAMPLE x the grid,
    so its cost does not depend on the image size). smooth=False: nearest-neighbour, showing
    the raw cells. ``scale="uniform"`` (default) maps weight × L on the fixed log scale from 1 (a flat
    map's weight, or less) to ``SCALE_MAX`` (:func:`ratio_value`): a flat map is all zeros, whatever
    its noise. ``scale="minmax"`` stretches each map to its own range, as other visualisers do.
    """
    grid = _to_numpy(alpha)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"alpha must be a non-empty (gh, gw) grid, got shape {grid.shape}")
    if not np.isfinite(grid).all():
        raise ValueError("alpha contains NaN or infinite values")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"size must be (W, H) with both >= 1, got {size}")
    grid = grid * grid.size  # weight against a flat map's: 1 = flat
    if smooth:
        gh, gw = grid.shape
        fine = _resize(grid, (gw * UPSAMPLE, gh * UPSAMPLE), Image.Resampling.BILINEAR)
        sigma = SIGMA_CELLS * UPSAMPLE
        fine = _gauss_matrix(gh * UPSAMPLE, sigma) @ fine @ _gauss_matrix(gw * UPSAMPLE, sigma).T
        heat = _resize(fine, (width, height), Image.Resampling.BILINEAR)
    else:
        heat = _resize(grid, (width, height), Image.Resampling.NEAREST)
    if scale == "uniform":
        return ratio_value(heat)
    lo, hi = float(heat.min()), float(heat.max())
    if hi - lo <= 1e-12:
        return np.zeros((height, width))
    return (heat - lo) / (hi - lo)


def ratio_value(ratio: np.ndarray | float) -> np.ndarray:
    """Weight × L (1 = flat) -> colour value in [0, 1]: log(ratio) / log(SCALE_MAX), clipped."""
    return np.clip(np.log(np.maximum(ratio, 1e-12)) / math.log(SCALE_MAX), 0.0, 1.0)


def legend_strip(width: int, cmap: str = "jet", scale: str = "uniform", height: int = 30) -> np.ndarray:
    """(height, width, 3) uint8: the colour scale with its meaning, to stand under a per-word PNG."""
    from PIL import ImageDraw

    bar_h = height // 2
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    strip[:bar_h] = (colormaps[cmap](np.linspace(0.0, 1.0, width))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(strip)
    draw = ImageDraw.Draw(img)
    if scale == "uniform":
        for ratio in (1, 2, 4, 8, 16):
            x = int(round(float(ratio_value(ratio)) * (width - 1)))
            draw.line([(x, bar_h - 4), (x, bar_h)], fill=(0, 0, 0))
            text = f"{ratio}x" + (" = flat" if ratio == 1 else "")
            draw.text((min(max(x - 6, 0), width - 6 * len(text)), bar_h + 1), text, fill=(0, 0, 0))
    else:
        draw.text((2, bar_h + 1), "min-max per map", fill=(0, 0, 0))
    return np.asarray(img)


def _colorbar(fig: Figure, axes: Any, cmap: str, scale: str) -> None:
    """The figure's legend: the fixed scale of weight × L, or a note that each map is stretched."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize

    if scale == "uniform":
        bar = fig.colorbar(ScalarMappable(LogNorm(1.0, SCALE_MAX), cmap), ax=axes, location="bottom",
                           shrink=0.6, aspect=40, pad=0.02)
        bar.set_ticks([1, 2, 4, 8, 16], labels=["1 (flat)", "2", "4", "8", "16+"])
        bar.set_label(LEGEND)
    else:
        bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), ax=axes, location="bottom",
                           shrink=0.6, aspect=40, pad=0.02)
        bar.set_ticks([0, 1], labels=["lowest", "highest"])
        bar.set_label(LEGEND_MINMAX)


def overlay(
    result: AttentionResult,
    image: ImageSource,
    *,
    cols: int | None = None,
    cmap: str = "jet",
    alpha: float = 0.6,
    title: bool = True,
    compare: AttentionResult | None = None,
    labels: Sequence[str] | None = None,
    scale: str = "uniform",
) -> Figure:
    """Figure with 1 + T panels over the upright photo at its own aspect: the photo titled with
    the full caption, then one per word (plus one titled "before the first word" ahead of them
    when the result has ``init_alphas``).

    ``<start>`` has no attention map (it is fed, never emitted), so the first panel is the
    plain photo; each following panel is that word's heatmap blended over the photo, ``<end>``
    included. At most ``cols`` (default 5) panels per row; the figure grows with the rows.
    ``compare``: a second model's result on the same photo, drawn in the rows below the first's;
    ``labels`` names the two (prefixed to each caption). ``scale``: "uniform" colours every map on one
    fixed scale of weight × L (:func:`attention_map`), "minmax" stretches each; a colour bar says which.
    """
    photo = load_rgb(image, DISPLAY_MAX_SIDE)
    results = [result] if compare is None else [result, compare]
    names = list(labels) if labels is not None else [None] * len(results)
    sections = [_panels(r, photo, cmap, alpha, name, scale) for r, name in zip(results, names)]
    cols = max(1, min(cols or MAX_COLS, max(len(s) for s in sections)))
    rows = [math.ceil(len(s) / cols) for s in sections]  # each section starts on a new row
    aspect = min(max(photo.height / photo.width, 0.25), 4.0)
    panel_h = PANEL_INCHES * aspect + (0.5 if title else 0.1)
    fig = Figure(figsize=(cols * PANEL_INCHES, sum(rows) * panel_h), layout="constrained")
    grid = fig.subplots(sum(rows), cols, squeeze=False)  # (rows, cols) of axes
    top = 0
    for section, n_rows in zip(sections, rows):
        axes = grid[top : top + n_rows].ravel()
        for ax in axes[len(section):]:
            fig.delaxes(ax)
        for ax, (img, label) in zip(axes, section):
            ax.imshow(img)
            ax.set_axis_off()
            if title:
                ax.set_title(label, fontsize=9 if ax is axes[0] else 11)
        top += n_rows
    _colorbar(fig, grid.ravel().tolist(), cmap, scale)
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
    scale: str = "uniform",
) -> list[Path]:
    """One blended overlay PNG per word over the upright photo, named ``{index:02d}_{word}.png``
    (e.g. ``03_dog.png``), with the colour scale's legend under it; the map before the first word,
    if any, is not among them."""
    words, maps = word_maps(result)
    photo = load_rgb(image, max_side)
    base = np.asarray(photo)
    digits = max(2, len(str(max(len(words) - 1, 0))))
    paths = []
    legend = legend_strip(photo.width, cmap, scale)
    for i, (word, grid) in enumerate(zip(words, maps)):
        png = _png_bytes(np.concatenate([_blend(base, attention_map(grid, photo.size, scale=scale), cmap, alpha),
                                         legend]))  # (H + legend, W, 3)
        target = Path(out_dir) / f"{i:0{digits}d}_{safe_filename(word)}.png"
        paths.append(atomic_write(target, lambda f, data=png: f.write(data)))
    return paths
