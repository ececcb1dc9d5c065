"""The HTML attention viewer: one self-contained page for one photo, or a gallery for many.

A page holds the photos as JPEGs at display size (at most ``PHOTO_MAX_SIDE`` on the long side,
EXIF-upright, their own aspect ratio) and, per photo and model, the attention grids of every
word of the caption and of the beam's runners-up. The page's script draws each heatmap on a
canvas over the photo (bilinear, then min-max scaled and coloured with the PNG overlays'
colormap), so a page costs a photo plus a few bytes per grid cell, not one image per word.
The page's code lives in ``caption/viz/assets/viewer.{html,css,js}``; nothing is fetched.

Page data (``<script id="data" type="application/json">``)::

    {"title", "gallery": bool, "labels": [model name, ...], "errors": ["path: reason", ...],
     "alpha": heatmap opacity, "colormap": [r, g, b, ...] (256 entries),
     "photos": [{"name", "src": JPEG data URI, "width", "height",
                 "models": [{"grid": [gh, gw], "init": cells | null, "guide": guide | null,
                             "hyps": [{"caption", "words", "log_prob", "maps": [cells, ...]}]}]}]}

where ``cells`` is one (gh, gw) grid, row by row, scaled so that its largest cell is 255, and
``hyps`` is the caption then its runners-up (``result.alternatives``), best first, and ``guide``
what the encoder's ImageNet classifier said (the record's ``guide``,
:func:`caption.guidance.record.guide_record`: its top labels with probabilities, the name the
caption had to say, whether guidance changed it), shown beside the caption.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from importlib import resources
from typing import Any, Sequence

import numpy as np
from PIL import Image

from caption.fileio import atomic_write
from caption.guidance.record import as_json, guide_record
from caption.guidance.result import guide_of
from caption.viz.overlay import (
    SCALE_MAX,
    SCALES,
    AttentionResult,
    ImageSource,
    PathLike,
    colormap_table,
    init_map,
    load_rgb,
    word_maps,
)

PHOTO_MAX_SIDE = 640  # long side of the embedded photos, in pixels
JPEG_QUALITY = 80
CELL_UNIT = 10_000  # a cell's attention weight is stored in the page in units of 1/CELL_UNIT (a map sums to it)
_SLOT = re.compile(r"\{\{(\w+)\}\}")  # {{name}} in the page template


def _cells(grid: np.ndarray) -> list[int]:
    """One (gh, gw) map as integers row by row, each cell's weight in units of 1/CELL_UNIT: the page
    keeps every map's absolute weights, which its fixed colour scale needs."""
    flat = np.clip(np.nan_to_num(np.asarray(grid, dtype=np.float64).ravel()), 0.0, None)
    return np.rint(flat * CELL_UNIT).astype(int).tolist()


def _hyp(result: AttentionResult) -> dict[str, Any]:
    words, maps = word_maps(result)
    return {"caption": result.caption or " ".join(words), "words": words,
            "log_prob": round(float(result.log_prob), 4), "maps": [_cells(m) for m in maps]}


def _reading(result: AttentionResult) -> dict[str, Any]:
    """One model's caption of a photo, its runners-up and their maps."""
    hyps = [_hyp(result)] + [_hyp(alt) for alt in getattr(result, "alternatives", ())]
    init = init_map(result)
    _, maps = word_maps(result)
    guide = guide_of(result)
    return {"grid": list(maps.shape[1:]), "init": None if init is None else _cells(init),
            "guide": None if guide is None else as_json(guide_record(guide)), "hyps": hyps}


def _jpeg_uri(photo: Image.Image) -> str:
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def photo_entry(name: str, image: ImageSource, results: Sequence[AttentionResult],
                max_side: int = PHOTO_MAX_SIDE) -> dict[str, Any]:
    """The page data of one photo (upright, at most ``max_side`` long) and each model's result on it."""
    if not results:
        raise ValueError("photo_entry needs at least one result")
    photo = load_rgb(image, max_side)
    return {"name": str(name), "src": _jpeg_uri(photo), "width": photo.width, "height": photo.height,
            "models": [_reading(r) for r in results]}


def _asset(name: str) -> str:
    return resources.files("caption.viz").joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element (no '</script>', no '<!--')."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(photos: Sequence[dict[str, Any]], *, title: str, labels: Sequence[str], gallery: bool,
                errors: Sequence[str] = (), cmap: str = "jet", alpha: float = 0.6, head: str = "",
                before: str = "", after: str = "", scale: str = "uniform") -> str:
    """The page's HTML from :func:`photo_entry` dicts (every photo read by the same ``labels`` models).

    ``head``, ``before`` and ``after`` are trusted HTML put at the end of <head>, under the title and
    after the viewer's script: how ``caption serve``'s page adds its upload form to this viewer,
    whose script draws any page data given to ``window.captionViewer.show(data)``. ``scale`` is how
    maps are coloured (:func:`caption.viz.overlay.attention_map`: "uniform" or "minmax")."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    data = {"title": title, "gallery": bool(gallery), "labels": list(labels), "errors": list(errors),
            "alpha": min(max(float(alpha), 0.0), 1.0), "colormap": colormap_table(cmap).ravel().tolist(),
            "scale": scale, "scale_max": SCALE_MAX, "cell_unit": CELL_UNIT,
            "photos": list(photos)}
    values = {"title": html.escape(title), "style": _asset("viewer.css"), "script": _asset("viewer.js"),
              "data": _script_json(data), "alpha": f"{data['alpha']:g}", "head": head, "before": before,
              "after": after}
    return _SLOT.sub(lambda m: values[m.group(1)], _asset("viewer.html"))  # one pass: inserted text stays as is


def _write(page: str, path: PathLike):
    return atomic_write(path, lambda f: f.write(page.encode("utf-8")))


def write_html(
    result: AttentionResult,
    image: ImageSource,
    path: PathLike,
    *,
    title: str | None = None,
    compare: AttentionResult | None = None,
    labels: Sequence[str] | None = None,
    cmap: str = "jet",
    alpha: float = 0.6,
    max_side: int = PHOTO_MAX_SIDE,
    scale: str = "uniform",
):
    """Write ONE self-contained viewer page for one photo (inline CSS/JS/data, no URLs; atomic).

    The caption's words are buttons: hover or click one (or step with Left/Right) to draw its
    heatmap over the photo; the beam's runners-up are listed under it and can be shown the same
    way. ``compare`` puts a second model's result beside the first (``labels`` names the two).
    """
    results = [result] if compare is None else [result, compare]
    names = list(labels) if labels is not None else (["model"] if compare is None else ["model", "compare"])
    name = (getattr(image, "filename", "") or "photo") if isinstance(image, Image.Image) else str(image)
    entry = photo_entry(name, image, results, max_side)
    page = render_page([entry], title=title if title is not None else (result.caption or "caption"),
                       labels=names, gallery=False, cmap=cmap, alpha=alpha, scale=scale)
    return _write(page, path)


def write_gallery(
    photos: Sequence[dict[str, Any]],
    path: PathLike,
    *,
    title: str,
    labels: Sequence[str],
    errors: Sequence[str] = (),
    cmap: str = "jet",
    alpha: float = 0.6,
    scale: str = "uniform",
):
    """Write ONE self-contained gallery page: a grid of the photos (:func:`photo_entry` dicts) with
    their captions, each opening the per-word view (Up/Down or PgUp/PgDn step photos), and the
    files that could not be read (``errors``) listed above it."""
    page = render_page(photos, title=title, labels=labels, gallery=True, errors=errors, cmap=cmap, alpha=alpha,
                       scale=scale)
    return _write(page, path)
