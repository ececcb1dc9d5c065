"""``caption serve`` over real HTTP: a uvicorn process on 127.0.0.1 (a free port), started by the
fixture and stopped with Ctrl-C. Answers equal single-image decoding (and caption predict's JSON),
concurrent requests are batched, every bad input gets a one-line 4xx, and the server keeps serving.

The model is the tiny untrained checkpoint (fp32, one thread): arbitrary but valid captions.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
pytest.importorskip("prometheus_client")

from conftest import assert_same, expected  # noqa: E402
from caption.serve.client import Client, encode_multipart  # noqa: E402

pytestmark = pytest.mark.slow  # every test here talks to a server process

@pytest.fixture
def client(server):
    c = Client(server.url, timeout=60)
    yield c
    c.close()


@pytest.mark.parametrize("name", ["noise0.png", "portrait.jpg", "large.jpg"])
def test_an_answer_is_caption_predicts_json(client, model, photos, name):
    data = photos[name].read_bytes()
    kind = "image/png" if name.endswith(".png") else "image/jpeg"
    multipart = client.caption(data, name, content_type=kind)
    raw = client.caption(data, name, multipart=False, content_type=kind)
    assert multipart.status == raw.status == 200, multipart.body
    assert_same(multipart.json(), expected(model, photos[name]))
    assert raw.json() == {**multipart.json(), "image": "upload"}
    assert multipart.headers["content-type"] == "application/json" and len(multipart.headers["x-request-id"]) == 16


def test_options_in_the_query_or_the_form(client, model, photos):
    path = photos["noise1.png"]
    greedy = client.caption(path.read_bytes(), path.name, {"beam": 1}).json()
    assert_same(greedy, expected(model, path, beam=1))
    assert "alternatives" not in greedy
    plain = client.caption(path.read_bytes(), path.name, {"attention": "false", "alternatives": "no"}).json()
    assert "attention" not in plain and "alternatives" not in plain and plain["beam"] == 2
    assert_same(plain, {k: v for k, v in expected(model, path, alternatives=False).items() if k != "attention"})
    body, kind = encode_multipart([("image", path.name, "image/png", path.read_bytes())], {"beam": "1"})
    form = client.request("POST", "/v1/caption", body, {"Content-Type": kind}).json()
    assert form == greedy


def test_several_images_in_one_request_come_back_in_order(client, model, photos):
    names = ["noise2.png", "portrait.jpg", "noise3.png"]
    answer = client.captions([(n, photos[n].read_bytes()) for n in names], {"beam": 2})
    assert answer.status == 200, answer.body
    results = answer.json()["results"]
    assert [r["image"] for r in results] == names
    for name, got in zip(names, results):
        assert_same(got, expected(model, photos[name]))


def _concurrently(server, jobs: list) -> list:
    """Send (bytes, name, options) requests at the same moment, one connection each."""
    start = threading.Barrier(len(jobs))

    def send(job):
        c = Client(server.url, timeout=120)
        c.request("GET", "/healthz")  # connected before the start
        start.wait(30)
        try:
            return c.caption(job[0], job[1], job[2], content_type="image/png")
        finally:
            c.close()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(send, jobs))


def test_concurrent_requests_are_batched_and_equal_single_image_decoding(server, model, photos):
    names = [f"noise{i}.png" for i in range(8)]
    beams = [1, 2] * 4  # two options groups inside one batch
    answers = _concurrently(server, [(photos[n].read_bytes(), n, {"beam": b}) for n, b in zip(names, beams)])
    assert [a.status for a in answers] == [200] * 8
    sizes = [int(a.headers["x-batch-size"]) for a in answers]
    assert max(sizes) > 1, f"no two requests shared a batch: {sizes}"
    for name, beam, answer in zip(names, beams, answers):
        assert_same(answer.json(), expected(model, photos[name], beam=beam))
    metrics = Client(server.url).request("GET", "/metrics").body.decode()
    assert "caption_batch_size_bucket" in metrics


# ----------------------------------------------------------------------------- the other endpoints


def test_model_health_schema_and_metrics(client, server, tiny_checkpoint):
    from prometheus_client.parser import text_string_to_metric_families

    info = client.request("GET", "/v1/model").json()
    assert info["checkpoints"] == [Path(tiny_checkpoint).name] and info["vocab_size"] == 14
    assert info["grid"] == [3, 3] and info["precision"] == "fp32" and info["threads"] == 1
    assert info["version"] and info["config"]["model"]["encoder"] == "small"
    assert info["limits"]["max_batch"] == 8 and info["limits"]["max_upload_mb"] == 1
    assert info["defaults"]["beam"] == 2 and info["guide"] is False and info["guide_off"]
    assert client.request("GET", "/healthz").json() == {"status": "ok", "queue": 0}
    schema = client.request("GET", "/openapi.json").json()
    assert {"/v1/caption", "/v1/captions", "/v1/model", "/healthz", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(body)
    scrape = client.request("GET", "/metrics")
    assert scrape.status == 200 and scrape.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(scrape.body.decode())}
    assert {"caption_requests", "caption_request_seconds", "caption_batch_size", "caption_queue_depth"} <= set(families)
    statuses = {(s.labels["endpoint"], s.labels["status"]) for s in families["caption_requests"].samples}
    assert ("/v1/model", "200") in statuses and ("/healthz", "200") in statuses


# ----------------------------------------------------------------------------- one record shape


def test_every_record_holds_to_the_published_schema(client, tiny_checkpoint, photos, capsys):
    """caption predict --json, /v1/caption (every option) and /v1/captions: each record validates
    strictly (no field the record type lacks, no coerced value) against the CaptionRecord that
    /openapi.json publishes, and is what the record type writes back, field for field."""
    import dataclasses

    from pydantic import TypeAdapter, ValidationError

    from caption.commands.main import main
    from caption.guidance.record import CaptionRecord, CaptionResults, as_json

    names = ["noise0.png", "portrait.jpg"]
    assert main(["predict", *(str(photos[n]) for n in names), "--json", "--checkpoint", str(tiny_checkpoint),
                 "--precision", "fp32", "--threads", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2
    data = photos["noise1.png"].read_bytes()
    served = [client.caption(data, "noise1.png", options, content_type="image/png").body
              for options in ({}, {"beam": 1}, {"attention": "false"}, {"beam": 3, "alternatives": "true"},
                              {"beam": 3, "alternatives": "false", "guide": "false"})]
    several = client.captions([(n, photos[n].read_bytes()) for n in names]).body
    assert as_json(TypeAdapter(CaptionResults).validate_json(several, strict=True)) == json.loads(several)
    record = TypeAdapter(CaptionRecord)
    for raw in printed + served + [json.dumps(r) for r in json.loads(several)["results"]]:
        assert list(as_json(record.validate_json(raw, strict=True)).items()) == list(json.loads(raw).items())
    with pytest.raises(ValidationError):
        record.validate_json(json.dumps({**json.loads(served[0]), "score": 1.0}), strict=True)
    with pytest.raises(ValidationError):
        record.validate_json(json.dumps({**json.loads(served[0]), "beam": "2"}), strict=True)
    published = client.request("GET", "/openapi.json").json()["components"]["schemas"]["CaptionRecord"]
    assert published["additionalProperties"] is False
    assert list(published["properties"]) == [f.name for f in dataclasses.fields(CaptionRecord)]
