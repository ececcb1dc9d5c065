"""Load test of ``caption serve`` on 127.0.0.1 (its own server processes, nothing else is contacted); one JSON line.

Two servers run side by side, batching on (``--max-batch``, default 16) and off (``--max-batch 1``),
each warmed up. At 1, 8 and 32 concurrent clients (one keep-alive connection each, Flickr8k photos
as raw JPEG bodies, the server's default options: beam 3, guided, runners-up and attention maps in
the answer), ``--requests`` requests go to each server, ``--repeats`` times, alternating which goes
first so that both see the same machine: requests/s (median of the repeats), p50/p95/p99 latency
(over all requests) and the mean batch size the server's /metrics saw. ``speedup`` is batching's
requests/s over one-at-a-time's.

Then the mixed run, on a third fresh server: ``--mixed`` (1,000) requests at 8 clients, a third of
them bad (empty, truncated, not an image, a wrong content type, a malformed form, a body over the
size limit, a decompression bomb, absurd or unknown options); every bad one must get a 4xx, every
good one a 200 whose caption equals ``caption predict``'s for that file (same model, precision and
threads), and no answer a 5xx. ``rss_change`` compares the server's resident memory after the run
with its memory after a warm-up (full batches from 2 x --max-batch clients, then 200 requests of
the same mix).

Then the overload run, on a fresh server at its default limits: ``--overload-clients`` (64) urllib
clients each upload one ``--overload-mb`` (8 MB) PNG (the first photo scaled up) at the same
moment, ``--overload-rounds`` (2) times: the status counts (200, or 503 when busy; anything else is
a failure, a client's error such as a reset connection included), p50/p99 latency, and the
server's RSS before, at its peak (sampled every 20 ms) and after; then /healthz and one ordinary
request. And the stalled-client run, on another: ``--stalled`` (16) connections of each kind stop
(after the head and 100 bytes of a 100 kB body; halfway through the head; before a byte) while 8
clients keep captioning: how long each kind held its connection and what it was answered, and
what the 8 got meanwhile (the server's own header and body timeouts unless given).

Every level stops at ``--time-cap`` seconds (``capped`` in its entry); every request has a timeout.

    python benchmarks/serve.py [--threads 2] [--precision auto] [--requests 128] [--repeats 2]
                               [--clients 1 8 32] [--max-batch 16] [--max-wait-ms 5] [--mixed 1000] [--images 64]
                               [--overload-clients 64] [--overload-mb 8] [--overload-rounds 2] [--stalled 16]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import torch

from caption.config import PRECISIONS
from caption.data.images import find_images
from caption.runtime import cpu_name
from caption.serve.client import Client, ServerProcess, encode_multipart

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "images"
UPLOAD_MB = 1  # the mixed run's --max-upload-mb: a 1.1 MB body is over it


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _batch_stats(client: Client) -> tuple[float, float]:
    text = client.request("GET", "/metrics").body.decode()
    total = re.search(r"^caption_batch_size_sum (\S+)$", text, re.M)
    count = re.search(r"^caption_batch_size_count (\S+)$", text, re.M)
    return float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0


def _load(url: str, photos: list[bytes], clients: int, n: int, cap: float) -> dict:
    """``n`` requests by ``clients`` threads: their latencies (s), statuses and the wall time."""
    counter, latencies, statuses = itertools.count(), [], []
    deadline = time.monotonic() + cap

    def worker() -> None:
        client = Client(url, timeout=120)
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= n:
                break
            t0 = time.perf_counter()
            answer = client.caption(photos[i % len(photos)], multipart=False)
            latencies.append(time.perf_counter() - t0)
            statuses.append(answer.status)
        client.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    return {"latencies": latencies, "statuses": statuses, "seconds": time.perf_counter() - t0,
            "capped": len(latencies) < n}


def _summary(batching: bool, max_batch: int, clients: int, loads: list[dict], batches: tuple[float, float]) -> dict:
    """One level's entry: requests/s (median over the repeats), latency percentiles over all requests (ms)."""
    latencies = [x for load in loads for x in load["latencies"]]
    rates = [len(load["latencies"]) / load["seconds"] for load in loads]
    return {"batching": batching, "max_batch": max_batch, "clients": clients, "requests": len(latencies),
            "requests_per_s": round(statistics.median(rates), 2), "requests_per_s_runs": [round(r, 2) for r in rates],
            **{f"p{q}_ms": round(1000 * _percentile(latencies, q), 1) for q in (50, 95, 99)},
            "non_200": sum(s != 200 for load in loads for s in load["statuses"]),
            "capped": any(load["capped"] for load in loads),
            "mean_batch": round(batches[0] / batches[1], 2) if batches[1] else None}


