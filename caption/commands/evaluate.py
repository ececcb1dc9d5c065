"""``caption evaluate``: caption a split (or any COCO captions file) with a checkpoint and score it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caption.commands._common import EXIT_NO_MODEL, add_model_args, load_model
from caption.errors import CaptionError, DataError


def cmd_evaluate(args: argparse.Namespace) -> int:
    from caption.evaluation.evaluate import evaluate

    model = load_model(args)
    if model is None:
        return EXIT_NO_MODEL
    if args.pointing:
        return _pointing(model, args)
    scores = evaluate(model, split=args.split,
                      captions=args.captions, images=args.images, beam=args.beam, length_penalty=args.length_penalty,
                      no_repeat_ngram=args.no_repeat_ngram, out_dir=args.out, java=None if not args.no_java else False)
    if args.json:
        print(json.dumps(scores))
    else:
        for key, value in scores.items():
            print(f"{key}\t{value:.4f}" if isinstance(value, float) else f"{key}\t{value}")
    return 0


def _pointing(model, args: argparse.Namespace) -> int:
    """``--pointing``: where the words that name detected objects attend, as one JSON report."""
    from tqdm import tqdm

    from caption.data.images import find_images
    from caption.evaluation.pointing import measure_pointing
    from caption.fileio import atomic_write_json
    from caption.guidance.detector import load_detector

    if args.captions:
        from caption.data.records import load_coco

        paths = [r.path for r in load_coco(args.captions, args.images)]
    elif args.images:
        paths, missing = find_images([args.images])
        if missing:
            raise DataError(f"--images: {missing[0]}")
    else:
        raise CaptionError("--pointing needs --images (a folder of photos; with --captions, the photos it lists)")
    detector, reason = load_detector(min_score=args.min_score)
    if detector is None:
        raise CaptionError(f"--pointing needs the COCO detector: {reason}")
    model = model.configured(beam=args.beam)
    with tqdm(total=len(paths), desc="pointing", unit="img", disable=args.json) as bar:
        report = measure_pointing(model, paths, detector, min_score=args.min_score, progress=bar).as_dict()
    if args.out:
        atomic_write_json(Path(args.out) / "pointing.json", report, indent=1)
    print(json.dumps(report, indent=None if args.json else 1))
    return 0


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="caption a split and report BLEU/METEOR/ROUGE-L/CIDEr")
    add_model_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--captions", help="any COCO-format captions file (instead of --split)")
    p.add_argument("--images", help="image folder for --captions")
    p.add_argument("--length-penalty", type=float, default=None, metavar="P",
                   help="rank finished captions by log_prob / len**P (default: the run's decode.length_penalty)")
    p.add_argument("--no-repeat-ngram", type=int, default=None, metavar="N",
                   help="never repeat an N-word phrase in a caption, 0 = off (default: the run's decode.no_repeat_ngram)")
    p.add_argument("--out", help="where to write captions and scores (default: <run dir>/eval, or runs/eval/<stem> "
                                 "for a .pt file)")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    p.add_argument("--no-java", action="store_true", help="Python tokenizer, no METEOR")
    p.add_argument("--pointing", action="store_true",
                   help="instead of caption scores, measure where attention points on the photos of --images: "
                        "for each word that names an object the COCO detector finds, the attention mass and peak "
                        "inside its boxes, against a flat map and the model's own mean map (docs/attention.md)")
    p.add_argument("--min-score", type=float, default=0.5, metavar="S",
                   help="--pointing: detections at this score or above are the objects' boxes (default: 0.5)")
    p.set_defaults(func=cmd_evaluate)
