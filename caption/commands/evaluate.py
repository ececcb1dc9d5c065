"""``caption evaluate``: caption a split (or any COCO captions file) with a checkpoint and score it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from caption.errors import CaptionError, DataError
from caption.runtime import resolve_device
from caption.checkpoint import load_checkpoint
from caption.data import load_coco, load_split
from caption.decoding import DecodingOptions
from caption.scoring import caption_records, score_results
from caption.metrics import write_results
from caption.splits import shapes_annotations, transform_for
from caption.shapes import load_shapes


def evaluate_checkpoint(checkpoint: str | Path, *, split: str = "test", captions: str | None = None,
                        images: str | None = None, beam: int | None = None, length_penalty: float | None = None,
                        out_dir: str | None = None,
                        device: str | None = None, java: bool | None = None, progress: bool = True) -> dict:
    """Scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr, + shapes accuracies) and files in ``out_dir``.

    ``beam`` and ``length_penalty`` default to the run's ``decode`` config. Writes
    ``captions_<name>.json`` (COCO results format) and ``scores_<name>.json``; the scores also
    carry ``mean_words``, the mean caption length, since beam search favours short captions.
    """
    dev = resolve_device(device)
    loaded = load_checkpoint(checkpoint, dev)
    cfg = loaded.config
    if captions:
        if not images:
            raise CaptionError("--captions needs --images (the folder its file_name entries are in)")
        records, name = load_coco(captions, images), Path(captions).stem
        shapes, size = load_shapes(captions) or (None, None)
    else:
        records, name = load_split(cfg.data, split), split
        shapes, size = shapes_annotations(cfg, split)
    options = DecodingOptions(beam_size=beam or cfg.decode.beam_size, max_len=cfg.decode.max_len,
                              length_penalty=cfg.decode.length_penalty if length_penalty is None else length_penalty)
    results = caption_records(loaded.model, loaded.vocab, records, options, transform=transform_for(cfg, loaded.model.encoder),
                              batch_size=32, device=dev, num_workers=cfg.data.num_workers, progress=progress)
    if not results:
        raise DataError(f"none of the {len(records)} images could be read")
    evaluation = score_results(results, records, java=java, shapes=shapes, image_size=size)
    words = sum(len(caption.split()) for caption in evaluation.captions.values()) / len(results)
    scores = {**evaluation.scores, "images": len(results), "beam": options.beam_size,
              "length_penalty": options.length_penalty, "mean_words": round(words, 2)}
    out = Path(out_dir) if out_dir else loaded.path.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_results(evaluation.captions, out / f"captions_{name}.json")
    tmp = out / f".scores_{name}.json.tmp"
    tmp.write_text(json.dumps(scores, indent=1))
    tmp.replace(out / f"scores_{name}.json")
    return scores
