"""Caption your own images with a trained checkpoint: the library API.

    >>> import caption
    >>> model = caption.load("runs/shapes")          # a run directory or a .pt file
    >>> result = model.caption("photo.jpg")          # DecodingResult
    >>> result.caption, result.alphas.shape          # the words and their (T, gh, gw) maps
    >>> for item in model.configured(beam=1).captions(["a.jpg", "b.jpg"]):  # the batch call
    ...     print(item.image, item.result.caption)

:func:`load` is how every caller gets a :class:`CaptionModel`: this API, ``caption predict``,
``attend``, ``evaluate`` and ``serve``, and the demo; :meth:`CaptionModel.captions` is the one
batch call they all make, through :mod:`caption.pipeline` (images to features to captions, the
path the feature cache and validation take too).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeAlias, Union

import torch
from PIL import Image

from caption.checkpoint import CheckpointError, Loaded, load_checkpoints
from caption.config import Config
from caption.data.images import ImageError, load_image, to_rgb, transform_for
from caption.decoding import DecodeConfig, DecodingResult
from caption.guidance.guide import build_guide
from caption.model import Captioner
from caption.pipeline import Outcome, caption_batches, encode_images, inference_encoder
from caption.runtime import Runtime, resolve_runtime
from caption.training.run_dir import DEMO_RUN_DIR
from caption.vocab import Vocabulary

ASSETS = Path(__file__).parent / "assets"
# The default model: one decoder over EfficientNet-Lite0 features, distilled from an ensemble of
# three (MODEL_CARD.md: how, and what each scores).
SHIPPED_MODELS = (ASSETS / "flickr8k_lite0_student.pt",)
# The ensemble it learned from, shipped with its weight matrices in 8 bits: caption.load(SHIPPED_ENSEMBLE)
SHIPPED_ENSEMBLE = tuple(ASSETS / name for name in (
    "flickr8k_lite0_additive.pt", "flickr8k_lite0_seed1.pt", "flickr8k_lite0_seed2.pt"))
SAMPLE_PHOTO = ASSETS / "sample.jpg"  # from google-coral/test_data, Apache-2.0

ImageInput: TypeAlias = Union[str, "os.PathLike[str]", Image.Image]  # a file path or a PIL image
Checkpoints: TypeAlias = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]  # one, or an ensemble


def default_checkpoint(single: bool = False) -> list[Path]:
    """The checkpoints used when none is given (the one place that decides it): the model shipped in
    the package (its first file alone with ``single``), else the demo run."""
    if all(p.is_file() for p in SHIPPED_MODELS):
        return list(SHIPPED_MODELS[:1] if single else SHIPPED_MODELS)
    return [DEMO_RUN_DIR]


def _name(image: ImageInput) -> str:
    """How an input is named in an ImageError."""
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or "<PIL image>"
    return os.fspath(image)


class CaptionModel:
    """A loaded captioner that takes image files or PIL images and returns DecodingResults.

    ``config``/``vocab`` are the ones the checkpoint was trained with; ``options`` the decoding
    settings it captions with (the run's ``decode``, as :meth:`configured` changed them); ``paths``
    the checkpoint files or run directories it was loaded from (an ensemble's members, in order);
    ``grid`` (gh, gw) is the encoder's attention grid, the shape of every ``result.alphas[t]``;
    ``runtime`` the device, precision and threads it computes with (log-probabilities and beam
    scores are fp32 whatever the precision). ``encoder`` is the inference copy of
    ``model.encoder``. ``guide`` names what the encoder's ImageNet classifier sees in the captions
    (on by default; None where off, and ``guide_off`` says why).
    """

    def __init__(self, loaded: Loaded, runtime: Runtime, guide: bool = True, paths: Sequence[Path] = ()):
        self.runtime = runtime
        self.model: Captioner = loaded.model.to(runtime.device).eval()
        self.config: Config = loaded.config
        self.vocab: Vocabulary = loaded.vocab
        self.path: Path = loaded.path
        self.paths: tuple[Path, ...] = tuple(paths) or (loaded.members or (loaded.path,))
        self.name: str = loaded.name  # the file name, or an ensemble's members' joined by '+'
        self.transform = transform_for(self.config, self.model.encoder)
        self.encoder = inference_encoder(self.model.encoder, self.transform.image_size)
        self.guide, self.guide_off = build_guide(self.config, self.vocab, runtime.device) if guide else (None, "asked")

    def __repr__(self) -> str:
        m = self.config.model
        return (f"CaptionModel({str(self.path)!r}, encoder={m.encoder}, attention={m.attention}, grid={self.grid}, "
                f"vocab={len(self.vocab)}, device={self.device}, precision={self.precision.name})")

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def precision(self):
        """The :class:`caption.runtime.Precision` it computes in."""
        return self.runtime.precision

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.grid)

    @property
    def image_size(self) -> int:
        return self.transform.image_size

    @property
    def options(self) -> DecodeConfig:
        """The decoding settings every caption of this model uses."""
        return self.config.decode

    def configured(self, beam: int | None = None, max_len: int | None = None, alternatives: bool | None = None,
                   guide: bool | None = None, **decode_options) -> "CaptionModel":
        """A copy that captions with other settings; this model is left as it is. ``beam``,
        ``max_len``, ``alternatives`` and any other ``decode`` option (``length_penalty``,
        ``no_repeat_ngram``, ``hard_test``...) replace the current ones, a None value keeping it;
        ``guide=False`` drops the classifier's guidance (``guide=True`` keeps it where it was
        built). The copy shares the weights. Raises ConfigError for an invalid value."""
        options = self.options.with_overrides(beam_size=beam, max_len=max_len, alternatives=alternatives,
                                              **decode_options)
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, decode=options)
        if guide is False and self.guide is not None:
            other.guide, other.guide_off = None, "asked"
        return other

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
                alternatives: bool | None = None, guide: bool = True) -> DecodingResult:
        """Caption one image (beam default: :attr:`options`' ``beam_size``); raises ImageError.

        ``alternatives=True``: the result also carries the beam's runners-up (``result.alternatives``).
        ``guide=False``: the plain caption, without the classifier's guidance (``result.guide`` None).
        """
        model = self.configured(beam=beam, max_len=max_len, alternatives=alternatives, guide=guide)
        ((_, result),) = model.captions([image], batch_size=1)
        if isinstance(result, ImageError):
            raise result
        return result

    def captions(self, images: Iterable[ImageInput], batch_size: int = 16) -> Iterator[Outcome]:
        """The batch call: one :class:`caption.pipeline.Outcome` (``image``, ``result``) per input,
        in input order, produced ``batch_size`` images at a time (:func:`encode_images`, then one
        batched search per batch, :func:`caption_batches`). ``result`` is a DecodingResult, or the
        ImageError of an unreadable image (the others are still captioned)."""
        batches = encode_images(self.encoder, images, self.pixels, self.transform, self.runtime, batch_size=batch_size)
        return caption_batches(batches, self.model.decoder, self.options, runtime=self.runtime, vocab=self.vocab,
                               grid=self.grid, guide=self.guide)


def load(checkpoint: Checkpoints | None = None, device: str | torch.device | None = "cpu",
         precision: str | None = None, threads: int | None = None, guide: bool = True, *,
         single: bool = False, runtime: Runtime | None = None, prog: str = "caption",
         report: bool = False) -> CaptionModel:
    """A :class:`CaptionModel` from a checkpoint file or run directory, or from a list of them: an
    ensemble of their decoders over the first one's encoder (:func:`caption.checkpoint.load_checkpoints`;
    members must share the encoder and vocabulary). The default is :func:`default_checkpoint`, the
    shipped ensemble; ``single=True`` takes the first checkpoint alone (one decoder: faster).

    ``device=None`` picks CUDA when available; ``precision`` is auto, fp32, bf16 or fp16 (None:
    the checkpoint's own ``precision``); ``threads`` sets PyTorch's CPU threads (None: its default);
    ``runtime`` replaces all three. ``guide`` (default True) names what the encoder's ImageNet
    classifier sees and the COCO detector confirms (MODEL_CARD.md); where the run cannot, one line
    on stderr, ``<prog>: guidance off: <why>``, says so, and one line says when the detector is
    missing (the people probe alone then says where people are); ``report`` also prints the
    runtime there first. Raises
    :class:`caption.checkpoint.CheckpointError` for a missing, unreadable or mismatched checkpoint,
    and a CaptionError for a device or precision this machine cannot run.
    """
    paths = default_checkpoint() if checkpoint is None else _paths(checkpoint)
    if checkpoint is None and not paths[0].exists():
        raise CheckpointError(f"no trained model at {paths[0]} (the default checkpoint): run `caption demo` "
                              "first to train one, or name a checkpoint file or run directory "
                              "(`--checkpoint PATH` on the command line)")
    loaded = load_checkpoints(paths[:1] if single else paths)
    runtime = runtime or resolve_runtime(device, precision or loaded.config.precision, threads)
    if report:
        print(f"{prog}: {runtime.describe()}", file=sys.stderr, flush=True)
    model = CaptionModel(loaded, runtime, guide, paths=[Path(p) for p in (paths[:1] if single else paths)])
    if guide and model.guide is None:
        print(f"{prog}: guidance off: {model.guide_off}", file=sys.stderr, flush=True)
    elif guide and model.guide.detector is None:
        print(f"{prog}: guidance without the COCO detector ({model.guide.detector_off}): the people probe alone "
              "says where people are", file=sys.stderr, flush=True)
    return model


def _paths(checkpoint: Checkpoints) -> list:
    """One checkpoint or several, as a list."""
    return [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
