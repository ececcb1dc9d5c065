"""``caption shapes``: generate the synthetic shapes world (COCO-format captions + object boxes)."""

from __future__ import annotations

import argparse


def cmd_shapes(args: argparse.Namespace) -> int:
    from caption.data.shapes import generate_shapes

    paths = generate_shapes(args.out, n=args.n, seed=args.seed, image_size=args.image_size)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def add_shapes_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shapes", help="generate the built-in shapes data set")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.set_defaults(func=cmd_shapes)
