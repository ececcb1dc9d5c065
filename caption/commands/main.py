"""Command line: ``caption <command>``. A thin layer: parse, call the library, report.

Every command prints one clear line per problem on stderr and exits non-zero on failure; each
subcommand lives in its own module (``add_<name>_command`` registers it, ``cmd_<name>`` runs it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from caption.commands.attend import add_attend_command
from caption.commands.demo import add_demo_command
from caption.commands.evaluate import add_evaluate_command
from caption.commands.export import add_export_command
from caption.commands.predict import add_predict_command
from caption.commands.prepare import add_prepare_command
from caption.commands.serve import add_serve_command
from caption.commands.shapes import add_shapes_command
from caption.commands.train import add_train_command
from caption.errors import CaptionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caption", description="Show, Attend and Tell image captioning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_demo_command, add_shapes_command, add_prepare_command, add_train_command, add_evaluate_command,
                add_predict_command, add_attend_command, add_export_command, add_serve_command):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from caption.runtime import keep_freed_memory

    keep_freed_memory()  # big activation maps are reused, not page-faulted in again every batch
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CaptionError as err:  # anything else is a bug and keeps its traceback
        print(f"caption {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"caption {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
