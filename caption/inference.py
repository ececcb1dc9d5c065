"""Caption your own images with a trained checkpoint: the library API behind ``predict``/``attend``.

    >>> import caption
    >>> model = caption.load("runs/shapes")          # a run directory or a .pt file
    >>> result = model.caption("photo.jpg")          # DecodingResult
    >>> result.caption, result.alphas.shape          # the words and their (T, gh, gw) maps

Every image goes through exactly the training preprocessing, :func:`caption.data.images.load_image`
(EXIF orientation, any mode -> RGB, huge files shrunk while decoding) then
:func:`caption.training.splits.transform_for` (whole-image square resize, normalisation): a mismatch
here is what makes a captioner say the same thing for every image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeAlias, Union

import torch
from PIL import Image

from caption.checkpoint import CheckpointError, Loaded, load_checkpoint
from caption.config import Config
from caption.data.images import ImageError, load_image, prefetch, to_rgb
from caption.decoding import DecodingOptions, DecodingResult, decode
from caption.model.fuse import fused_for_inference
from caption.runtime import Precision, resolve_device, resolve_precision
from caption.training.splits import transform_for
from caption.vocab import Vocabulary

SHIPPED_MODEL = Path(__file__).parent / "assets" / "flickr8k_lite0_additive.pt"  # real photos, see README
SAMPLE_PHOTO = Path(__file__).parent / "assets" / "sample.jpg"  # from google-coral/test_data, Apache-2.0
DEMO_RUN_DIR = Path("runs") / "shapes"  # where `caption demo` trains unless told otherwise

ImageInput: TypeAlias = Union[str, "os.PathLike[str]", Image.Image]  # a file path or a PIL image


def default_checkpoint() -> Path:
    """The checkpoint used when none is given (the one place that decides it): the model shipped in
    the package (Flickr8k, EfficientNet-Lite0 features), else the demo run."""
    return SHIPPED_MODEL if SHIPPED_MODEL.is_file() else DEMO_RUN_DIR


def _name(image: ImageInput) -> str:
    """How an input is named in an ImageError."""
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or "<PIL image>"
    return os.fspath(image)


class CaptionModel:
    """A loaded captioner that takes image files or PIL images and returns DecodingResults.

    ``config``/``vocab`` are the ones the checkpoint was trained with; ``grid`` (gh, gw) is the
    encoder's attention grid, the shape of every ``result.alphas[t]``. ``precision`` (a
    :class:`caption.runtime.Precision`, or auto/fp32/bf16/fp16; default: the checkpoint's
    ``precision``) is what the encoder and the decoder compute in; log-probabilities and beam
    scores are fp32 whatever it is.
    """

    def __init__(self, loaded: Loaded, device: str | torch.device = "cpu", precision: Precision | str | None = None):
        self.device = torch.device(device)
        if not isinstance(precision, Precision):
            precision = resolve_precision(precision or loaded.config.precision, self.device)
        self.precision: Precision = precision
        self.model = loaded.model.to(self.device).eval()
        self.config: Config = loaded.config
        self.vocab: Vocabulary = loaded.vocab
        self.path: Path = loaded.path
        self.transform = transform_for(self.config, self.model.encoder)
        size = self.transform.image_size  # encoding runs a copy with BatchNorm folded into the convolutions
        self._encoder = fused_for_inference(self.model.encoder, torch.zeros(1, 3, size, size))

    def __repr__(self) -> str:
        m = self.config.model
        return (f"CaptionModel({str(self.path)!r}, encoder={m.encoder}, attention={m.attention}, "
                f"grid={self.grid}, vocab={len(self.vocab)}, device={self.device}, precision={self.precision.name})")

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.grid)

    @property
    def image_size(self) -> int:
        return self.transform.image_size

    def options(self, beam: int | None = None, max_len: int | None = None,
                alternatives: bool | None = None) -> DecodingOptions:
        """The run's ``decode`` settings, with ``beam``/``max_len``/``alternatives`` overridden when given."""
        return DecodingOptions.from_config(self.config.decode, beam_size=beam, max_len=max_len,
                                           alternatives=alternatives)

    def load_rgb(self, image: ImageInput) -> Image.Image:
        """The image as RGB, upright; files are shrunk while decoding (never full-size in memory)."""
        if isinstance(image, Image.Image):
            try:
                return to_rgb(image)
            except Exception as err:  # an unusual mode Pillow cannot convert
                raise ImageError(_name(image), str(err) or type(err).__name__) from err
        if isinstance(image, (str, os.PathLike)):
            return load_image(image, max_side=self.transform.max_side)
        raise TypeError(f"expected an image path or a PIL image, got {type(image).__name__}")

    def preprocessed(self, image: ImageInput) -> Image.Image:
        """The RGB image exactly as the encoder sees it (the whole photo resized to a square, no crop).

        Overlays are drawn over the photo as taken instead (pass the path to caption.visualize):
        grid cell (i, j) covers the same fraction of both, a rectangle of the upright photo."""
        rgb = self.load_rgb(image)
        size = (self.image_size, self.image_size)
        # the same resize as ImageTransform, so transform(preprocessed(x)) == transform(load_rgb(x))
        return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BILINEAR)

    def tensor(self, image: ImageInput) -> torch.Tensor:
        """The normalised (3, S, S) model input of one image."""
        return self.transform(self.load_rgb(image))

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """The resized uint8 (3, S, S) image, before normalisation (``transform.normalize``)."""
        return self.transform.pixels(self.load_rgb(image))

    def caption(self, image: ImageInput, beam: int | None = None, max_len: int | None = None,
                alternatives: bool | None = None) -> DecodingResult:
        """Caption one image (beam default: the run's ``decode.beam_size``); raises ImageError.

        ``alternatives=True``: the result also carries the beam's runners-up (``result.alternatives``).
        """
        (result,) = self.caption_batch([image], beam=beam, max_len=max_len, batch_size=1, alternatives=alternatives)
        if isinstance(result, ImageError):
            raise result
        return result

    def caption_batch(
        self, images: Iterable[ImageInput], beam: int | None = None, max_len: int | None = None,
        batch_size: int = 16, alternatives: bool | None = None,
    ) -> list[DecodingResult | ImageError]:
        """Caption many images, ``batch_size`` at a time; an unreadable one yields its ImageError."""
        return [result for _, result in self.iter_captions(images, beam, max_len, batch_size, alternatives)]

    def iter_captions(
        self, images: Iterable[ImageInput], beam: int | None = None, max_len: int | None = None,
        batch_size: int = 16, alternatives: bool | None = None,
    ) -> Iterator[tuple[ImageInput, DecodingResult | ImageError]]:
        """(input, result or ImageError) pairs in input order, produced one batch at a time.

        Worker threads decode and resize the next images while the model captions this batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        options = self.options(beam, max_len, alternatives)  # invalid options fail before any image is read
        chunk: list[tuple[ImageInput, torch.Tensor | ImageError]] = []
        for loaded in prefetch(images, self.pixels, ahead=2 * batch_size):
            chunk.append(loaded)
            if len(chunk) == batch_size:
                yield from zip((image for image, _ in chunk), self._caption_chunk(chunk, options))
                chunk = []
        if chunk:
            yield from zip((image for image, _ in chunk), self._caption_chunk(chunk, options))

    def _caption_chunk(self, chunk: Sequence[tuple[ImageInput, torch.Tensor | ImageError]],
                       options: DecodingOptions) -> list[DecodingResult | ImageError]:
        """(input, uint8 pixels or ImageError) pairs -> results: the loaded images go through the
        encoder and batched search together."""
        outcome: list = [p if isinstance(p, ImageError) else None for _, p in chunk]
        rows = [i for i, (_, p) in enumerate(chunk) if not isinstance(p, ImageError)]
        if rows:
            pixels = torch.stack([chunk[i][1] for i in rows])  # (B, 3, S, S) uint8
            for i, result in zip(rows, self._decode(self.transform.normalize(pixels), options)):
                outcome[i] = result
        return outcome

    @torch.no_grad()
    def _decode(self, batch: torch.Tensor, options: DecodingOptions) -> list[DecodingResult]:
        """Encoder and search in the model's precision (log-probabilities and scores in fp32)."""
        with self.precision.autocast():
            features = self._encoder(batch.to(self.device))  # (B, L, D)
            return decode(self.model.decoder, features, options, vocab=self.vocab, grid=self.grid)


def load(checkpoint: str | os.PathLike[str] | None = None, device: str | torch.device | None = "cpu",
         precision: str | None = None) -> CaptionModel:
    """A :class:`CaptionModel` from a checkpoint file or run directory (default: :func:`default_checkpoint`).

    ``device=None`` picks CUDA when available; ``precision`` is auto, fp32, bf16 or fp16 (None:
    the checkpoint's own ``precision``). Raises :class:`caption.checkpoint.CheckpointError` for a
    missing, unreadable or mismatched checkpoint, and a CaptionError for a precision the device
    cannot run (fp16 on a CPU).
    """
    if checkpoint is None:
        checkpoint = default_checkpoint()
        if not Path(checkpoint).exists():
            raise CheckpointError(f"no trained model at {checkpoint} (the default): run `caption demo` first "
                                  "to train one, or pass a checkpoint file or run directory")
    dev = resolve_device(device)
    return CaptionModel(load_checkpoint(checkpoint, dev), dev, precision)
