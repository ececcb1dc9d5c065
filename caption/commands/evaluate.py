"""``caption evaluate``: caption a split (or any COCO captions file) with a checkpoint and score it."""

from __future__ import annotations

import argparse
import json

from caption.commands._common import EXIT_NO_MODEL, add_model_args, load_model


def cmd_evaluate(args: argparse.Namespace) -> int:
    from caption.evaluation.evaluate import evaluate

    model = load_model(args)
    if model is None:
        return EXIT_NO_MODEL
    scores = evaluate(model, split=args.split,
                      captions=args.captions, images=args.images, beam=args.beam, length_penalty=args.length_penalty,
                      no_repeat_ngram=args.no_repeat_ngram, out_dir=args.out, java=None if not args.no_java else False)
    if args.json:
        print(json.dumps(scores))
    else:
        for key, value in scores.items():
            print(f"{key}\t{value:.4f}" if isinstance(value, float) else f"{key}\t{value}")
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
    p.set_defaults(func=cmd_evaluate)
