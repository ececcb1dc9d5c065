"""Image input shared by training, feature caching and inference: load any file as RGB, then resize.

Training and inference must preprocess identically (a mismatch gives "the same caption for every
image", the most reported failure of this model family), so both go through :func:`preprocess`:
:func:`open_rgb` (a file by :func:`load_image`: EXIF orientation, any mode -> RGB, huge images
shrunk before full decode; or a PIL image, converted to RGB) then an :class:`ImageTransform`
(whole-image square resize, no crop, so the attention grid covers the whole photo; ToTensor;
Normalize). Every failure to read a file is an :class:`ImageError` naming it.
:func:`prefetch` decodes and resizes the next images in worker threads while the model computes.
"""

from __future__ import annotations

import collections
import io
import math
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeAlias, TypeVar, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

from caption.config import Config

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

# Pillow refuses images above 2 * Image.MAX_IMAGE_PIXELS (~179 MP by default) with
# DecompressionBombError; we accept everything up to that (its ~89 MP warning is silenced) and turn
# the refusal into an ImageError. A 179 MP photo still loads (JPEGs are drafted down first).
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})

ImageInput: TypeAlias = Union[str, "os.PathLike[str]", Image.Image]  # a file path or a PIL image
Item = TypeVar("Item")
Result = TypeVar("Result")


class ImageError(Exception):
    """An image file that cannot be used; the message names the path and says why in one line."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason.strip().splitlines()[0] if reason.strip() else "unreadable"
        super().__init__(f"{self.path}: {self.reason}")


class TooManyPixelsError(ImageError):
    """An image over the decompression-bomb limit: refused before its pixels are decoded."""


def _draft_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size a JPEG may be drafted to (aspect kept) so that its longest side stays >= max_side."""
    scale = max_side / max(size)
    return max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale))


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth grey values -> 0..255 by rescaling (Pillow's own convert clips them)."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
        out = arr / 257.0  # 16-bit full scale: 65535 -> 255
    elif mode == "F" and lo >= 0 and hi <= 1:
        out = arr * 255.0  # float images in [0, 1]
    elif lo >= 0 and hi <= 255:
        out = arr  # already 8-bit values in a wider container
    else:
        out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency is composited on white, 16-bit and float grey rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I") or mode == "F":
        grey = _scale_to_uint8(np.asarray(image), mode)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _open_and_load(source, max_side: int | None, max_pixels: int | None = None) -> Image.Image:
    """Open (a path or a binary file), refuse more than ``max_pixels``, draft JPEGs near max_side,
    decode fully (so truncation is caught here), orient."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(source)
    with opened as image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels, over the limit of {max_pixels}")
        if max_side is not None and image.format == "JPEG" and max(image.size) > max_side:
            image.draft(image.mode, _draft_size(image.size, max_side))  # decodes at 1/2, 1/4, 1/8
        image.load()  # inside the caller's try: a truncated file fails here, never decodes grey
        try:
            return ImageOps.exif_transpose(image)  # a copy, detached from the file
        except Exception:  # malformed EXIF: keep the pixels as stored
            return image.copy()


def load_image(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Read an image file as RGB, upright per its EXIF orientation.

    With ``max_side``, the result's longest side is at most ``max_side`` (aspect kept); JPEGs are
    decoded at a reduced scale so a 10000x10000 photo never occupies full-size memory. Raises
    :class:`ImageError` for a missing file, a folder, a non-image, a truncated file or one larger
    than Pillow's decompression-bomb limit.
    """
    path = Path(path)
    _check_max_side(max_side)
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image file")
    return _decode(path, path, max_side)


def read_image(data: bytes, name: str, max_side: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """The image in ``data`` (an upload's bytes) exactly as :func:`load_image` reads a file holding
    them; ``max_pixels`` also refuses images with more pixels (before decoding them). Raises
    :class:`ImageError` naming ``name`` for empty, non-image, truncated or too large data."""
    _check_max_side(max_side)
    if not data:
        raise ImageError(name, "empty: no image data")
    return _decode(io.BytesIO(data), name, max_side, max_pixels)


def _check_max_side(max_side: int | None) -> None:
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")


def _decode(source, name: str | Path, max_side: int | None, max_pixels: int | None = None) -> Image.Image:
    """A path or binary file -> RGB, upright, at most ``max_side`` long; every failure an ImageError."""
    try:
        image = _open_and_load(source, max_side, max_pixels)
        image = to_rgb(image)
        if max_side is not None and max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    except Image.DecompressionBombError as err:
        raise TooManyPixelsError(name, f"too many pixels to decode safely ({err})") from err
    except ImageError:
        raise
    except Exception as err:  # Pillow plugins raise OSError, SyntaxError, ValueError, struct.error...
        reason = str(err).strip() or type(err).__name__
        if "cannot identify image file" in reason:
            reason = "not an image file (or an unsupported format)"
        raise ImageError(name, reason) from err
    return image


class ImageTransform:
    """RGB PIL image -> normalised (3, S, S) float32 tensor; the whole image is resized, never cropped.

    ``max_side`` (4 * image_size) is what :func:`preprocess` asks :func:`load_image` for: large
    photos are shrunk cheaply first, and the final bilinear antialiased resize still sees enough
    pixels. Picklable, so DataLoader workers can use it.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.max_side = 4 * self.image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(image))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The resized image as uint8 (3, S, S): 4x smaller than the model input, for keeping in RAM."""
        size = (self.image_size, self.image_size)
        image = to_rgb(image)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)  # Pillow always antialiases
        return TF.pil_to_tensor(image)  # (3, S, S) uint8

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (3, S, S) from ``pixels`` -> the model input, float32 (3, S, S)."""
        return TF.normalize(pixels.float().div_(255), self.mean, self.std)

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """The model's input transform: resize to image_size x image_size, ToTensor, Normalize."""
    return ImageTransform(image_size, mean, std)


def transform_for(cfg: Config, encoder) -> ImageTransform:
    """The one preprocessing used for training, caching and inference: ``data.image_size`` and the
    normalisation of ``encoder`` (its ``mean``/``std``)."""
    return image_transform(cfg.data.image_size, encoder.mean, encoder.std)


def open_rgb(image: ImageInput, max_side: int | None = None) -> Image.Image:
    """A file path (:func:`load_image`, shrunk to ``max_side``) or a PIL image (converted by
    :func:`to_rgb`, its size kept) as RGB. Raises :class:`ImageError` naming the input for one that
    cannot be read or converted, TypeError for anything that is neither."""
    if isinstance(image, Image.Image):
        try:
            return to_rgb(image)
        except Exception as err:  # an unusual mode Pillow cannot convert
            name = getattr(image, "filename", "") or "<PIL image>"
            raise ImageError(name, str(err) or type(err).__name__) from err
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_side=max_side)
    raise TypeError(f"expected an image path or a PIL image, got {type(image).__name__}")


