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
path the feature cache and validation take too). Images are read and resized by
:func:`caption.data.images.preprocess`, as in training. What loading has to say (the runtime,
guidance off) goes to the ``caption.inference`` logger at INFO; the commands print it themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeAlias, Union

import torch

from caption.checkpoint import CheckpointError, Loaded, load_checkpoints
from caption.config import Config
from caption.data.images import ImageError, ImageInput, preprocess, transform_for
from caption.decoding import DecodeConfig, DecodingResult
from caption.guidance.guide import build_guide
from caption.model import Captioner
from caption.pipeline import Outcome, caption_batches, encode_images, inference_encoder
from caption.runtime import Runtime, resolve_runtime
from caption.vocab import Vocabulary

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
# The default model: one decoder over EfficientNet-Lite0 features, distilled from an ensemble of
# three (MODEL_CARD.md: how, and what each scores).
SHIPPED_MODELS = (ASSETS / "flickr8k_lite0_student.pt",)
# The ensemble it learned from, shipped with its weight matrices in 8 bits: caption.load(SHIPPED_ENSEMBLE)
SHIPPED_ENSEMBLE = tuple(ASSETS / name for name in (
    "flickr8k_lite0_additive.pt", "flickr8k_lite0_seed1.pt", "flickr8k_lite0_seed2.pt"))
# The student trained on with its attention supervised by detected boxes (docs/attention.md): maps that
# point at what the words name, for a small cost in caption scores; 8-bit weights.
# caption.load(GROUNDED_MODEL), or --checkpoint with its path
GROUNDED_MODEL = ASSETS / "flickr8k_lite0_grounded.pt"
SAMPLE_PHOTO = ASSETS / "sample.jpg"  # from google-coral/test_data, Apache-2.0
DEMO_RUN_DIR = Path("runs") / "shapes"  # where `caption demo` trains unless told otherwise

Checkpoints: TypeAlias = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]  # one, or an ensemble


def default_checkpoint() -> list[Path]:
    """The checkpoints used when none is given (the one place that decides it): the model shipped in
    the package, else the demo run."""
    if all(p.is_file() for p in SHIPPED_MODELS):
        return list(SHIPPED_MODELS)
    return [DEMO_RUN_DIR]


