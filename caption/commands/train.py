"""``caption train``: train a captioner from a config, or ``--resume`` a run exactly where it stopped."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from caption.commands._common import add_runtime_args, resolve
from caption.errors import CaptionError


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config``, ``--run-dir`` and the dotted overrides."""
    p.add_argument("--config", required=required, help="YAML file under configs/")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.attention=dot train.lr=2e-4")


def load_command_config(args: argparse.Namespace):
    """The config of ``--config`` with the dotted overrides, ``--precision`` last (it wins)."""
    from caption.config import load_config

    return load_config(args.config, [*args.overrides, *_precision_override(args)])


def _precision_override(args: argparse.Namespace) -> list[str]:
    return [f"precision={args.precision}"] if getattr(args, "precision", None) else []


def run_dir_of(args: argparse.Namespace, cfg) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name


def cmd_train(args: argparse.Namespace) -> int:
    from caption.config import load_run_config
    from caption.training.distributed import is_main_process
    from caption.training.loop import fit

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise CaptionError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        # written by this release or an earlier one
        cfg = load_run_config(run_dir / "config.yaml", [*args.overrides, *_precision_override(args)])
    else:
        if not args.config:
            raise CaptionError("caption train needs --config FILE (or --resume RUN_DIR)")
        cfg = load_command_config(args)
        run_dir = run_dir_of(args, cfg)
    runtime = resolve(args, cfg.precision, quiet=not is_main_process())  # under torchrun only rank 0 reports
    result = fit(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite, runtime=runtime)
    if is_main_process():  # under torchrun every process gets here
        best = (f"best val {cfg.train.select_metric} {result.best_score:.4f}" if math.isfinite(result.best_score)
                else "not validated yet")
        print(f"run directory: {result.run_dir}  ({best} after {result.epochs} epochs)")
    return 0


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (or --resume) a captioner")
    add_config_args(p, required=False)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run directory that holds a run (its checkpoints, metrics.csv and tb/ go)")
    add_runtime_args(p, "training, caching and validation run in it (default: the config's precision)")
    p.set_defaults(func=cmd_train)