def _server_args(args: argparse.Namespace, max_batch: int, *extra: str) -> list[str]:
    out = ["--threads", str(args.threads), "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           *extra]
    out += ["--precision", args.precision] if args.precision else []
    return out + (["--checkpoint", *args.checkpoint] if args.checkpoint else [])


def _levels(args: argparse.Namespace, photos: list[bytes], tmp: Path) -> tuple[list[dict], dict]:
    """Two servers side by side, batching on and off, each warmed up; every --clients level is run
    on both, alternating which goes first, ``--repeats`` times; and what the servers ran."""
    settings = {True: args.max_batch, False: 1}
    with ServerProcess(_server_args(args, args.max_batch), tmp / "batched.log") as on, \
            ServerProcess(_server_args(args, 1), tmp / "single.log") as off:
        servers = {True: on, False: off}
        for batching, server in servers.items():  # warm-up
            _load(server.url, photos, min(8, max(args.clients)), 2 * settings[batching] + 8, args.time_cap)
        probes = {batching: Client(server.url) for batching, server in servers.items()}
        info = probes[True].request("GET", "/v1/model").json()
        runs = []
        for clients in args.clients:
            loads: dict[bool, list[dict]] = {True: [], False: []}
            before = {b: _batch_stats(probe) for b, probe in probes.items()}
            for repeat in range(args.repeats):
                for batching in ((True, False) if repeat % 2 == 0 else (False, True)):
                    loads[batching].append(_load(servers[batching].url, photos, clients, args.requests, args.time_cap))
            for batching, probe in probes.items():
                after = _batch_stats(probe)
                batches = (after[0] - before[batching][0], after[1] - before[batching][1])
                runs.append(_summary(batching, settings[batching], clients, loads[batching], batches))
        for probe in probes.values():
            probe.close()
    return runs, {k: info[k] for k in ("name", "precision", "device", "threads", "guide")}


# ----------------------------------------------------------------------------- the mixed run


def _bomb(width: int = 12_000, height: int = 8_000) -> bytes:
    """A valid black PNG of width x height one-bit pixels (96 MP, over Pillow's limit): 12 kB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\0" + b"\0" * ((width + 7) // 8)) * height  # filter byte + packed bits, per row
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


def _bad_requests(photo: bytes) -> list[tuple[str, str, bytes, dict]]:
    """(kind, path, body, headers) of bad requests, one per kind."""
    form, form_type = encode_multipart([("image", "notes.txt", "text/plain", b"hello")])
    jpeg = {"Content-Type": "image/jpeg"}
    return [
        ("empty", "/v1/caption", b"", jpeg),
        ("truncated", "/v1/caption", photo[: len(photo) // 3], jpeg),
        ("not an image", "/v1/caption", b"GIF89a but not really" * 20, jpeg),
        ("text/plain", "/v1/caption", photo, {"Content-Type": "text/plain"}),
        ("text part", "/v1/caption", form, {"Content-Type": form_type}),
        ("malformed form", "/v1/caption", form[: len(form) // 2], {"Content-Type": form_type}),
        ("too large", "/v1/caption", b"\xff" * int(UPLOAD_MB * 1.1 * 2**20), jpeg),
        ("bomb", "/v1/caption", _bomb(), {"Content-Type": "image/png"}),
        ("beam 0", "/v1/caption?beam=0", photo, jpeg),
        ("beam 10**9", "/v1/caption?beam=1000000000", photo, jpeg),
        ("unknown option", "/v1/caption?file=/etc/passwd", photo, jpeg),
    ]


def _predict(paths: list[Path], args: argparse.Namespace) -> dict[str, str]:
    """``caption predict --json``'s caption of each file, by file name."""
    cmd = [sys.executable, "-m", "caption", "predict", *map(str, paths), "--json", "--threads", str(args.threads)]
    cmd += (["--precision", args.precision] if args.precision else []) + (
        ["--checkpoint", *args.checkpoint] if args.checkpoint else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True).stdout
    return {Path(r["image"]).name: r["caption"] for r in map(json.loads, out.splitlines())}


def _mix(paths: list[Path], photos: list[bytes], n: int) -> list[tuple]:
    """n requests, every third bad: (kind, path, body, headers, file name or None)."""
    bad = _bad_requests(photos[0])
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append((*bad[(i // 3) % len(bad)], None))
        else:
            k = i % len(photos)
            body, kind = (photos[k], "image/jpeg") if i % 2 else encode_multipart(
                [("image", paths[k].name, "image/jpeg", photos[k])])
            out.append(("good", "/v1/caption", body, {"Content-Type": kind}, paths[k].name))
    return out


def _send_all(url: str, requests: list[tuple], clients: int, cap: float) -> list[tuple]:
    """(request, status, answer body or the client's exception) for each request sent before ``cap``."""
    deadline = time.monotonic() + cap

    def send(chunk: list[tuple]) -> list[tuple]:
        client, done = Client(url, timeout=120), []
        for req in chunk:
            if time.monotonic() > deadline:
                break
            try:
                answer = client.request("POST", req[1], req[2], req[3])
                done.append((req, answer.status, answer.body))
            except OSError as err:
                client.close()
                done.append((req, None, err))
        client.close()
        return done

    with ThreadPoolExecutor(clients) as pool:
        return [d for part in pool.map(send, [requests[i::clients] for i in range(clients)]) for d in part]


def _mixed(args: argparse.Namespace, paths: list[Path], photos: list[bytes], log: Path) -> dict:
    reference = _predict(paths, args)
    with ServerProcess(_server_args(args, args.max_batch, "--max-upload-mb", str(UPLOAD_MB)), log) as server:
        _load(server.url, photos, 2 * args.max_batch, 4 * args.max_batch, args.time_cap)  # warm-up: full batches
        _send_all(server.url, _mix(paths, photos, 200), 8, args.time_cap)  # and the same mix
        rss_warm = server.rss_bytes()
        done = _send_all(server.url, _mix(paths, photos, args.mixed), 8, args.time_cap)
        rss_after = server.rss_bytes()
    good = [d for d in done if d[0][0] == "good"]
    bad = [d for d in done if d[0][0] != "good"]
    differs = [d[0][4] for d in good if d[1] == 200 and json.loads(d[2])["caption"] != reference[d[0][4]]]
    return {"requests": len(done), "good": len(good), "bad": len(bad),
            "bad_4xx": sum(d[1] is not None and 400 <= d[1] < 500 for d in bad),
            "bad_statuses": sorted({f"{d[0][0]}: {d[1]}" for d in bad}),
            "good_200": sum(d[1] == 200 for d in good), "good_equal_to_predict": sum(d[1] == 200 for d in good) -
            len(differs), "good_different": sorted(set(differs))[:10],
            "status_5xx": sum(d[1] is not None and d[1] >= 500 for d in done),
            "client_errors": sum(d[1] is None for d in done), "capped": len(done) < args.mixed,
            "rss_after_warmup_mb": round(rss_warm / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
            "rss_change": round(rss_after / rss_warm - 1, 4)}


# ----------------------------------------------------------------------------- overload and stalled clients


def _big_upload(path: Path, megabytes: float) -> bytes:
    """The photo scaled up to a PNG of about ``megabytes`` (stored without compression): a valid image."""
    from PIL import Image

    side = int((megabytes * 2**20 / 3) ** 0.5)
    out = io.BytesIO()
    Image.open(path).convert("RGB").resize((side, side)).save(out, "PNG", compress_level=0)
    return out.getvalue()


def _urlopen(url: str, body: bytes) -> tuple[int | str, float]:
    """POST with urllib, as a plain Python client does: (status or the client's error, seconds)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            reply.read()
            status: int | str = reply.status
    except urllib.error.HTTPError as err:
        err.read()
        status = err.code
    except OSError as err:
        status = type(err).__name__
    return status, time.perf_counter() - t0


def _watch_rss(server: ServerProcess, done: threading.Event, peak: list[int]) -> None:
    """``peak[0]``: the server's largest RSS, sampled every 20 ms until ``done``."""
    while not done.is_set():
        peak[0] = max(peak[0], server.rss_bytes())
        time.sleep(0.02)


def _overload(args: argparse.Namespace, upload: bytes, photo: bytes, log: Path) -> dict:
    """``--overload-clients`` urllib clients send one ``--overload-mb`` upload each at the same
    moment, ``--overload-rounds`` times, at the server's default limits: status counts, latency,
    the server's RSS (before, peak sampled every 20 ms, after) per round; then /healthz and one
    ordinary request."""
    rounds = []
    with ServerProcess(_server_args(args, args.max_batch), log) as server:
        _load(server.url, [photo], 4, 8, args.time_cap)  # warm-up
        url = server.url + "/v1/caption"
        for _ in range(args.overload_rounds):
            before, peak, done = server.rss_bytes(), [0], threading.Event()
            watcher = threading.Thread(target=_watch_rss, args=(server, done, peak))
            watcher.start()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.overload_clients) as pool:
                answers = list(pool.map(lambda _: _urlopen(url, upload), range(args.overload_clients)))
            seconds = time.perf_counter() - t0
            done.set()
            watcher.join()
            latencies = [s for _, s in answers]
            rounds.append({"statuses": {str(k): [a[0] for a in answers].count(k) for k in {a[0] for a in answers}},
                           "seconds": round(seconds, 2),
                           **{f"p{q}_ms": round(1000 * _percentile(latencies, q), 1) for q in (50, 99)},
                           "rss_before_mb": round(before / 2**20, 1), "rss_peak_mb": round(peak[0] / 2**20, 1),
                           "rss_after_mb": round(server.rss_bytes() / 2**20, 1)})
        health = Client(server.url).request("GET", "/healthz").status
        after = Client(server.url).caption(photo, multipart=False).status
    return {"clients": args.overload_clients, "upload_mb": round(len(upload) / 2**20, 2), "rounds": rounds,
            "healthz_after": health, "request_after": after}


def _stall(address: tuple[str, int], kind: str) -> socket.socket:
    """A connection that stops: after the head and 100 bytes of a 100 kB body, halfway through the head,
    or before sending anything."""
    sock = socket.create_connection(address, timeout=10)
    head = b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    sock.sendall({"body": head + b"\0" * 100, "head": head[:40], "silent": b""}[kind])
    return sock


def _dropped_after(sock: socket.socket, cap: float) -> tuple[float | None, int | None]:
    """Seconds until the server closes ``sock`` (None: not within ``cap``) and the status it sent, if any."""
    t0, data = time.perf_counter(), b""
    sock.settimeout(cap)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None, None
    finally:
        sock.close()
    status = re.match(rb"HTTP/1\.1 (\d+)", data)
    return round(time.perf_counter() - t0, 2), int(status.group(1)) if status else None


def _stalled(args: argparse.Namespace, photos: list[bytes], log: Path) -> dict:
    """``--stalled`` connections of each kind stop sending while 8 clients keep captioning; how long
    each kind held its connection, what it was answered, and what the others got meanwhile."""
    extra = [f"--{name.replace('_', '-')}={value}" for name in ("header_timeout_s", "body_timeout_s")
             if (value := getattr(args, name)) is not None]
    with ServerProcess(_server_args(args, args.max_batch, *extra), log) as server:
        _load(server.url, photos, 4, 8, args.time_cap)  # warm-up
        info = Client(server.url).request("GET", "/v1/model").json()["limits"]
        address = (urlsplit(server.url).hostname, urlsplit(server.url).port)
        socks = {kind: [_stall(address, kind) for _ in range(args.stalled)] for kind in ("body", "head", "silent")}
        with ThreadPoolExecutor(3 * args.stalled + 1) as pool:
            watched = {kind: [pool.submit(_dropped_after, s, args.time_cap) for s in group]
                       for kind, group in socks.items()}
            served = pool.submit(_load, server.url, photos, 8, 10**9, min(args.time_cap, 5 + max(
                info["header_timeout_s"], info["body_timeout_s"])))
            drops = {kind: [f.result() for f in futures] for kind, futures in watched.items()}
            others = served.result()
    return {"stalled_per_kind": args.stalled, "header_timeout_s": info["header_timeout_s"],
            "body_timeout_s": info["body_timeout_s"],
            "dropped": {kind: {"max_s": max((d[0] for d in found if d[0] is not None), default=None),
                               "not_dropped": sum(d[0] is None for d in found),
                               "statuses": sorted({str(d[1]) for d in found})} for kind, found in drops.items()},
            "others": {"requests": len(others["statuses"]), "non_200": sum(s != 200 for s in others["statuses"]),
                       "requests_per_s": round(len(others["latencies"]) / others["seconds"], 2),
                       **{f"p{q}_ms": round(1000 * _percentile(others["latencies"], q), 1) for q in (50, 99)}}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="default: the checkpoint's (auto)")
    p.add_argument("--checkpoint", nargs="+", default=None, help="default: the shipped model")
    p.add_argument("--folder", type=Path, default=FLICKR8K, help=f"photos (default {FLICKR8K})")
    p.add_argument("--images", type=int, default=64, help="distinct photos, cycled (default 64)")
    p.add_argument("--requests", type=int, default=128, help="requests per level and repeat (default 128)")
    p.add_argument("--repeats", type=int, default=2, help="runs per level and server, alternated (default 2)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--mixed", type=int, default=1000, help="requests in the mixed run (0: none)")
    p.add_argument("--time-cap", type=float, default=300.0, help="seconds per level and per mixed run")
    p.add_argument("--overload-clients", type=int, default=64, help="clients of the overload run (0: none)")
    p.add_argument("--overload-mb", type=float, default=8.0, help="each overload client's upload (default 8 MB)")
    p.add_argument("--overload-rounds", type=int, default=2, help="bursts of the overload run (default 2)")
    p.add_argument("--stalled", type=int, default=16, help="stalled connections of each kind (0: no stalled run)")
    p.add_argument("--header-timeout-s", type=float, default=None, help="the stalled run's server's (default: its own)")
    p.add_argument("--body-timeout-s", type=float, default=None, help="the stalled run's server's (default: its own)")
    args = p.parse_args()
    paths = find_images([args.folder])[0][: args.images]
    photos = [path.read_bytes() for path in paths]
    with tempfile.TemporaryDirectory() as tmp:
        runs, served = _levels(args, photos, Path(tmp))
        mixed = _mixed(args, paths, photos, Path(tmp) / "mixed.log") if args.mixed else None
        overload = _overload(args, _big_upload(paths[0], args.overload_mb), photos[0], Path(tmp) / "overload.log") \
            if args.overload_clients else None
        stalled = _stalled(args, photos, Path(tmp) / "stalled.log") if args.stalled else None
    rate = {(r["batching"], r["clients"]): r["requests_per_s"] for r in runs}
    print(json.dumps({
        "benchmark": "serve", "model": served,
        "images": len(photos), "requests_per_run": args.requests, "repeats": args.repeats, "max_wait_ms": args.max_wait_ms,
        "runs": runs,
        "speedup": {str(c): round(rate[(True, c)] / rate[(False, c)], 2) for c in args.clients},
        "mixed": mixed, "overload": overload, "stalled": stalled, "cpu": cpu_name(), "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
