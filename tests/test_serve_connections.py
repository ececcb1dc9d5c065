"""``caption serve`` in-process, fast: the connection bounds that act before a request exists (the
header timeout and the connection cap, around uvicorn's own protocol), and the one record shape
that ``caption predict --json``, ``POST /v1/caption`` and ``/openapi.json`` share.

The server is the real app on the real uvicorn, run in a thread on 127.0.0.1 (a free port) with
the tiny untrained checkpoint, and stopped at the end of the module; every socket has a timeout.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
pytest.importorskip("prometheus_client")

from conftest import closed_within, png  # noqa: E402
from pydantic import TypeAdapter, ValidationError  # noqa: E402

from caption.decoding import DecodingResult  # noqa: E402
from caption.guidance.record import (  # noqa: E402
    Alternative,
    CaptionRecord,
    CaptionResults,
    GuideRecord,
    Label,
    Spelled,
    as_json,
    caption_record,
)
from caption.guidance.result import GuidedResult, GuideInfo  # noqa: E402
from caption.serve.app import ServeSettings, build_app  # noqa: E402
from caption.serve.client import Client  # noqa: E402
from caption.serve.server import bind, url_of, uvicorn_server  # noqa: E402

HEADER_TIMEOUT_S = 1.5
KEEP_ALIVE_S = 60.0  # far beyond the header timeout: only the header timer closes a connection in time
SOON_S = 15.0  # what "closed in time" allows on a loaded machine (the keep-alive alone would take 60 s)
PNG = png(40, 30, 0)


@contextmanager
def _running(app):
    """The app on uvicorn in a thread until the block ends: its URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    ends = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < ends, "the server did not start"
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def served(model):
    settings = ServeSettings(max_batch=4, header_timeout_s=HEADER_TIMEOUT_S, keep_alive_s=KEEP_ALIVE_S,
                             max_connections=2, grace_s=1.0)
    with _running(build_app(model, settings)) as url:
        yield url