def preprocess(image: ImageInput, transform, *, pixels: bool = False) -> torch.Tensor:
    """Read an image file (or take a PIL image) and apply the model transform: the one path used by
    training, the feature cache and inference (:func:`open_rgb`, then ``transform``).

    ``pixels=True`` stops before normalisation (``ImageTransform.pixels``: uint8 (3, S, S)).
    """
    rgb = open_rgb(image, max_side=getattr(transform, "max_side", None))
    return transform.pixels(rgb) if pixels else transform(rgb)


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Expand files and folders (non-recursive, sorted) into image files, plus one error line per bad path.

    A file named explicitly is kept whatever its extension (loading will report it if it is not an
    image); a folder contributes its files with an extension in IMAGE_EXTENSIONS, hidden files skipped.
    """
    found: list[Path] = []
    errors: list[str] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(
                p for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if not inside:
                errors.append(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            candidates = inside
        elif path.is_file():
            candidates = [path]
        else:
            errors.append(f"{path}: no such file or folder")
            candidates = []
        for p in candidates:
            if p not in seen:
                seen.add(p)
                found.append(p)
    return found, errors


def loader_threads() -> int:
    """Threads that decode and resize images while the model computes (JPEG decoding and Pillow's
    resize release the GIL): one per two cores, 1 to 4, so the model's own threads keep most cores."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _catch(fn: Callable[[Item], Result], item: Item) -> Result | ImageError:
    try:
        return fn(item)
    except ImageError as err:
        return err


def prefetch(items: Iterable[Item], fn: Callable[[Item], Result], *, threads: int | None = None,
             ahead: int = 64) -> Iterator[tuple[Item, Result | ImageError]]:
    """``(item, fn(item))`` in input order, ``fn`` run by ``threads`` worker threads up to ``ahead``
    items before the consumer asks for them, so image decoding overlaps the model's compute.

    An :class:`ImageError` from ``fn`` comes back in place of its result (any other exception is
    raised to the consumer); ``threads=0`` runs ``fn`` in the consumer's thread. Stopping early
    cancels the items not yet started.
    """
    threads = loader_threads() if threads is None else threads
    if threads <= 0:
        for item in items:
            yield item, _catch(fn, item)
        return
    source = iter(items)
    pending: collections.deque[tuple[Item, Future]] = collections.deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="caption-images")
    try:
        for item in source:
            pending.append((item, pool.submit(_catch, fn, item)))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            item, future = pending.popleft()
            for more in source:  # keep the window full
                pending.append((more, pool.submit(_catch, fn, more)))
                break
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
