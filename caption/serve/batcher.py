"""Dynamic batching: concurrent requests' images captioned together, the way TorchServe's
``batch_size``/``max_batch_delay`` and Triton's ``max_queue_delay`` work.

Images wait in an asyncio queue. One collector task takes the first, then whatever arrives within
``max_wait`` seconds, up to ``max_batch`` images, and hands the batch to ONE model thread (the
event loop never runs the model). It waits only while other requests are on their way (being
read or decoded, :meth:`Batcher.arriving`): a lone request is not held up for nothing. There the batch is split by decoding options (beam, runners-up,
guide): each group is one batched encoder pass and one batched search
(:meth:`caption.inference.CaptionModel.captions`). If a group's call raises, each of its
images is captioned alone, so one image that breaks the model fails only its own request.
While the model works, new requests queue up and make the next batch.

No image is left without an answer: when the server stops, the queue is worked through for a
grace period and what is left gets a 503; if the collector dies, its images and the queued ones
get a 503 and :meth:`Batcher.health` (``/healthz``) says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

from PIL import Image

from caption.serve.uploads import RequestError, RequestOptions, Stopping


@dataclass
class Job:
    """One image of one request, waiting for its caption."""

    image: Image.Image  # RGB, upright, shrunk as caption predict reads files
    options: RequestOptions
    request_id: str
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class Captioned:
    """A job's result and the size of the batch it was captioned in."""

    result: object  # caption.decoding.DecodingResult
    batch_size: int


Outcome = Captioned | BaseException
RunBatch = Callable[[Sequence[Job]], list[Outcome]]


