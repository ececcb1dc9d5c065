"""The HTTP app of ``caption serve`` (FastAPI, run by uvicorn): the API, the page, health, metrics.

    POST /v1/caption    one image (multipart field or raw body) -> caption predict --json's object
    POST /v1/captions   several images (multipart) -> {"results": [object, ...]} in order
    GET  /v1/model      the checkpoint(s), config, vocabulary size, version, defaults and limits
    GET  /healthz       {"status": "ok", "queue": n}; a 503 saying why when the model thread cannot take work
    GET  /metrics       Prometheus text format
    GET  /openapi.json  the schema;  GET /  the page (caption.serve.page)

Every refused request gets a 4xx with one line of JSON, ``{"error", "status", "request_id"}``;
an exception anywhere (the model included) gets a 500 naming the request id and is logged once,
with its traceback, under that id. Images are decoded and checked in a small thread pool before
they are queued for the model (:mod:`caption.serve.batcher`), so a bad one never reaches a batch.
What is refused before the body is read, the timeouts, the deadline and lingering close are
:mod:`caption.serve.admission`'s; bodies being read share a memory budget (``upload_memory_mb``).
Answers are built through the published models (:func:`caption.serve.schema.caption_record`).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from caption.data.images import ImageError, TooManyPixelsError, loader_threads, read_image
from caption.decoding.results import result_record
from caption.serve.admission import Admission, UploadBudget
from caption.serve.batcher import Batcher, Captioned, Job, caption_jobs
from caption.serve.metrics import Metrics
from caption.serve.middleware import ClientGone, RequestMiddleware, error_response
from caption.serve.uploads import RequestError, RequestOptions, Upload, parse_options, uploads

LOG = "caption.serve"  # the logger's name


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches and what it accepts (``caption serve``'s options)."""

    max_batch: int = 16  # images per batched model call
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for others
    max_upload_mb: float = 20.0  # the largest request body (413 above it)
    max_beam: int = 10  # the largest beam a request may ask for
    max_images: int = 32  # images in one POST /v1/captions
    max_queue: int = 256  # images waiting for the model before requests get a 503
    max_pixels: int | None = None  # None: Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
    beam: int | None = None  # requests' default beam (None: the run's decode.beam_size)
    checkpoints: tuple[str, ...] = ()  # how /v1/model names the checkpoint(s) (default: the model's file)
    max_connections: int = 128  # open connections; a request on one beyond them gets a 503
    upload_memory_mb: float = 128.0  # request bodies read at once (at least max_upload_mb); others wait
    header_timeout_s: float = 10.0  # a connection's request head must be complete within this
    body_timeout_s: float = 20.0  # the longest pause between two pieces of a body (408 and close)
    deadline_s: float = 60.0  # a caption request's answer, from its arrival (504 after it)
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    linger_s: float = 5.0  # after an early answer, how long the rest of the body is read and discarded
    linger_mb: float = 64.0  # and how much of it
    grace_s: float = 10.0  # at shutdown, how long requests in flight may take to be answered

    def __post_init__(self) -> None:
        positive = (self.max_upload_mb, self.upload_memory_mb, self.header_timeout_s, self.body_timeout_s,
                    self.deadline_s, self.keep_alive_s)
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.max_beam < 1 or self.max_connections < 1 or \
                min(positive) <= 0 or min(self.linger_s, self.linger_mb, self.grace_s) < 0:
            raise ValueError(f"bad serve settings: {self}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def upload_memory_bytes(self) -> int:
        return max(int(self.upload_memory_mb * 1024 * 1024), self.max_upload_bytes)


class Service:
    """What the routes share: the model, the settings, the batcher, the metrics, the decode threads."""

    def __init__(self, model, settings: ServeSettings):
        from PIL import Image

        self.model, self.settings = model, settings
        self.log = logging.getLogger(LOG)
        self.default_beam = model.configured(beam=settings.beam).options.beam_size
        self.max_beam = max(settings.max_beam, self.default_beam)
        self.max_pixels = settings.max_pixels or Image.MAX_IMAGE_PIXELS
        self.batcher = Batcher(self._run, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue)
        self.metrics = Metrics(self.batcher.depth)
        self.batcher.on_batch = self.metrics.batch_size.observe
        self.budget = UploadBudget(settings.upload_memory_bytes)
        self.decoders: ThreadPoolExecutor | None = None
        self.stopping = False

    def _run(self, jobs: Sequence[Job]) -> list:
        """One batch, in the model thread; its images counted as captioned or failed."""
        outcomes = caption_jobs(self.model, jobs, self.log)
        failed = sum(isinstance(outcome, BaseException) for outcome in outcomes)
        self.metrics.images.inc(len(outcomes) - failed)
        self.metrics.model_errors.inc(failed)
        return outcomes

    def stop_taking_work(self) -> None:
        """The server is stopping: caption requests get a 503, those in flight carry on."""
        self.stopping = True
        self.batcher.close()

    def health(self) -> str | None:
        """None when requests can be captioned; else why not. A batch running longer than the
        request deadline counts as a stuck model thread."""
        return "the server is stopping" if self.stopping else self.batcher.health(self.settings.deadline_s)

    @asynccontextmanager
    async def lifespan(self, app):
        """The decode threads and the batcher run while the app does."""
        self.decoders = ThreadPoolExecutor(loader_threads(), thread_name_prefix="caption-decode")
        await self.batcher.start()
        try:
            yield
        finally:  # uvicorn has given requests in flight their grace (caption.serve.server)
            await self.batcher.stop()
            self.decoders.shutdown(wait=True, cancel_futures=True)

    async def read(self, request, max_files: int) -> tuple[list[Upload], RequestOptions]:
        """The request's images and options; the query is checked before the body is read."""
        query = dict(request.query_params)
        parse_options(query, self.default_beam, self.max_beam)  # a bad option fails before the upload is read
        body = await read_body(request, self.settings.max_upload_bytes)
        files, fields = uploads(body, request.headers.get("content-type", ""), max_files)
        return files, parse_options({**query, **fields}, self.default_beam, self.max_beam)

    async def answer(self, request, several: bool) -> tuple[list[str], RequestOptions, list[Captioned]]:
        """Read, decode and check every image (a bad one: 4xx, nothing queued), then caption them in
        batches: the images' names, the options, the captions. The body is read within the upload
        memory budget, and its bytes are let go before the images wait for the model."""
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else self.settings.max_upload_bytes
        async with self.budget.reserve(min(size, self.settings.max_upload_bytes)):
            with self.batcher.arriving():
                files, options = await self.read(request, self.settings.max_images)
                if not several and len(files) != 1:
                    raise RequestError(400, "one image per request here: send several to /v1/captions")
                images = await self.decode(files)
            names = [f.name for f in files]
            del files
        loop = asyncio.get_running_loop()
        jobs = [Job(image, options, request.state.request_id, loop.create_future()) for image in images]
        del images
        return names, options, await self.batcher.submit(jobs)

    async def decode(self, files: Sequence[Upload]) -> list:
        """The uploads as RGB images, read as caption predict reads files, in the decode threads."""
        loop = asyncio.get_running_loop()
        side = self.model.transform.max_side
        decoding = [loop.run_in_executor(self.decoders, read_image, f.data, f.name, side, self.max_pixels)
                    for f in files]
        images = await asyncio.gather(*decoding, return_exceptions=True)
        for image in images:
            if isinstance(image, ImageError):
                raise RequestError(413 if isinstance(image, TooManyPixelsError) else 422, str(image))
            if isinstance(image, BaseException):
                raise image
        return images

    def record(self, name: str, done: Captioned, options: RequestOptions) -> dict:
        """The answer for one image, built through the published CaptionRecord model."""
        from caption.serve.schema import caption_record

        return caption_record(result_record(name, done.result, options.beam, attention=options.attention,
                                            alternatives=options.runners_up))


async def read_body(request, limit: int) -> bytes:
    """The whole body, refused with a 413 as soon as it is larger than ``limit`` bytes (a declared
    Content-Length over it was refused before: :class:`caption.serve.admission.Admission`)."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over the limit of {limit} bytes (--max-upload-mb)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def build_app(model, settings: ServeSettings | None = None, about: str = "") -> FastAPI:
    """The FastAPI app serving ``model`` (a :class:`caption.inference.CaptionModel`); ``about`` is the
    line the page shows about what it runs with."""
    from caption.serve import schema

    service = Service(model, settings or ServeSettings())
    app = FastAPI(title="caption serve", version=schema.version(), lifespan=service.lifespan, docs_url=None,
                  redoc_url=None, description=schema.DESCRIPTION)
    app.add_middleware(Admission, service=service)  # inside the request id layer: its answers carry the id
    app.add_middleware(RequestMiddleware, metrics=service.metrics, log=service.log)
    app.state.service = service  # caption.serve.server reads its settings and tells it when stopping
    for kind in (RequestError, HTTPException, RequestValidationError):
        app.add_exception_handler(kind, _refusal)
    _caption_routes(app, service)
    _other_routes(app, service, about or model.name)
    return app


def _caption_routes(app: FastAPI, service: Service) -> None:
    from caption.serve import schema

    @app.post("/v1/caption", openapi_extra=schema.upload_body(several=False), responses=schema.responses(False))
    async def caption_one(request: Request):
        """Caption one image: a multipart file field, or the image's bytes as the body."""
        names, options, (done,) = await service.answer(request, several=False)
        return JSONResponse(service.record(names[0], done, options), headers={"X-Batch-Size": str(done.batch_size)})

    @app.post("/v1/captions", openapi_extra=schema.upload_body(several=True), responses=schema.responses(True))
    async def caption_several(request: Request):
        """Caption several images (multipart file fields), answered in order; one bad image refuses all."""
        names, options, found = await service.answer(request, several=True)
        return JSONResponse({"results": [service.record(n, d, options) for n, d in zip(names, found)]})


def _other_routes(app: FastAPI, service: Service, about: str) -> None:
    from caption.serve import schema
    from caption.serve.page import index_page

    model = service.model
    info = schema.model_info(model, service)
    page = index_page(model.name, about, service.default_beam, service.max_beam, model.guide is not None)

    @app.get("/v1/model", response_model=schema.ModelInfo)
    async def model_info():
        """The model served, its defaults and the server's limits."""
        return JSONResponse(info)

    @app.get("/healthz", response_model=schema.Health, responses={503: {"model": schema.Health}})
    async def healthz():
        """200 while the model thread takes work; 503 with the reason when it does not (stopping,
        its collector ended, or a batch stuck longer than the request deadline)."""
        reason = service.health()
        body = schema.Health(status="ok" if reason is None else "unavailable", queue=service.batcher.depth(),
                             reason=reason)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if reason is None else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics():
        """Prometheus text format: requests by endpoint and status, latency, batch sizes, queue depth."""
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)


async def _refusal(request, exc):
    """A RequestError, a routing error (404, 405) or a validation error as one line of JSON."""
    if isinstance(exc, RequestError):
        status, message = exc.status, exc.message
    elif isinstance(exc, RequestValidationError):
        status, message = 400, "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "invalid request"
    else:
        status, message = exc.status_code, str(exc.detail)
    headers = {"Retry-After": "1"} if status == 503 else None
    return error_response(status, message, getattr(request.state, "request_id", ""), headers)
