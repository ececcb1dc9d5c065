"""``caption predict`` and ``caption attend``: caption your own images, draw where the model looked.

A thin layer over :mod:`caption.inference`. Every bad image gets one line on stderr
(``caption predict: error: <path>: <reason>``) and exit status 1 while the other images are
still captioned; a missing or unreadable checkpoint gets one line and exit status 2. Heavy
imports (torch) happen inside the commands so that ``caption --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

EXIT_BAD_INPUT = 1  # some image could not be captioned (the others were)
EXIT_NO_MODEL = 2  # no usable checkpoint, or a bad option: nothing was done
_WORD_FILE = re.compile(r"^\d{2,}_[A-Za-z0-9_-]+\.png$")  # visualize.save_per_word's file names


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


def _load_model(args: argparse.Namespace):
    """The CaptionModel of ``--checkpoint`` (default: inference.default_checkpoint()), or None after an error line."""
    from caption.checkpoint import CheckpointError, resolve_checkpoint
    from caption.errors import CaptionError
    from caption.inference import default_checkpoint, load

    path = Path(args.checkpoint) if args.checkpoint is not None else default_checkpoint()
    try:
        resolve_checkpoint(path)
    except CheckpointError as err:
        if args.checkpoint is None:
            _error(args, f"no trained model at {path} (the default checkpoint): run `caption demo` first, "
                         "or pass --checkpoint PATH")
        else:
            _error(args, f"--checkpoint {path}: {err}")
        return None
    try:
        return load(path, device=args.device)
    except CaptionError as err:  # a mismatched checkpoint, an unknown or absent --device
        _error(args, str(err))
    return None


def _record(path: Path, result, beam: int) -> str:
    """One JSON line: the caption, its emitted words (aligned with the attention maps) and the grid."""
    return json.dumps({
        "image": str(path),
        "caption": result.caption,
        "tokens": list(result.words),  # emitted words, "<end>" included when emitted
        "log_prob": round(float(result.log_prob), 6),
        "beam": beam,
        "grid": list(result.alphas.shape[1:]),  # [gh, gw]
    }, ensure_ascii=False)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from caption.images import ImageError, find_images

    model = _load_model(args)
    if model is None:
        return EXIT_NO_MODEL
    paths, errors = find_images(args.images)
    for line in errors:
        _error(args, line)
    failed = bool(errors)
    beam = model.options(args.beam).beam_size
    bar = tqdm(total=len(paths), desc="captioning", unit="img", file=sys.stderr, leave=False, disable=None)
    for path, result in model.iter_captions(paths, beam=args.beam, batch_size=args.batch_size):
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


def _remove_stale_words(folder: Path, keep: list[Path]) -> None:
    """Drop per-word PNGs of an earlier, longer caption so the folder holds exactly this one's."""
    kept = {p.resolve() for p in keep}
    for p in folder.iterdir():
        if _WORD_FILE.match(p.name) and p.is_file() and p.resolve() not in kept:
            p.unlink()


def cmd_attend(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".html"):
        _error(args, f"--out {out}: must end in .png (overlay figure) or .html (viewer)")
        return EXIT_NO_MODEL
    model = _load_model(args)
    if model is None:
        return EXIT_NO_MODEL
    from caption import visualize
    from caption.images import ImageError

    try:
        seen = model.preprocessed(args.image)  # the square image the encoder gets
        result = model.caption(seen, beam=args.beam)
    except ImageError as err:
        _error(args, str(err))
        return EXIT_BAD_INPUT
    written = []
    try:
        if out.suffix.lower() == ".html":
            written.append(visualize.write_html(result, seen, out))
        else:
            written.append(visualize.save_overlay(result, seen, out))
            if args.html:
                written.append(visualize.write_html(result, seen, out.with_suffix(".html")))
        if args.per_word:
            folder = out.parent / f"{out.stem}_words"
            words = visualize.save_per_word(result, seen, folder)
            _remove_stale_words(folder, words)
            written.extend(words)
    except OSError as err:
        _error(args, f"cannot write {getattr(err, 'filename', None) or out}: {err.strerror or err}")
        return EXIT_BAD_INPUT
    print(f"{args.image}\t{result.caption}")
    for path in written:
        print(path)
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint file or run directory (default: the run `caption demo` trains)")
    p.add_argument("--beam", type=_positive_int, default=None, metavar="K",
                   help="beam size; 1 = greedy (default: the run's decode.beam_size)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def add_predict_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``predict`` and ``attend`` on the ``caption`` command's subparsers."""
    p = sub.add_parser(
        "predict", help="caption image files or folders",
        description="Print one line per image: PATH<TAB>caption (or a JSON object with --json). "
                    "Unreadable images are reported on stderr (exit status 1); the others are still captioned.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files and/or folders of images (not recursive)")
    _add_model_args(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: image, caption, tokens, log_prob, beam, grid")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per batch (default 16)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "attend", help="caption one image and draw per-word attention overlays",
        description="Caption IMAGE and write its attention overlay (one panel per word) over the image "
                    "as the model saw it. Prints the caption, then every file written.",
    )
    p.add_argument("image", metavar="IMAGE", help="an image file")
    p.add_argument("--out", required=True, metavar="OUT.png",
                   help="overlay figure (.png); an .html name writes only the interactive viewer")
    _add_model_args(p)
    p.add_argument("--html", action="store_true", help="also write the interactive viewer next to OUT (.html)")
    p.add_argument("--per-word", action="store_true", help="also write one PNG per word into <OUT stem>_words/")
    p.set_defaults(func=cmd_attend)
