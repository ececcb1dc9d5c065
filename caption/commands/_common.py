"""What the ``caption`` subcommands share: exit codes, the one-line error, option types, the
runtime options (``--device``, ``--precision``, ``--threads``) and the one stderr line that reports
them, and loading a model for ``predict``/``attend``. Heavy imports (torch) happen inside the
functions so that ``caption --help`` stays fast."""

from __future__ import annotations

import argparse
import sys

from caption.config import PRECISIONS  # no torch import

EXIT_BAD_INPUT = 1  # some image could not be captioned (the others were)
EXIT_NO_MODEL = 2  # no usable checkpoint, or a bad option: nothing was done


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def error(args: argparse.Namespace, message: str) -> None:
    """One line on stderr, ``caption <command>: error: ...``, whatever the message holds."""
    line = " ".join(str(message).split())
    print(f"caption {args.command}: error: {line}", file=sys.stderr, flush=True)


def add_runtime_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--device``, ``--precision`` and ``--threads``; ``what`` says where the precision's default comes from."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help=f"auto (bf16 where the device computes it in hardware, else fp32), fp32, bf16 or fp16 "
                        f"(not on a CPU); {what}")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for PyTorch (default: its own, one per core)")


def report(args: argparse.Namespace, runtime) -> None:
    """The one stderr line every command prints: the device, precision and threads it runs with."""
    print(f"caption {args.command}: {runtime.describe()}", file=sys.stderr, flush=True)


def resolve(args: argparse.Namespace, precision: str | None, quiet: bool = False):
    """The command's :class:`caption.runtime.Runtime` (``--precision`` wins over ``precision``),
    reported on stderr unless ``quiet``."""
    from caption.runtime import resolve_runtime

    runtime = resolve_runtime(args.device, args.precision or precision, args.threads)
    if not quiet:
        report(args, runtime)
    return runtime


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options of a command that captions with a checkpoint."""
    p.add_argument("--checkpoint", nargs="+", default=None, metavar="PATH",
                   help="checkpoint file or run directory (default: the shipped model); several make an ensemble "
                        "of their decoders (they must share the encoder and vocabulary)")
    p.add_argument("--beam", type=positive_int, default=None, metavar="K",
                   help="beam size; 1 = greedy (default: the run's decode.beam_size)")
    p.add_argument("--hard-test", default=None, choices=("argmax", "expect"),
                   help="a hard-attention model (model.blend=hard) reads its most likely cell per word (argmax: "
                        "one-hot maps) or the expectation (default: the run's decode.hard_test)")
    p.add_argument("--no-guide", dest="guide", action="store_false",
                   help="plain captions: no guidance by the encoder's ImageNet classifier (by default a caption "
                        "that names nothing the classifier is sure of is searched again so that it does)")
    add_runtime_args(p, "default: the checkpoint's precision (auto for the shipped model)")


def load_model(args: argparse.Namespace, flag: str = "checkpoint", runtime=None):
    """The CaptionModel of ``--checkpoint`` by :func:`caption.inference.load` (default: the shipped
    model; several paths: an ensemble), or None after an error line. On stderr: the runtime line
    (unless ``runtime`` is given) and the model's :func:`caption.inference.guidance_note`.
    ``flag="compare"`` loads ``--compare`` instead (no default) in ``runtime``, the first model's."""
    from caption.checkpoint import CheckpointError
    from caption.errors import CaptionError
    from caption.inference import guidance_note, load

    given = getattr(args, flag)
    try:
        model = load([given] if isinstance(given, str) else given, args.device, args.precision, args.threads,
                     guide=getattr(args, "guide", True), runtime=runtime)
    except CheckpointError as err:
        error(args, f"--{flag} {' '.join(str(p) for p in given)}: {err}" if given else str(err))
        return None
    except CaptionError as err:  # an unknown or absent --device, fp16 on a CPU
        error(args, str(err))
        return None
    if runtime is None:
        report(args, model.runtime)
    note = guidance_note(model)
    if note is not None:
        print(f"caption {args.command}: {note}", file=sys.stderr, flush=True)
    return model.configured(hard_test=getattr(args, "hard_test", None))
