"""``caption export``: a run's best checkpoint as a small file to ship (decoder weights in half
precision, or their matrices in 8 bits with ``--int8``; config and vocabulary; the frozen pretrained
encoder is rebuilt from its package).
``--set decode.KEY=VALUE`` (and ``guide.*``) sets the defaults the file is decoded with; the
weights fix everything else."""

from __future__ import annotations

import argparse

from caption.commands._common import EXIT_NO_MODEL, error

SHIPPABLE = ("decode.", "guide.")  # settings an export may change: how captions are made, not the model


def cmd_export(args: argparse.Namespace) -> int:
    from caption.checkpoint import CheckpointError, load_checkpoint, save_portable
    from caption.config import ConfigError, apply_overrides

    fixed = [o for o in args.overrides if not o.startswith(SHIPPABLE)]
    if fixed:
        error(args, f"{fixed[0]}: an export may set only {' and '.join(k + '*' for k in SHIPPABLE)} "
                    "(the weights fix the rest)")
        return EXIT_NO_MODEL
    try:
        loaded = load_checkpoint(args.checkpoint)
        config = apply_overrides(loaded.config, args.overrides)
        path = save_portable(args.out, loaded.model, config, loaded.vocab, int8=args.int8)
    except (CheckpointError, ConfigError) as err:
        error(args, str(err))
        return EXIT_NO_MODEL
    print(f"{path}\t{path.stat().st_size / 1e6:.1f} MB")
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's model as a small file to ship (decoder in fp16)")
    p.add_argument("checkpoint", metavar="RUN_OR_PT", help="run directory (its best.pt) or checkpoint file")
    p.add_argument("--out", required=True, help="the .pt file to write (atomically)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a decode.* or guide.* default to ship with it, e.g. --set decode.no_repeat_ngram=2 "
                        "(repeatable)")
    p.add_argument("--int8", action="store_true",
                   help="the decoder's weight matrices in 8 bits with a scale per row (about half the size; "
                        "measure its scores before shipping it)")
    p.set_defaults(func=cmd_export)
