"""``caption export``: a run's best checkpoint as a small file to ship (decoder weights in half
precision, config and vocabulary; the frozen pretrained encoder is rebuilt from its package)."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from caption.checkpoint import load_checkpoint, save_portable

    loaded = load_checkpoint(args.checkpoint)
    path = save_portable(args.out, loaded.model, loaded.config, loaded.vocab)
    print(f"{path}\t{path.stat().st_size / 1e6:.1f} MB")
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's model as a small file to ship (decoder in fp16)")
    p.add_argument("checkpoint", metavar="RUN_OR_PT", help="run directory (its best.pt) or checkpoint file")
    p.add_argument("--out", required=True, help="the .pt file to write (atomically)")
    p.set_defaults(func=cmd_export)
