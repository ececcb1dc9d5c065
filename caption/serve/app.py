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
Every route takes the :class:`Service` as a dependency (``Depends``) and returns its declared
response model: a caption answer is the record of :mod:`caption.guidance.record`, the one shape
``caption predict --json`` prints and ``/openapi.json`` publishes. Which routes caption images
(and so are bounded by admission) and which paths the metrics name are read from ``app.routes``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from caption.data.images import ImageError, TooManyPixelsError, loader_threads, read_image
from caption.guidance.record import CaptionRecord, CaptionResults, caption_record
from caption.serve import schema
from caption.serve.admission import CAPTION_TAG, Admission, UploadBudget
from caption.serve.batcher import Batcher, Captioned, Job, caption_jobs
from caption.serve.connections import ConnectionGuard, Connections
from caption.serve.metrics import Metrics
from caption.serve.middleware import ClientGone, RequestMiddleware, error_response
from caption.serve.page import index_page
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
    """What the routes share: the model, the settings, the batcher, the metrics, the decode
    threads, the open connections' bounds, and what ``/v1/model`` and the page show (``about``:
    the page's line about what it runs with)."""

    def __init__(self, model, settings: ServeSettings, about: str = ""):
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
        self.connections = Connections(settings.header_timeout_s, settings.max_connections)
        self.info = schema.model_info(model, self)
        self.page = index_page(model.name, about or model.name, self.default_beam, self.max_beam,
                               model.guide is not None)

    def _run(self, jobs: Sequence[Job]) -> list:
        """One batch, in the model thread; its images counted as captioned or failed."""
        outcomes = caption_jobs(self.model, jobs, self.log)
        failed = sum(isinstance(outcome, BaseException) for outcome in outcomes)
        self.metrics.images.inc(len(outcomes) - failed)
        self.metrics.model_errors.inc(failed)
        return outcomes

    def stop_taking_work(self) -> None:
        """The server is stopping: caption requests get a 503, those in flight carry on."""
        self.batcher.close()

    def health(self) -> str | None:
        """None when requests can be captioned; else why not (stopping, among others). A batch
        running longer than the request deadline counts as a stuck model thread."""
        return self.batcher.health(self.settings.deadline_s)

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

    def record(self, name: str, done: Captioned, options: RequestOptions) -> CaptionRecord:
        """The answer for one image: its caption record, as ``caption predict --json`` prints it."""
        return caption_record(name, done.result, options.beam, attention=options.attention,
                              alternatives=options.runners_up)


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


def get_service(request: Request) -> Service:
    """The app's Service: every route's dependency."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def caption_one(request: Request, response: Response, service: ServiceDep) -> CaptionRecord:
    """Caption one image: a multipart file field, or the image's bytes as the body."""
    names, options, (done,) = await service.answer(request, several=False)
    response.headers["X-Batch-Size"] = str(done.batch_size)
    return service.record(names[0], done, options)


async def caption_several(request: Request, service: ServiceDep) -> CaptionResults:
    """Caption several images (multipart file fields), answered in order; one bad image refuses all."""
    names, options, found = await service.answer(request, several=True)
    return CaptionResults([service.record(n, d, options) for n, d in zip(names, found)])


async def model_info(service: ServiceDep) -> schema.ModelInfo:
    """The model served, its defaults and the server's limits."""
    return service.info


async def healthz(response: Response, service: ServiceDep) -> schema.Health:
    """200 while the model thread takes work; 503 with the reason when it does not (stopping,
    its collector ended, or a batch stuck longer than the request deadline)."""
    reason = service.health()
    if reason is not None:
        response.status_code = 503
    return schema.Health(status="ok" if reason is None else "unavailable", queue=service.batcher.depth(),
                         reason=reason)


async def metrics(service: ServiceDep) -> Response:
    """Prometheus text format: requests by endpoint and status, latency, batch sizes, queue depth."""
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


async def index(service: ServiceDep) -> HTMLResponse:
    return HTMLResponse(service.page)


def _add_routes(app: FastAPI) -> None:
    """The routes: each takes the Service by ``Depends`` and returns its declared response model."""
    captions = {"methods": ["POST"], "tags": [CAPTION_TAG], "responses": schema.responses()}
    app.add_api_route("/v1/caption", caption_one, response_model=CaptionRecord,
                      openapi_extra=schema.upload_body(several=False), **captions)
    app.add_api_route("/v1/captions", caption_several, response_model=CaptionResults,
                      openapi_extra=schema.upload_body(several=True), **captions)
    app.add_api_route("/v1/model", model_info, response_model=schema.ModelInfo)
    app.add_api_route("/healthz", healthz, response_model=schema.Health, response_model_exclude_none=True,
                      responses={503: {"model": schema.Health}})
    app.add_api_route("/metrics", metrics, response_class=Response)
    app.add_api_route("/", index, response_class=HTMLResponse, include_in_schema=False)


def build_app(model, settings: ServeSettings | None = None, about: str = "") -> FastAPI:
    """The FastAPI app serving ``model`` (a :class:`caption.inference.CaptionModel`); ``about`` is the
    line the page shows about what it runs with."""
    service = Service(model, settings or ServeSettings(), about)
    app = FastAPI(title="caption serve", version=schema.version(), lifespan=service.lifespan, docs_url=None,
                  redoc_url=None, description=schema.DESCRIPTION)
    _add_routes(app)
    app.add_middleware(Admission, service=service, routes=app.routes)
    app.add_middleware(ConnectionGuard, connections=service.connections)  # marks what Admission refuses
    app.add_middleware(RequestMiddleware, metrics=service.metrics, log=service.log, routes=app.routes)
    app.state.service = service  # the routes' dependency; caption.serve.server reads its settings and connections
    for kind in (RequestError, HTTPException, RequestValidationError):
        app.add_exception_handler(kind, _refusal)
    return app


async def _refusal(request, exc):
    """A RequestError, a routing error (404, 405) or a validation error as one line of JSON."""
    if isinstance(exc, RequestError):
        status, message = exc.status, exc.message
    elif isinstance(exc, RequestValidationError):
        status, message = 400, "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "invalid request"
    else:
        status, message = exc.status_code, str(exc.detail)
    return error_response(status, message, getattr(request.state, "request_id", ""))