def _connect(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    return socket.create_connection((host, int(port)), timeout=SOON_S + 5)


def _answer(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    sock.sendall(request)
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    return reply.status, reply.read()


# ----------------------------------------------------------------------------- the connection bounds


def test_a_request_head_not_complete_in_time_closes_its_connection(served):
    silent = _connect(served)  # sends nothing at all
    half = _connect(served)  # half a request head
    half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    blank = _connect(served)  # blank lines are no request head
    blank.sendall(b"\r\n\r\n")
    kept = _connect(served)  # one answer, then half of the next head on the kept-alive connection
    status, _ = _answer(kept, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    kept.sendall(b"GET /healthz HTTP/1.1\r\n")
    for sock in (silent, half, blank, kept):
        assert closed_within(sock, SOON_S) < SOON_S
        sock.close()


def test_a_trickled_head_is_closed_and_a_request_longer_than_the_timeout_is_not(served):
    trickle = _connect(served)
    trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
    t0, closed = time.monotonic(), False
    while time.monotonic() - t0 < SOON_S and not closed:  # a header line a little at a time: data keeps coming
        try:
            trickle.sendall(b"X: y\r\n")
            time.sleep(0.1)
        except OSError:
            closed = True
    assert closed or closed_within(trickle, 1.0) < 1.0
    trickle.close()
    slow = _connect(served)  # a body slower than the header timeout: the head was complete, the body has its own
    head = (b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n" % len(PNG))
    slow.sendall(head + PNG[:20])
    time.sleep(HEADER_TIMEOUT_S + 0.5)
    status, body = _answer(slow, PNG[20:])
    assert status == 200, body
    slow.close()


def test_a_request_beyond_the_connection_cap_reads_a_503_and_a_freed_place_serves(served):
    held = [Client(served, timeout=30) for _ in range(2)]  # the cap: 2 connections, each placed by a request
    for client in held:
        assert client.request("GET", "/healthz").status == 200
    refused = _ask(served, "caption", PNG, "x.png", content_type="image/png")
    assert refused.status == 503 and refused.headers["retry-after"] == "1"
    assert "connections are open, over the limit of 2" in refused.json()["error"]
    for client in held:
        client.close()
    ends = time.monotonic() + SOON_S
    while (answer := _ask(served, "caption", PNG, "x.png", content_type="image/png")).status != 200:
        assert time.monotonic() < ends, answer.body  # until the server has seen the held connections close
        time.sleep(0.1)


# ----------------------------------------------------------------------------- one record shape


def _ask(url: str, method: str, *args, **kwargs):
    """One call of a Client method on a connection of its own, closed after."""
    client = Client(url, timeout=60)
    try:
        return getattr(client, method)(*args, **kwargs)
    finally:
        client.close()


def _schema(published: dict, name: str) -> dict:
    """A published component schema, its ``#/components/...`` references resolvable in place."""
    return {**published["components"]["schemas"][name], "components": published["components"]}


def test_predict_json_the_api_and_openapi_share_one_record(served, tiny_checkpoint, capsys):
    """Every record, printed or served, validates strictly against the record type and against the
    schema /openapi.json publishes, and is what the record type writes back, field for field."""
    jsonschema = pytest.importorskip("jsonschema")
    from caption.commands.main import main

    path = tiny_checkpoint.parent / "record.png"
    path.write_bytes(PNG)
    assert main(["predict", str(path), "--json", "--checkpoint", str(tiny_checkpoint), "--precision", "fp32",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    served_one = [_ask(served, "caption", PNG, "record.png", options, content_type="image/png")
                  for options in ({}, {"beam": 1}, {"attention": "false"}, {"beam": 3, "alternatives": "true"})]
    several = _ask(served, "captions", [("a.png", PNG), ("b.png", png(33, 20, 1))])
    assert all(a.status == 200 for a in [*served_one, several])
    assert json.loads(printed[0]) == {**served_one[0].json(), "image": str(path)}  # the API answers as predict prints
    published = _ask(served, "request", "GET", "/openapi.json").json()
    adapter = TypeAdapter(CaptionRecord)
    for raw in [*printed, *(a.body for a in served_one)]:
        parsed = adapter.validate_json(raw, strict=True)
        assert list(as_json(parsed).items()) == list(json.loads(raw).items())  # the same fields, in the same order
        jsonschema.validate(json.loads(raw), _schema(published, "CaptionRecord"))
    parsed = TypeAdapter(CaptionResults).validate_json(several.body, strict=True)
    assert as_json(parsed) == several.json()
    jsonschema.validate(several.json(), _schema(published, "CaptionResults"))
    for bad in ({"score": 1.0}, {"beam": "2"}):
        with pytest.raises(ValidationError):
            adapter.validate_json(json.dumps({**served_one[0].json(), **bad}), strict=True)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**served_one[0].json(), **bad}, _schema(published, "CaptionRecord"))
    ops = published["paths"]
    assert ops["/v1/caption"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/CaptionRecord"}
    assert ops["/v1/captions"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/CaptionResults"}


def test_a_guided_records_fields_are_published_as_the_record_type_declares(served):
    """The guide, the initial map and the runners-up, which the tiny model does not produce: a record
    built by hand validates against the published schema, which forbids any other field."""
    jsonschema = pytest.importorskip("jsonschema")

    alphas = torch.full((2, 1, 2), 0.5)
    runner_up = DecodingResult([6, 3], ["cat", "<end>"], -2.5, -2.5, alphas, True)
    info = GuideInfo((("tabby", 0.62),), "cat", ("cat", "cats"), True, True, True, 0.25, ((0, "tabby"),))
    result = GuidedResult.of(DecodingResult([5, 3], ["dog", "<end>"], -1.5, -1.5, alphas, True, (runner_up,),
                                            torch.tensor([[0.25, 0.75]])), info)
    record = as_json(caption_record("x.jpg", result, beam=2))
    assert list(record) == ["image", "caption", "tokens", "log_prob", "beam", "grid", "focus", "attention",
                            "init_attention", "guide", "alternatives"]
    assert record["focus"] == [2.0, 2.0]  # each map spread evenly over the grid's two cells
    assert record["tokens"] == ["tabby", "<end>"] and record["guide"]["spelled"] == [{"position": 0, "word": "tabby"}]
    published = _ask(served, "request", "GET", "/openapi.json").json()
    jsonschema.validate(record, _schema(published, "CaptionRecord"))
    for cls in (CaptionRecord, CaptionResults, Alternative, GuideRecord, Label, Spelled):
        schema = published["components"]["schemas"][cls.__name__]
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        assert list(schema["properties"]) == names and schema["required"] == required, cls
        assert schema["additionalProperties"] is False, cls
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record, "guide": {**record["guide"], "score": 1.0}}, _schema(published, "CaptionRecord"))
