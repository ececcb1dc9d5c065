"""``caption predict``: caption your own images (``caption attend``, in attend.py, draws where the model looked).

A thin layer over :mod:`caption.inference`. Every bad image gets one line on stderr
(``caption predict: error: <path>: <reason>``) and exit status 1 while the other images are
still captioned; a missing or unreadable checkpoint gets one line and exit status 2. Heavy
imports (torch) happen inside the commands so that ``caption --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from caption.config import PRECISIONS  # no torch import: `caption --help` stays fast

EXIT_BAD_INPUT = 1  # some image could not be captioned (the others were)
EXIT_NO_MODEL = 2  # no usable checkpoint, or a bad option: nothing was done
MAP_DECIMALS = 4  # attention weights in --json


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _error(args: argparse.Namespace, message: str) -> None:
    """One line on stderr, whatever the message holds."""
    line = " ".join(str(message).split())
    print(f"caption {args.command}: error: {line}", file=sys.stderr, flush=True)


def _load_model(args: argparse.Namespace, flag: str = "checkpoint"):
    """The CaptionModel of ``--checkpoint`` (default: inference.default_checkpoint()), or None after an
    error line; ``flag="compare"`` loads ``--compare`` instead (which has no default)."""
    from caption.checkpoint import CheckpointError, resolve_checkpoint
    from caption.errors import CaptionError
    from caption.inference import default_checkpoint, load

    given = getattr(args, flag)
    path = Path(given) if given is not None else default_checkpoint()
    try:
        resolve_checkpoint(path)
    except CheckpointError as err:
        if given is None:
            _error(args, f"no trained model at {path} (the default checkpoint): run `caption demo` first, "
                         "or pass --checkpoint PATH")
        else:
            _error(args, f"--{flag} {path}: {err}")
        return None
    try:
        model = load(path, device=args.device, precision=args.precision)
    except CaptionError as err:  # a mismatched checkpoint, an unknown or absent --device, fp16 on a CPU
        _error(args, str(err))
        return None
    if flag == "checkpoint":  # the same precision and device for a second model
        print(f"caption {args.command}: {model.precision.describe()}", file=sys.stderr, flush=True)
    return model


def _maps(alphas) -> list:
    """Attention maps (..., gh, gw) as nested lists rounded to MAP_DECIMALS."""
    return alphas.double().round(decimals=MAP_DECIMALS).tolist()


def _record(path: Path, result, beam: int) -> str:
    """One JSON line: the caption, its emitted words and their attention maps, and, for a beam,
    its runners-up with theirs."""
    record = {
        "image": str(path),
        "caption": result.caption,
        "tokens": list(result.words),  # emitted words, "<end>" included when emitted
        "log_prob": round(float(result.log_prob), 6),
        "beam": beam,
        "grid": list(result.alphas.shape[1:]),  # [gh, gw]
        "attention": _maps(result.alphas),  # T maps (gh, gw), aligned with tokens
    }
    init = getattr(result, "init_alphas", None)
    if init is not None:
        record["init_attention"] = _maps(init)  # (gh, gw), the map used before the first word
    if beam > 1:
        record["alternatives"] = [
            {"caption": alt.caption, "tokens": list(alt.words), "log_prob": round(float(alt.log_prob), 6),
             "attention": _maps(alt.alphas)}
            for alt in result.alternatives
        ]
    return json.dumps(record, ensure_ascii=False)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from caption.data.images import ImageError, find_images

    model = _load_model(args)
    if model is None:
        return EXIT_NO_MODEL
    paths, errors = find_images(args.images)
    for line in errors:
        _error(args, line)
    failed = bool(errors)
    beam = model.options(args.beam).beam_size
    bar = tqdm(total=len(paths), desc="captioning", unit="img", file=sys.stderr, leave=False, disable=None)
    runners_up = bool(args.json) and beam > 1  # only --json prints them, and they cost decoding time
    for path, result in model.iter_captions(paths, beam=args.beam, batch_size=args.batch_size,
                                            alternatives=runners_up):
        bar.update(1)
        if isinstance(result, ImageError):
            failed = True
            with bar.external_write_mode(file=sys.stderr):
                _error(args, str(result))
            continue
        line = _record(path, result, beam) if args.json else f"{path}\t{result.caption}"
        with bar.external_write_mode(file=sys.stdout):
            print(line, flush=True)
    bar.close()
    return EXIT_BAD_INPUT if failed else 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint file or run directory (default: the shipped Flickr8k model)")
    p.add_argument("--beam", type=_positive_int, default=None, metavar="K",
                   help="beam size; 1 = greedy (default: the run's decode.beam_size)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="auto: bf16 where the device has it in hardware, else fp32 (default: the checkpoint's "
                        "precision, auto for the shipped model)")


def add_predict_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``predict`` and ``attend`` (caption.commands.attend) on the ``caption`` command's subparsers."""
    p = sub.add_parser(
        "predict", help="caption image files or folders",
        description="Print one line per image: PATH<TAB>caption (or a JSON object with --json). "
                    "Unreadable images are reported on stderr (exit status 1); the others are still captioned.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files and/or folders of images (not recursive)")
    _add_model_args(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: image, caption, tokens, log_prob, beam, grid, attention "
                        "(per token, gh x gw), and alternatives (the beam's runners-up) when the beam is > 1")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per batch (default 16)")
    p.set_defaults(func=cmd_predict)

    from caption.commands.attend import add_attend_command

    add_attend_command(sub)
