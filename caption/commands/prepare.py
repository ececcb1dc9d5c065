"""``caption prepare``: the vocabulary (training split only) and the frozen encoder's feature cache."""

from __future__ import annotations

import argparse
import json

from caption.commands._common import add_runtime_args, resolve
from caption.commands.train import add_config_args, load_command_config, run_dir_of


def cmd_prepare(args: argparse.Namespace) -> int:
    from caption.training.splits import prepare

    cfg = load_command_config(args)
    runtime = resolve(args, cfg.precision)
    print(json.dumps(prepare(cfg, run_dir_of(args, cfg), runtime=runtime, splits=args.splits), indent=1))
    return 0


def add_prepare_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="build the vocabulary and the feature cache")
    add_config_args(p)
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    add_runtime_args(p, "the features are cached in it (default: the config's precision)")
    p.set_defaults(func=cmd_prepare)
