"""``caption predict``: caption your own images (``caption attend``, in attend.py, draws where the model looked).

A thin layer over :mod:`caption.inference`. Every bad image gets one line on stderr
(``caption predict: error: <path>: <reason>``) and exit status 1 while the other images are
still captioned; a missing or unreadable checkpoint gets one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from caption.commands._common import (
    EXIT_BAD_INPUT,
    EXIT_NO_MODEL,
    add_model_args,
    error,
    load_model,
    positive_int,
)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from caption.data.images import ImageError, find_images
    from caption.guidance.record import as_json, caption_record

    model = load_model(args)
    if model is None:
        return EXIT_NO_MODEL
    paths, errors = find_images(args.images)
    for line in errors:
        error(args, line)
    failed = bool(errors)
    model = model.configured(beam=args.beam)
    beam = model.options.beam_size
    bar = tqdm(total=len(paths), desc="captioning", unit="img", file=sys.stderr, leave=False, disable=None)
    runners_up = bool(args.json) and beam > 1  # only --json prints them, and they cost decoding time
    for path, result in model.configured(alternatives=runners_up).captions(paths, batch_size=args.batch_size):
        bar.update(1)
        if isinstance(result, ImageError):
            failed = True
            with bar.external_write_mode(file=sys.stderr):
                error(args, str(result))
            continue
        line = (json.dumps(as_json(caption_record(str(path), result, beam)), ensure_ascii=False) if args.json
                else f"{path}\t{result.caption}")
        with bar.external_write_mode(file=sys.stdout):
            print(line, flush=True)
    bar.close()
    return EXIT_BAD_INPUT if failed else 0


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    """Register ``predict`` on the ``caption`` command's subparsers."""
    p = sub.add_parser(
        "predict", help="caption image files or folders",
        description="Print one line per image: PATH<TAB>caption (or a JSON object with --json). "
                    "Unreadable images are reported on stderr (exit status 1); the others are still captioned.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files and/or folders of images (not recursive)")
    add_model_args(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: image, caption, tokens, log_prob, beam, grid, attention "
                        "(per token, gh x gw), alternatives (the beam's runners-up) when the beam is > 1, and "
                        "guide (the ImageNet classifier's top labels with probabilities, the name the caption "
                        "had to say and whether guidance changed it) unless --no-guide")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per batch (default 16)")
    p.set_defaults(func=cmd_predict)