class CaptionModel:
    """A loaded captioner that takes image files or PIL images and returns DecodingResults.

    ``config``/``vocab`` are the ones the checkpoint was trained with; ``options`` the decoding
    settings it captions with (the run's ``decode``, as :meth:`configured` changed them); ``paths``
    the checkpoint files or run directories it was loaded from (an ensemble's members, in order)
    and ``name`` how commands and pages name it (the checkpoint file's name, or the members' joined
    by '+'); ``grid`` (gh, gw) is the encoder's attention grid, the shape of every
    ``result.alphas[t]``; ``runtime`` the device, precision and threads it computes with
    (log-probabilities and beam scores are fp32 whatever the precision). ``transform`` is the
    input transform (``preprocess(image, model.transform)`` is what the encoder gets), ``encoder``
    the inference copy of ``model.encoder``. ``guide`` names what the encoder's ImageNet classifier
    sees in the captions (None where off, and ``guide_off`` says why).
    """

    def __init__(self, loaded: Loaded, runtime: Runtime, guide: bool = True, paths: Sequence[Path] = ()):
        self.runtime = runtime
        self.model: Captioner = loaded.model.to(runtime.device).eval()
        self.config: Config = loaded.config
        self.vocab: Vocabulary = loaded.vocab
        self.paths: tuple[Path, ...] = tuple(paths) or (loaded.members or (loaded.path,))
        self.name: str = loaded.name
        self.transform = transform_for(self.config, self.model.encoder)
        self.encoder = inference_encoder(self.model.encoder, self.transform.image_size)
        self._built = build_guide(self.config, self.vocab, runtime.device) if guide else (None, "asked")
        self.guide, self.guide_off = self._built

    def __repr__(self) -> str:
        m = self.config.model
        return (f"CaptionModel({self.name!r}, encoder={m.encoder}, attention={m.attention}, grid={self.grid}, "
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
        ``guide=False`` drops the classifier's guidance, ``guide=True`` takes back the guidance
        :func:`load` built (None where it built none). The copy shares the weights. Raises
        ConfigError for an invalid value."""
        options = self.options.with_overrides(beam_size=beam, max_len=max_len, alternatives=alternatives,
                                              **decode_options)
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, decode=options)
        if guide is not None:
            other.guide, other.guide_off = self._built if guide else (None, "asked")
        return other

    def caption(self, image: ImageInput) -> DecodingResult:
        """Caption one image file or PIL image with :attr:`options` (:meth:`configured` changes
        them); raises ImageError for one that cannot be read."""
        ((_, result),) = self.captions([image], batch_size=1)
        if isinstance(result, ImageError):
            raise result
        return result

    def captions(self, images: Iterable[ImageInput], batch_size: int = 16) -> Iterator[Outcome]:
        """The batch call: one :class:`caption.pipeline.Outcome` (``image``, ``result``) per input,
        in input order, produced ``batch_size`` images at a time (:func:`encode_images`, then one
        batched search per batch, :func:`caption_batches`). ``result`` is a DecodingResult, or the
        ImageError of an unreadable image (the others are still captioned)."""
        pixels = functools.partial(preprocess, transform=self.transform, pixels=True)
        batches = encode_images(self.encoder, images, pixels, self.transform, self.runtime, batch_size=batch_size)
        return caption_batches(batches, self.model.decoder, self.options, runtime=self.runtime, vocab=self.vocab,
                               grid=self.grid, guide=self.guide)


def guidance_note(model: CaptionModel) -> str | None:
    """The one line a loaded model has to say about its guidance, or None: why it is off, or that it
    runs without the COCO detector (the people probe alone then says where people are)."""
    if model.guide is None:
        return None if model.guide_off == "asked" else f"guidance off: {model.guide_off}"
    if model.guide.detector is None:
        return (f"guidance without the COCO detector ({model.guide.detector_off}): the people probe alone "
                "says where people are")
    return None


def load(checkpoint: Checkpoints | None = None, device: str | torch.device | None = "cpu",
         precision: str | None = None, threads: int | None = None, guide: bool = True, *,
         runtime: Runtime | None = None) -> CaptionModel:
    """A :class:`CaptionModel` from a checkpoint file or run directory, or from a list of them: an
    ensemble of their decoders over the first one's encoder (:func:`caption.checkpoint.load_checkpoints`;
    members must share the encoder and vocabulary). The default is :func:`default_checkpoint`, the
    model shipped in the package.

    ``device=None`` picks CUDA when available; ``precision`` is auto, fp32, bf16 or fp16 (None:
    the checkpoint's own ``precision``); ``threads`` sets PyTorch's CPU threads (None: its default);
    ``runtime`` replaces all three. ``guide`` (default True) names what the encoder's ImageNet
    classifier sees and the COCO detector confirms (MODEL_CARD.md). Nothing is printed: the runtime
    and :func:`guidance_note` are logged at INFO on the ``caption.inference`` logger. Raises
    :class:`caption.checkpoint.CheckpointError` for a missing, unreadable or mismatched checkpoint,
    and a CaptionError for a device or precision this machine cannot run.
    """
    paths = default_checkpoint() if checkpoint is None else _paths(checkpoint)
    if checkpoint is None and not paths[0].exists():
        raise CheckpointError(f"no trained model at {paths[0]} (the default checkpoint): run `caption demo` "
                              "first to train one, or name a checkpoint file or run directory "
                              "(`--checkpoint PATH` on the command line)")
    loaded = load_checkpoints(paths)
    if runtime is None:
        runtime = resolve_runtime(device, precision or loaded.config.precision, threads)
        log.info("%s", runtime.describe())
    model = CaptionModel(loaded, runtime, guide, paths=[Path(p) for p in paths])
    note = guidance_note(model)
    if note is not None:
        log.info("%s", note)
    return model


def _paths(checkpoint: Checkpoints) -> list:
    """One checkpoint or several, as a list."""
    return [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
