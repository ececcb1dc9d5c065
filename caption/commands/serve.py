"""``caption serve``: captions over HTTP (the API and a page; :mod:`caption.serve`).

A thin layer: check that the ``serve`` extra is installed, load the model (one error line and
exit status 2 if it cannot be), print the URL and what it runs with, serve until Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from caption.commands._common import EXIT_NO_MODEL, add_model_args, error, load_model, positive_int

SERVE_MODULES = ("fastapi", "uvicorn", "python_multipart", "prometheus_client")


def _number(text: str, low: float, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (low <= value < float("inf")) or (value == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"expected a {'non-negative' if zero_ok else 'positive'} number, got {text}")
    return value


def _megabytes(text: str) -> float:
    return _number(text, 0.0, zero_ok=False)


def _milliseconds(text: str) -> float:
    return _number(text, 0.0, zero_ok=True)


def _seconds(text: str) -> float:
    return _number(text, 0.0, zero_ok=False)


def _non_negative(text: str) -> float:
    return _number(text, 0.0, zero_ok=True)


LIMIT_OPTIONS = ("max_connections", "upload_memory_mb", "header_timeout_s", "body_timeout_s", "deadline_s",
                 "keep_alive_s", "linger_s", "linger_mb", "grace_s")  # ServeSettings fields named as the options


def cmd_serve(args: argparse.Namespace) -> int:
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        error(args, f"the serve extra is not installed ({', '.join(missing)} missing): pip install -e \".[serve]\"")
        return EXIT_NO_MODEL
    if args.beam is not None and args.beam > args.max_beam:
        error(args, f"--beam {args.beam} is over --max-beam {args.max_beam}")
        return EXIT_NO_MODEL
    from caption.serve.app import ServeSettings, build_app
    from caption.serve.server import serve

    model = load_model(args)
    if model is None:
        return EXIT_NO_MODEL
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
                             max_beam=args.max_beam, beam=args.beam,
                             checkpoints=tuple(Path(p).name for p in args.checkpoint or ()),
                             **{name: getattr(args, name) for name in LIMIT_OPTIONS})
    about = (f"{model.name}, {model.runtime.describe()}, max batch {settings.max_batch}, max wait "
             f"{settings.max_wait_ms:g} ms")
    app = build_app(model, settings, about=about)

    def ready(url: str) -> None:
        print(f"caption serve: {url} ({about}; uploads up to {settings.max_upload_mb:g} MB); Ctrl-C stops",
              file=sys.stderr, flush=True)

    started = serve(app, args.host, args.port, verbose=args.verbose, ready=ready)
    print("caption serve: stopped", file=sys.stderr, flush=True)
    return 0 if started else 1


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the ``caption`` command's subparsers."""
    p = sub.add_parser(
        "serve", help="serve captions over HTTP: an API (with dynamic batching) and a page for people",
        description="POST /v1/caption (one image: multipart or raw bytes), POST /v1/captions (several), "
                    "GET /v1/model, /healthz, /metrics (Prometheus), /openapi.json, and a page at / where a "
                    "photo is dropped and each word's attention is shown. Needs the serve extra: "
                    "pip install -e \".[serve]\".",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="images captioned together in one batched model call (default 16; 1: no batching)")
    p.add_argument("--max-wait-ms", type=_milliseconds, default=5.0, metavar="M",
                   help="how long a batch's first image waits for others to join it, while other requests "
                        "are being read or decoded (default 5)")
    p.add_argument("--max-upload-mb", type=_megabytes, default=20.0, metavar="MB",
                   help="the largest request body; larger ones get a 413 (default 20)")
    p.add_argument("--max-beam", type=positive_int, default=10, metavar="K",
                   help="the largest beam a request may ask for (default 10)")
    _add_limit_args(p.add_argument_group(
        "limits and timeouts", "What the server refuses before reading a body (413 by Content-Length, 503 when "
        "busy or stopping), how long it waits for slow clients, and how it stops. An answer given before the "
        "body was read is followed by reading the rest away (lingering close), so that clients that send "
        "everything before reading (urllib, requests) read it."))
    p.set_defaults(func=cmd_serve)


def _add_limit_args(g) -> None:
    g.add_argument("--max-connections", type=positive_int, default=128, metavar="N",
                   help="open connections; a caption request on a connection beyond them gets a 503 (default 128)")
    g.add_argument("--upload-memory-mb", type=_megabytes, default=128.0, metavar="MB",
                   help="request bodies read and decoded at once, by their sizes; more wait with their bodies "
                        "unread (default 128; at least --max-upload-mb)")
    g.add_argument("--header-timeout-s", type=_seconds, default=10.0, metavar="S",
                   help="a connection must send a complete request head within S seconds, or is closed "
                        "(default 10)")
    g.add_argument("--body-timeout-s", type=_seconds, default=20.0, metavar="S",
                   help="the longest pause while a body arrives: after it a 408 and close (default 20)")
    g.add_argument("--deadline-s", type=_seconds, default=60.0, metavar="S",
                   help="a caption request not answered S seconds after it arrived gets a 504; a batch running "
                        "longer makes /healthz a 503 (default 60)")
    g.add_argument("--keep-alive-s", type=_seconds, default=5.0, metavar="S",
                   help="an idle kept-alive connection is closed after S seconds (default 5)")
    g.add_argument("--linger-s", type=_non_negative, default=5.0, metavar="S",
                   help="after an early answer, read and discard the rest of the body for at most S seconds "
                        "(default 5)")
    g.add_argument("--linger-mb", type=_non_negative, default=64.0, metavar="MB",
                   help="... and at most MB of it (default 64)")
    g.add_argument("--grace-s", type=_non_negative, default=10.0, metavar="S",
                   help="at Ctrl-C or SIGTERM, how long requests in flight may take; one still unanswered then "
                        "gets a 503 (default 10)")
