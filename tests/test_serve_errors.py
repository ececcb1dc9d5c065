"""``caption serve`` refusing bad input (a one-line JSON 4xx each, and it keeps serving), clients
that disconnect, a model that fails (a 500 with the request id, logged once) or is slow (the event
loop still answers), and Ctrl-C."""

from __future__ import annotations

import http.client
import json
import pickle
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from conftest import assert_same, expected, png, png_claiming  # noqa: E402

from caption.commands.main import main  # noqa: E402
from caption.serve.client import Client, ServerProcess, encode_multipart  # noqa: E402

PNG = png(40, 30, 0)
LIMIT = 1024 * 1024  # the server fixture's --max-upload-mb 1


def _form(*files, **fields):
    body, kind = encode_multipart(list(files), fields)
    return body, {"Content-Type": kind}


BAD = {  # name: (path, body, headers, status, words in the error)
    "empty body": ("/v1/caption", b"", {"Content-Type": "image/png"}, 400, "empty"),
    "empty file": ("/v1/caption", *_form(("image", "e.png", "image/png", b"")), 422, "empty"),
    "truncated png": ("/v1/caption", PNG[: len(PNG) // 2], {"Content-Type": "image/png"}, 422, "truncated"),
    "text as jpeg": ("/v1/caption", b"hello, world", {"Content-Type": "image/jpeg"}, 422, "not an image"),
    "a path as the body": ("/v1/caption", b"/etc/passwd", {"Content-Type": "image/jpeg"}, 422, "not an image"),
    "a pickle": ("/v1/caption", pickle.dumps({"a": 1}), {"Content-Type": "application/octet-stream"}, 422, "not an image"),
    "text/plain": ("/v1/caption", PNG, {"Content-Type": "text/plain"}, 415, "text/plain"),
    "json": ("/v1/caption", b"{}", {"Content-Type": "application/json"}, 415, "application/json"),
    "form-urlencoded": ("/v1/caption", b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "not an image"),
    "no content type": ("/v1/caption", PNG, {}, 415, "none"),
    "text file part": ("/v1/caption", *_form(("image", "a.txt", "text/plain", b"hi")), 415, "a.txt"),
    "form without a file": ("/v1/caption", *_form(beam="2"), 400, "no image"),
    "two files to /v1/caption": ("/v1/caption", *_form(("a", "a.png", "image/png", PNG), ("b", "b.png", "image/png", PNG)),
                                 400, "one image"),
    "no boundary": ("/v1/caption", PNG, {"Content-Type": "multipart/form-data"}, 400, "boundary"),
    "unclosed multipart": ("/v1/caption", b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\n"
                           + PNG, {"Content-Type": "multipart/form-data; boundary=xyz"}, 400, "malformed"),
    "over the size limit": ("/v1/caption", b"\0" * (LIMIT + 1), {"Content-Type": "image/png"}, 413, "limit"),
    "bomb (over Pillow's limit)": ("/v1/caption", png_claiming(10_000, 10_000), {"Content-Type": "image/png"}, 413,
                                   "too many pixels"),
    "bomb (twice Pillow's limit)": ("/v1/caption", png_claiming(30_000, 30_000), {"Content-Type": "image/png"}, 413,
                                    "too many pixels"),
    "beam 0": ("/v1/caption?beam=0", PNG, {"Content-Type": "image/png"}, 400, "beam"),
    "beam 1000": ("/v1/caption?beam=1000", PNG, {"Content-Type": "image/png"}, 400, "beam"),
    "beam 10**40": ("/v1/caption?beam=" + "9" * 40, PNG, {"Content-Type": "image/png"}, 400, "beam"),
    "beam -1": ("/v1/caption?beam=-1", PNG, {"Content-Type": "image/png"}, 400, "beam"),
    "beam 2.5": ("/v1/caption?beam=2.5", PNG, {"Content-Type": "image/png"}, 400, "beam"),
    "beam in the form": ("/v1/caption", *_form(("image", "a.png", "image/png", PNG), beam="lots"), 400, "beam"),
    "guide maybe": ("/v1/caption?guide=maybe", PNG, {"Content-Type": "image/png"}, 400, "guide"),
    "a path option": ("/v1/caption?path=/etc/passwd", PNG, {"Content-Type": "image/png"}, 400, "unknown option"),
    "too many images": ("/v1/captions", *_form(*[("images", f"{i}.png", "image/png", PNG) for i in range(33)]), 400,
                        "too many"),
    "unknown route": ("/v1/nothing", PNG, {"Content-Type": "image/png"}, 404, "not found"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_input_gets_a_one_line_4xx_and_the_server_goes_on(server, case):
    path, body, headers, status, words = BAD[case]
    client = Client(server.url, timeout=60)
    answer = client.request("POST", path, body, headers)
    assert answer.status == status, answer.body
    assert answer.body.count(b"\n") == 0, "one line"
    error = answer.json()
    assert set(error) == {"error", "status", "request_id"} and error["status"] == status
    assert words.lower() in error["error"].lower(), error
    assert error["request_id"] == answer.headers["x-request-id"]
    assert Client(server.url).caption(PNG, "good.png", content_type="image/png").status == 200


@pytest.mark.slow
def test_a_streamed_body_over_the_limit_is_refused_while_it_arrives(server):
    """No Content-Length (chunked): the server counts as it reads, and answers before the end."""
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(LIMIT // 65536 + 8):
                conn.sendall(b"10000\r\n" + b"\0" * 65536 + b"\r\n")
            conn.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed while the body still came
            pass
        reply = http.client.HTTPResponse(conn)
        reply.begin()
        assert reply.status == 413 and "limit" in json.loads(reply.read())["error"]


@pytest.mark.slow
def test_wrong_method_is_a_one_line_405(server):
    answer = Client(server.url).request("GET", "/v1/caption")
    assert answer.status == 405 and answer.json()["status"] == 405


@pytest.mark.slow
def test_a_client_file_name_is_only_echoed(server, model, photos):
    answer = Client(server.url).caption(photos["noise0.png"].read_bytes(), "../../../../etc/passwd",
                                        content_type="image/png")
    assert answer.status == 200 and answer.json()["image"] == "../../../../etc/passwd"


def _metric(server, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = Client(server.url).request("GET", "/metrics").body.decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.slow
def test_a_slow_upload_holds_up_nobody_and_a_disconnect_costs_nothing(server):
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    gone_before = _metric(server, "caption_requests_total", status="499")
    slow = socket.create_connection((host, int(port)), timeout=10)
    slow.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 50000\r\n\r\n"
                 + PNG[:1000])
    assert Client(server.url).caption(PNG, "other.png", content_type="image/png").status == 200
    slow.close()  # mid-upload
    deadline = time.monotonic() + 20
    while _metric(server, "caption_requests_total", status="499") == gone_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "caption_requests_total", status="499") == gone_before + 1
    assert _metric(server, "caption_queue_depth") == 0
    assert Client(server.url).request("GET", "/healthz").status == 200


# ----------------------------------------------------------------------------- a failing or slow model

FAULTY_SERVER = r"""
import sys, time
from caption.inference import load
from caption.serve.app import ServeSettings, build_app
from caption.serve.server import serve

model = load(sys.argv[1], precision="fp32", threads=1)

class Faulty(type(model)):  # its configured copies are Faulty too
    def captions(self, images, *args, **kwargs):  # width 23 breaks the model, width 29 makes it slow
        images = list(images)
        if any(image.width == 23 for image in images):
            raise RuntimeError("injected model failure")
        if any(image.width == 29 for image in images):
            time.sleep(3)
        return super().captions(images, *args, **kwargs)

model.__class__ = Faulty
app = build_app(model, ServeSettings(max_batch=8, max_wait_ms=300))
serve(app, "127.0.0.1", 0, ready=lambda url: print(f"caption serve: {url} (faulty)", file=sys.stderr, flush=True))
"""


@pytest.fixture(scope="module")
def faulty(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("faulty") / "serve.log"
    with ServerProcess(log=log, command=[sys.executable, "-c", FAULTY_SERVER, str(tiny_checkpoint)]) as running:
        yield running


@pytest.mark.slow
def test_a_model_error_is_a_500_with_its_request_id_logged_once(faulty, model, photos):
    start = threading.Barrier(4)
    names = ["noise0.png", "noise1.png", "noise2.png"]
    jobs = [(png(23, 20, 5), "breaks.png")] + [(photos[n].read_bytes(), n) for n in names]

    def send(job):
        c = Client(faulty.url, timeout=60)
        start.wait(30)
        return c.caption(job[0], job[1], content_type="image/png")

    with ThreadPoolExecutor(4) as pool:
        broken, *good = pool.map(send, jobs)
    assert broken.status == 500 and broken.body.count(b"\n") == 0
    rid = broken.json()["request_id"]
    assert rid == broken.headers["x-request-id"] and rid in broken.json()["error"]
    for name, answer in zip(names, good):  # the others in its batch are captioned all the same
        assert answer.status == 200
        assert_same(answer.json(), expected(model, photos[name]))
    log = faulty.log.read_text()
    assert log.count(rid) == 1 and log.count("Traceback") == 1 and "injected model failure" in log
    assert Client(faulty.url).request("GET", "/healthz").status == 200
    assert _metric(faulty, "caption_model_errors_total") == 1  # every counter counts
    assert _metric(faulty, "caption_images_total") >= 3


@pytest.mark.slow
def test_the_event_loop_answers_while_the_model_works(faulty):
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(Client(faulty.url, timeout=60).caption, png(29, 20, 6), "slow.png", None,
                           content_type="image/png")
        time.sleep(0.8)  # the model thread is now asleep in the slow batch
        t0 = time.monotonic()
        health = Client(faulty.url, timeout=2).request("GET", "/healthz")
        assert health.status == 200 and time.monotonic() - t0 < 2
        assert not slow.done()
        assert slow.result().status == 200


# ----------------------------------------------------------------------------- starting and stopping


@pytest.mark.slow
def test_ctrl_c_stops_cleanly(tiny_checkpoint, tmp_path):
    log = tmp_path / "serve.log"
    with ServerProcess(["--checkpoint", str(tiny_checkpoint), "--threads", "1"], log) as running:
        assert Client(running.url).caption(PNG, "a.png", content_type="image/png").status == 200
        assert running.url.startswith("http://127.0.0.1:")
    text = log.read_text()
    assert running.returncode == 0 and "Traceback" not in text
    assert text.splitlines()[-1] == "caption serve: stopped"


def test_a_port_in_use_is_one_error_line(tiny_checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--checkpoint", str(tiny_checkpoint), "--port", str(port)])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"caption serve: error: cannot listen on 127.0.0.1:{port}")


def test_a_beam_over_max_beam_is_refused_before_loading(capsys):
    assert main(["serve", "--beam", "12", "--max-beam", "10"]) == 2
    assert capsys.readouterr().err.strip() == "caption serve: error: --beam 12 is over --max-beam 10"
