"""Command line: ``caption <command>``. A thin layer: parse, call the library, report.

Every command prints one clear line per problem on stderr and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from caption.errors import CaptionError


def _config(args: argparse.Namespace):
    from caption.config import load_config

    return load_config(args.config, [*args.overrides, *_precision_override(args)])


def _precision_override(args: argparse.Namespace) -> list[str]:
    """``--precision X`` as the config override ``precision=X`` (after the dotted ones: it wins)."""
    return [f"precision={args.precision}"] if getattr(args, "precision", None) else []


def _report(args: argparse.Namespace, precision: str | None, device: str | None) -> None:
    """The one stderr line every command prints: the precision and device it runs in."""
    from caption.runtime import resolve_precision

    print(f"caption {args.command}: {resolve_precision(precision, device).describe()}", file=sys.stderr, flush=True)


def _run_dir(args: argparse.Namespace, cfg) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name


def cmd_shapes(args: argparse.Namespace) -> int:
    from caption.data.shapes import generate_shapes

    paths = generate_shapes(args.out, n=args.n, seed=args.seed, image_size=args.image_size)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from caption.commands.prepare import prepare

    cfg = _config(args)
    _report(args, cfg.precision, args.device)
    summary = prepare(cfg, _run_dir(args, cfg), splits=args.splits, device=args.device)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from caption.config import apply_overrides, load_config
    from caption.training.distributed import is_main_process
    from caption.training.loop import fit

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise CaptionError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        cfg = apply_overrides(load_config(run_dir / "config.yaml"), [*args.overrides, *_precision_override(args)])
    else:
        if not args.config:
            raise CaptionError("caption train needs --config FILE (or --resume RUN_DIR)")
        cfg = _config(args)
        run_dir = _run_dir(args, cfg)
    if is_main_process():
        _report(args, cfg.precision, args.device)
    result = fit(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite, device=args.device)
    if is_main_process():  # under torchrun every process gets here
        best = f"best val {cfg.train.select_metric} {result.best_score:.4f}"
        print(f"run directory: {result.run_dir}  ({best} after {result.epochs} epochs)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from caption.commands.evaluate import evaluate_checkpoint
    from caption.inference import default_checkpoint

    scores = evaluate_checkpoint(
        args.checkpoint or default_checkpoint(), split=args.split, captions=args.captions, images=args.images,
        beam=args.beam, length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram, out_dir=args.out,
        device=args.device, java=None if not args.no_java else False, precision=args.precision,
    )
    if args.json:
        print(json.dumps(scores))
    else:
        for key, value in scores.items():
            print(f"{key}\t{value:.4f}" if isinstance(value, float) else f"{key}\t{value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from caption.commands.demo import CONFIG, run_demo
    from caption.config import load_config

    _report(args, load_config(CONFIG).precision, args.device)

    run_demo(Path(args.run_dir) if args.run_dir else None, seed=args.seed, device=args.device,
             overwrite=args.overwrite)
    return 0


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML file under configs/")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.attention=dot train.lr=2e-4")


def _add_precision_arg(p: argparse.ArgumentParser, what: str) -> None:
    from caption.config import PRECISIONS

    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help=f"auto (bf16 where the device computes it in hardware, else fp32), fp32, bf16 or fp16 "
                        f"(not on a CPU); {what}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caption", description="Show, Attend and Tell image captioning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="generate the shapes world, train, evaluate and caption a few images")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/shapes; runs/shapes-seed<S> for --seed S)")
    p.add_argument("--seed", type=int, default=0, help="drives data generation and training (default 0)")
    p.add_argument("--overwrite", action="store_true", help="train anew into a run directory that holds another run")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("shapes", help="generate the built-in shapes data set")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.set_defaults(func=cmd_shapes)

    p = sub.add_parser("prepare", help="build the vocabulary and the feature cache")
    _add_config_args(p)
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--device", default=None)
    _add_precision_arg(p, "the features are cached in it (default: the config's precision)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train (or --resume) a captioner")
    _add_config_args(p, required=False)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run directory that holds a run (its checkpoints, metrics.csv and tb/ go)")
    p.add_argument("--device", default=None)
    _add_precision_arg(p, "training, caching and validation run in it (default: the config's precision)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="caption a split and report BLEU/METEOR/ROUGE-L/CIDEr")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or run directory (default: the shipped model)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--captions", help="any COCO-format captions file (instead of --split)")
    p.add_argument("--images", help="image folder for --captions")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the run's decode.beam_size)")
    p.add_argument("--length-penalty", type=float, default=None, metavar="P",
                   help="rank finished captions by log_prob / len**P (default: the run's decode.length_penalty)")
    p.add_argument("--no-repeat-ngram", type=int, default=None, metavar="N",
                   help="never repeat an N-word phrase in a caption, 0 = off (default: the run's decode.no_repeat_ngram)")
    p.add_argument("--out", help="where to write captions and scores (default: <run dir>/eval, or runs/eval/<stem> "
                                 "for a .pt file)")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    p.add_argument("--no-java", action="store_true", help="Python tokenizer, no METEOR")
    p.add_argument("--device", default=None)
    _add_precision_arg(p, "the encoder and decoder run in it (default: the checkpoint's precision)")
    p.set_defaults(func=cmd_evaluate)

    from caption.commands.predict import add_predict_commands

    add_predict_commands(sub)
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
