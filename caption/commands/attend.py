"""``caption attend``: caption photos and draw where the model looked, over each photo as taken.

One photo: the overlay figure (``--out X.png``, one panel per word), the interactive viewer
(``--out X.html``, or ``--html`` beside the PNG) and, with ``--per-word``, one PNG per word.
A folder or several photos: one self-contained gallery page (``--out X.html``). ``--compare
CHECKPOINT`` puts a second model's caption and maps beside the first's. Every bad image gets one
line on stderr and exit status 1 while the other photos still appear; a bad checkpoint or option
gets one line and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from caption.commands._common import (
    EXIT_BAD_INPUT,
    EXIT_NO_MODEL,
    add_model_args,
    error,
    load_model,
    positive_int,
)

_WORD_FILE = re.compile(r"^\d{2,}_[A-Za-z0-9_-]+\.png$")  # overlay.save_per_word's file names
TITLE_CHARS = 80  # a gallery's title names its inputs up to this length


def _labels(models: list) -> list[str]:
    """How the page and the figure name each model: its file and attention scorer."""
    labels = [f"{m.name} ({m.config.model.attention})" for m in models]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels[1] += " (--compare)"
    return labels


def _is_gallery(args: argparse.Namespace) -> bool:
    return len(args.images) > 1 or Path(args.images[0]).is_dir()


def _bad_options(args: argparse.Namespace) -> str | None:
    """What is wrong with the options (checked before any model is loaded), or None."""
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".png", ".html"):
        return f"--out {args.out}: must end in .png (overlay figure) or .html (viewer)"
    if _is_gallery(args):
        if suffix != ".html":
            return f"--out {args.out}: a folder or several images make a gallery page: use an .html name"
        if args.per_word:
            return "--per-word draws one photo's words: give a single image file"
    return None


def _models(args: argparse.Namespace) -> list | None:
    """The model, and the --compare model when asked for; None after an error line."""
    model = load_model(args)
    if model is None:
        return None
    if args.compare is None:
        return [model]
    other = load_model(args, "compare", runtime=model.runtime)
    return None if other is None else [model, other]


def _remove_stale_words(folder: Path, keep: list[Path]) -> None:
    """Drop per-word PNGs of an earlier, longer caption so the folder holds exactly this one's."""
    kept = {p.resolve() for p in keep}
    for p in folder.iterdir():
        if _WORD_FILE.match(p.name) and p.is_file() and p.resolve() not in kept:
            p.unlink()


def _single(args: argparse.Namespace, models: list) -> int:
    """One photo: overlay PNG and/or viewer page, per-word PNGs."""
    from caption.data.images import ImageError
    from caption.viz import overlay, viewer

    image, out = args.images[0], Path(args.out)
    try:
        results = [m.configured(beam=args.beam, alternatives=True).caption(image) for m in models]
    except ImageError as err:
        error(args, str(err))
        return EXIT_BAD_INPUT
    both = {"compare": results[1], "labels": _labels(models)} if len(results) > 1 else {}
    both["scale"] = args.scale
    written = []
    try:
        if out.suffix.lower() == ".html":
            written.append(viewer.write_html(results[0], image, out, **both))
        else:
            written.append(overlay.save_overlay(results[0], image, out, **both))
            if args.html:
                written.append(viewer.write_html(results[0], image, out.with_suffix(".html"), **both))
        if args.per_word:
            folder = out.parent / f"{out.stem}_words"
            words = overlay.save_per_word(results[0], image, folder, scale=args.scale)
            _remove_stale_words(folder, words)
            written.extend(words)
    except OSError as err:
        error(args, f"cannot write {getattr(err, 'filename', None) or out}: {err.strerror or err}")
        return EXIT_BAD_INPUT
    print("\t".join([str(image)] + [r.caption for r in results]))
    for path in written:
        print(path)
    return 0


def _gallery(args: argparse.Namespace, models: list) -> int:
    """Several photos: caption them all (a progress bar on stderr), then write one gallery page."""
    from tqdm import tqdm

    from caption.data.images import ImageError, find_images
    from caption.viz import viewer

    paths, errors = find_images(args.images)
    for line in errors:
        error(args, line)
    streams = [m.configured(beam=args.beam, alternatives=True).captions(paths, batch_size=args.batch_size)
               for m in models]
    bar = tqdm(total=len(paths), desc="captioning", unit="img", file=sys.stderr, leave=False, disable=None)
    photos = []
    for pairs in zip(*streams):
        path, results = pairs[0][0], [result for _, result in pairs]
        bar.update(1)
        try:
            bad = next((r for r in results if isinstance(r, ImageError)), None)
            if bad is not None:
                raise bad
            photos.append(viewer.photo_entry(str(path), path, results))
        except ImageError as err:
            errors.append(str(err))
            with bar.external_write_mode(file=sys.stderr):
                error(args, str(err))
            continue
        with bar.external_write_mode(file=sys.stdout):
            print("\t".join([str(path)] + [r.caption for r in results]), flush=True)
    bar.close()
    if not photos:
        error(args, f"no image could be captioned: {args.out} not written")
        return EXIT_BAD_INPUT
    title = "Attention: " + ", ".join(args.images)
    title = title if len(title) <= TITLE_CHARS else title[: TITLE_CHARS - 1] + "\u2026"
    try:
        page = viewer.write_gallery(photos, args.out, title=title, labels=_labels(models), errors=errors,
                                    scale=args.scale)
    except OSError as err:
        error(args, f"cannot write {getattr(err, 'filename', None) or args.out}: {err.strerror or err}")
        return EXIT_BAD_INPUT
    print(page)
    return EXIT_BAD_INPUT if errors else 0


def cmd_attend(args: argparse.Namespace) -> int:
    problem = _bad_options(args)
    if problem is not None:
        error(args, problem)
        return EXIT_NO_MODEL
    models = _models(args)
    if models is None:
        return EXIT_NO_MODEL
    return _gallery(args, models) if _is_gallery(args) else _single(args, models)


def add_attend_command(sub: argparse._SubParsersAction) -> None:
    """Register ``attend`` on the ``caption`` command's subparsers."""
    p = sub.add_parser(
        "attend", help="draw where the model looked, word by word: one photo, or a gallery of a folder",
        description="Caption IMAGE and draw each word's attention over the photo as taken (upright, its own "
                    "aspect ratio): an overlay figure (.png) or an interactive viewer (.html). A folder or "
                    "several images make one gallery page (.html). Prints PATH<TAB>caption per photo, then "
                    "every file written. Unreadable images: one line each on stderr, exit status 1.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="an image file; or a folder / several images for a gallery")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="overlay figure (.png); an .html name writes the interactive viewer (one photo) or "
                        "the gallery page (a folder or several images)")
    add_model_args(p)
    p.add_argument("--compare", default=None, metavar="CHECKPOINT",
                   help="a second model (checkpoint file or run directory): its caption and maps beside the first's")
    p.add_argument("--html", action="store_true", help="also write the interactive viewer next to OUT.png (.html)")
    p.add_argument("--per-word", action="store_true",
                   help="also write one PNG per word of the (first) model's caption into <OUT stem>_words/")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images per batch in a gallery (default 16)")
    p.add_argument("--scale", choices=["uniform", "minmax"], default="uniform",
                   help="uniform (default): every map coloured on one fixed scale of its weight against a flat "
                        "map's (1 = flat, so a flat map looks flat); minmax: each map stretched to its own range, "
                        "as other tools draw them (a flat map then looks as sure as a sharp one)")
    p.set_defaults(func=cmd_attend)
