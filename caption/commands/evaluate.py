"""``caption evaluate``: caption a split (or any COCO captions file) with a checkpoint and score it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from caption.checkpoint import load_checkpoint
from caption.data.records import load_coco, load_split
from caption.decoding import DecodingOptions
from caption.errors import CaptionError, DataError
from caption.evaluation.metrics import write_results
from caption.evaluation.scoring import (
    caption_records,
    repetition_scores,
    score_results,
    task_metric,
)
from caption.fileio import atomic_write_json
from caption.model import Captioner
from caption.model.fuse import fused_for_inference
from caption.runtime import resolve_device, resolve_precision
from caption.training.splits import split_metric, transform_for


def default_out_dir(checkpoint: str | Path) -> Path:
    """Where results go without ``--out``: ``<run dir>/eval`` for a run directory, else
    ``runs/eval/<file stem>`` under the working directory (never beside a packaged ``.pt``)."""
    checkpoint = Path(checkpoint)
    return checkpoint / "eval" if checkpoint.is_dir() else Path("runs") / "eval" / checkpoint.stem


def evaluate_checkpoint(checkpoint: str | Path, *, split: str = "test", captions: str | None = None,
                        images: str | None = None, beam: int | None = None, length_penalty: float | None = None,
                        no_repeat_ngram: int | None = None, out_dir: str | Path | None = None,
                        device: str | None = None, java: bool | None = None, progress: bool = True,
                        precision: str | None = None) -> dict:
    """Scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr, + the data set's own metric) and files in ``out_dir``.

    Decoding follows the run's ``decode`` config, with ``beam``, ``length_penalty`` and
    ``no_repeat_ngram`` overriding it when given. The scores also carry how many captions repeat a
    bigram (``repeated_bigram_rate``, beside the same rate over the references) and how many are
    distinct. Writes ``captions_<name>.json`` (COCO results format) and ``scores_<name>.json``
    into ``out_dir`` (default: :func:`default_out_dir`); the scores also carry ``mean_words``, the
    mean caption length, since beam search favours short captions. The encoder and decoder run in
    ``precision`` (default: the checkpoint's), reported on stderr; images are decoded by at least
    one DataLoader worker process while the model computes.
    """
    dev = resolve_device(device)
    loaded = load_checkpoint(checkpoint, dev)
    cfg = loaded.config
    run_in = resolve_precision(precision or cfg.precision, dev)
    print(f"caption evaluate: {run_in.describe()}", file=sys.stderr, flush=True)
    if captions:
        if not images:
            raise CaptionError("--captions needs --images (the folder its file_name entries are in)")
        records, name, metric = load_coco(captions, images), Path(captions).stem, task_metric(cfg.data.metric, captions)
    else:
        records, name, metric = load_split(cfg.data, split), split, split_metric(cfg, split)
    options = DecodingOptions.from_config(cfg.decode, beam_size=beam, length_penalty=length_penalty,
                                          no_repeat_ngram=no_repeat_ngram)
    transform = transform_for(cfg, loaded.model.encoder)
    size = transform.image_size  # the encoder runs as a copy with BatchNorm folded into its convolutions
    model = Captioner(fused_for_inference(loaded.model.encoder, torch.zeros(1, 3, size, size)), loaded.model.decoder)
    with run_in.autocast():
        results = caption_records(model, loaded.vocab, records, options, transform=transform, batch_size=32,
                                  device=dev, num_workers=max(1, cfg.data.num_workers), progress=progress)
    if not results:
        raise DataError(f"none of the {len(records)} images could be read")
    evaluation = score_results(results, records, java=java, metric=metric)
    words = sum(len(caption.split()) for caption in evaluation.captions.values()) / len(results)
    scores = {**evaluation.scores, "images": len(results), "beam": options.beam_size,
              "length_penalty": options.length_penalty, "no_repeat_ngram": options.no_repeat_ngram,
              "mean_words": round(words, 2), **repetition_scores(evaluation.captions, records)}
    out = Path(out_dir) if out_dir else default_out_dir(checkpoint)
    write_results(evaluation.captions, out / f"captions_{name}.json")
    atomic_write_json(out / f"scores_{name}.json", scores, indent=1)
    return scores
