"""Evaluate a loaded captioner on a split (or any COCO captions file): caption every image once by
the one inference path, score it, and write the captions and scores."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

from torch import nn

from caption.data.records import load_coco, load_split
from caption.errors import CaptionError, DataError
from caption.evaluation.metrics import write_results
from caption.evaluation.scoring import collect, repetition_scores, score_results, split_metric, task_metric
from caption.config import Config
from caption.fileio import atomic_write_json
from caption.pipeline import Outcome


class LoadedModel(Protocol):
    """What evaluation needs of a loaded captioner (:class:`caption.inference.CaptionModel` is one)."""

    config: Config  # the run's config; its ``decode`` is what the model captions with
    paths: tuple[Path, ...]  # the checkpoint files or run directories it was loaded from
    guide: nn.Module | None

    def configured(self, **options) -> "LoadedModel": ...

    def captions(self, images: Iterable, batch_size: int = 16) -> Iterator[Outcome]: ...


def default_out_dir(checkpoint: str | Path | Sequence[str | Path]) -> Path:
    """Where results go without ``out_dir``: ``<run dir>/eval`` for a run directory, else
    ``runs/eval/<file stem>`` under the working directory (never beside a packaged ``.pt``); an
    ensemble's results go to ``runs/eval/<stem>+<stem>...``."""
    paths = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(p) for p in checkpoint]
    if len(paths) == 1 and paths[0].is_dir():
        return paths[0] / "eval"
    return Path("runs") / "eval" / "+".join(p.name if p.is_dir() else p.stem for p in paths)


def evaluate(model: LoadedModel, *, split: str = "test", captions: str | None = None,
             images: str | None = None, beam: int | None = None, length_penalty: float | None = None,
             no_repeat_ngram: int | None = None, out_dir: str | Path | None = None, java: bool | None = None,
             progress: bool = True) -> dict:
    """Scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr, + the data set's own metric) and files in ``out_dir``.

    Decoding follows the run's ``decode`` config, with ``beam``, ``length_penalty`` and
    ``no_repeat_ngram`` overriding it when given. The scores also carry how many captions repeat a
    bigram (``repeated_bigram_rate``, beside the same rate over the references), how many are
    distinct and ``mean_words``, the mean caption length (beam search favours short captions);
    ``guided`` says whether the encoder's ImageNet classifier guided the captions (``model.guide``)
    and ``guide_shaped`` how many captions it changed.
    Writes ``captions_<name>.json`` (COCO results format) and ``scores_<name>.json`` into
    ``out_dir`` (default: :func:`default_out_dir` of the model's ``paths``).
    """
    cfg = model.config
    if captions:
        if not images:
            raise CaptionError("--captions needs --images (the folder its file_name entries are in)")
        records, name, metric = load_coco(captions, images), Path(captions).stem, task_metric(cfg.data.metric, captions)
    else:
        records, name, metric = load_split(cfg.data, split), split, split_metric(cfg, split)
    model = model.configured(beam=beam, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram)
    options = model.config.decode
    results = collect(model.captions([r.path for r in records], batch_size=32), [r.image_id for r in records],
                      progress)
    if not results:
        raise DataError(f"none of the {len(records)} images could be read")
    evaluation = score_results(results, records, java=java, metric=metric)
    words = sum(len(caption.split()) for caption in evaluation.captions.values()) / len(results)
    scores = {**evaluation.scores, "images": len(results), "beam": options.beam_size,
              "length_penalty": options.length_penalty, "no_repeat_ngram": options.no_repeat_ngram,
              "mean_words": round(words, 2), **repetition_scores(evaluation.captions, records),
              "guided": model.guide is not None,
              "guide_shaped": sum(1 for r in results.values() if r.guide is not None and r.guide.shaped)}
    out = Path(out_dir) if out_dir else default_out_dir(model.paths)
    write_results(evaluation.captions, out / f"captions_{name}.json")
    atomic_write_json(out / f"scores_{name}.json", scores, indent=1)
    return scores