def caption_jobs(model, jobs: Sequence[Job], log: logging.Logger) -> list[Outcome]:
    """Caption a batch with ``model`` (a CaptionModel), one batched call per options group; an
    exception in a group's call is retried image by image and stays with the images that raise it."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.options.group, []).append(i)
    for members in groups.values():
        try:
            results = _caption(model, [jobs[i] for i in members])
        except Exception as err:  # noqa: BLE001 - a model failure: find the images that cause it
            log.warning("a batch of %d images failed (%s: %s); captioning them one by one", len(members),
                        type(err).__name__, " ".join(str(err).split())[:200])
            results = None
        if results is None:  # outside the except block: an image's own error is not chained to the batch's
            results = [_caption_or_error(model, jobs[i]) for i in members]
        for i, result in zip(members, results):
            outcomes[i] = result if isinstance(result, BaseException) else Captioned(result, len(jobs))
    return outcomes


def _caption_or_error(model, job: Job):
    """One image alone: its result, or the exception (given to its request, which logs it once)."""
    try:
        return _caption(model, [job])[0]
    except Exception as err:  # noqa: BLE001
        return err


def _caption(model, jobs: Sequence[Job]) -> list:
    """One encoder pass and one search for jobs that share their options."""
    options = jobs[0].options
    configured = model.configured(beam=options.beam, alternatives=options.runners_up, guide=options.guide)
    found = [r for _, r in configured.captions([j.image for j in jobs], batch_size=len(jobs))]
    for r in found:
        if isinstance(r, Exception):
            raise r
    return found


class Batcher:
    """The queue, the collector task and the model thread. ``run`` captions one batch (in the
    model thread) and returns one outcome per job; ``on_batch`` sees each batch's size."""

    def __init__(self, run: RunBatch, max_batch: int, max_wait: float, max_queue: int,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_wait < 0 or max_queue < 1:
            raise ValueError(f"max_batch >= 1, max_wait >= 0 and max_queue >= 1, got {max_batch}, {max_wait}, "
                             f"{max_queue}")
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait, max_queue
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._arriving = 0  # requests being read or decoded (event-loop thread only)
        self._closed = False  # no new images (stopping)
        self._running: list[Job] = []  # the batch in the model thread
        self._since: float | None = None  # when it went there (time.monotonic)

    @contextmanager
    def arriving(self):
        """Around a request's reading and decoding: while any request is, a batch waits for it
        (up to max_wait); when none is, a batch leaves at once."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def depth(self) -> int:
        """Images waiting for the model."""
        return self._queue.qsize() if self._queue is not None else 0

    def health(self, stall_s: float | None = None) -> str | None:
        """None while the model thread takes batches; else why it does not (``/healthz``): not
        started, stopping, its collector ended, or one batch running longer than ``stall_s``."""
        if self._task is None:
            return "the model thread has not started"
        if self._closed:
            return Stopping().message
        if self._task.done():
            return f"the model thread has stopped ({_why(self._task)})"
        if stall_s is not None and self._since is not None and time.monotonic() - self._since > stall_s:
            return (f"the model has been on one batch of {len(self._running)} images for "
                    f"{time.monotonic() - self._since:.0f} s")
        return None

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="caption-model")
        self._task = asyncio.create_task(self._serve(), name="caption-batcher")
        self._task.add_done_callback(self._ended)

    def close(self) -> None:
        """Take no new images (a 503 each); those queued and the batch running carry on."""
        self._closed = True

    async def stop(self, grace: float = 0.0) -> None:
        """Take no new images; work through the queue for up to ``grace`` seconds; then images
        still queued get a 503, and so do those of a batch still in the model thread (which
        finishes it on its own: the process waits for it when it exits)."""
        self._closed = True
        ends = time.monotonic() + grace
        while self._task is not None and not self._task.done() and time.monotonic() < ends and (
                self.depth() or self._running):
            await asyncio.sleep(0.01)
        busy = bool(self._running)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._refuse_queued(Stopping())
        if self._thread is not None:
            self._thread.shutdown(wait=not busy, cancel_futures=True)

    def refusal(self, images: int = 1) -> RequestError | None:
        """Why ``images`` more cannot be queued now (a 503: not started, stopping, the model thread
        ended, or no room), else None. Asked before a request's body is read
        (:mod:`caption.serve.admission`) and again when its images are submitted."""
        if self._queue is None or self._task is None:
            return RequestError(503, "the server is not ready")
        if self._closed:
            return Stopping()
        if self._task.done():
            return RequestError(503, f"the model thread has stopped ({_why(self._task)})")
        if self._queue.qsize() + images > self.max_queue:
            return RequestError(503, f"busy: {self._queue.qsize()} images wait for the model; try again shortly")
        return None

    async def submit(self, jobs: Sequence[Job]) -> list[Captioned]:
        """Queue ``jobs`` (all or none: a 503 when the queue has no room) and wait for their captions."""
        refusal = self.refusal(len(jobs))
        if refusal is not None:
            raise refusal
        for job in jobs:
            self._queue.put_nowait(job)
        outcomes = await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)
        for outcome in outcomes:  # every future's exception is retrieved; the first one is raised
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)

    def _refuse_queued(self, error: RequestError) -> None:
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(error)

    def _ended(self, task: asyncio.Task) -> None:
        """The collector ended (stopped, or died of an error it could not hand to a request):
        the images it held and those queued are answered, not left waiting."""
        error = Stopping() if task.cancelled() else RequestError(503, f"the model thread has stopped ({_why(task)})")
        if not task.cancelled():
            logging.getLogger("caption.serve").error("the model thread has stopped", exc_info=task.exception())
        for job in self._running:
            if not job.future.done():
                job.future.set_exception(Stopping("this image was not captioned before the model thread stopped")
                                         if task.cancelled() else error)
        self._running, self._since = [], None
        self._refuse_queued(error)

    async def _collect(self) -> list[Job]:
        """The next batch: the first job, then what arrives within max_wait while requests are on
        their way, up to max_batch."""
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not self._arriving:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [job for job in batch if not job.future.done()]  # a cancelled request's image is dropped

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            self._running, self._since = batch, time.monotonic()
            try:
                outcomes = await loop.run_in_executor(self._thread, self.run, batch)
            except Exception as err:  # noqa: BLE001 - run() itself failed: every job gets the error
                outcomes = [err] * len(batch)
            self._running, self._since = [], None
            for job, outcome in zip(batch, outcomes):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)


def _why(task: asyncio.Task) -> str:
    """How a finished collector task ended, in a few words."""
    if task.cancelled():
        return "stopped"
    error = task.exception()
    return "ended" if error is None else f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
