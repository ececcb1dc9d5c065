"""Admission before work, and every request bounded in time: a raw ASGI middleware between the
request-id layer (:mod:`caption.serve.middleware`) and the routes.

- Refused from the head alone, before a byte of the body is read: a Content-Length over the
  upload limit (413), and, on the caption routes (those of the app's routes tagged
  ``CAPTION_TAG``), whatever the batcher would refuse their images for (a server that is
  stopping, a full queue: :meth:`caption.serve.batcher.Batcher.refusal`) and a connection over
  ``--max-connections`` (marked by :mod:`caption.serve.connections`) (503).
- A body that stalls for ``body_timeout_s`` between two reads is dropped (408, then close).
- A caption request not answered within ``deadline_s`` of its arrival gets a 504.
- Lingering close: an answer given before the body was read to its end goes out at once (with
  ``Connection: close``), then the rest of the body is read and discarded, up to ``linger_mb``
  within ``linger_s`` (at most ``LINGER_IDLE_S`` between two reads), before the answer is ended
  and the connection closed. Clients that send the whole body before they read (urllib,
  requests) then read the 413 or 503 instead of "connection reset by peer", as with nginx's
  lingering close; curl, which waits for "100 Continue", gets the answer and sends nothing.
- At shutdown, a request still unanswered when the grace period ends gets a 503 saying so.

:class:`UploadBudget` bounds the memory of bodies being read: a request reserves its size before
its body is read and waits while the reservations would pass the budget.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from caption.serve.connections import OVER_CONNECTION_LIMIT
from caption.serve.middleware import error_response
from caption.serve.uploads import RequestError, Stopping

CAPTION_TAG = "captions"  # the tag of the routes that caption images: the routes bounded here
LINGER_IDLE_S = 2.0  # while lingering, the longest wait for the next piece of the body


class BodyTimeout(Exception):
    """The client sent nothing of its body for ``seconds``."""

    def __init__(self, seconds: float):
        super().__init__(f"the request body stalled: nothing arrived for {seconds:g} s (--body-timeout-s)")


class _DeadlinePassed(Exception):
    pass


class Exchange:
    """One request's messages through the admission layer: it knows whether the body has been
    read to its end, times out a stalled body, and holds back the end of an answer given before
    the body was read (:meth:`finish` reads the rest away, then ends it)."""

    def __init__(self, scope, receive, send, settings):
        headers = dict(scope.get("headers", ()))
        length = headers.get(b"content-length", b"").strip()
        self.declared = int(length) if length.isdigit() else None  # the body's Content-Length
        self.body_done = not (b"transfer-encoding" in headers or (self.declared or 0) > 0)
        self.started = False
        self.may_linger = True
        self.scope, self._receive, self._send, self.settings = scope, receive, send, settings
        self._lingering = self._held = False

    async def receive(self):
        if self.body_done:
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self.settings.body_timeout_s)
        except asyncio.TimeoutError:
            raise BodyTimeout(self.settings.body_timeout_s) from None
        self._note(message)
        return message

    def _note(self, message) -> None:
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if not self.body_done:  # an early answer: the connection cannot be reused
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                self._lingering = self.may_linger
        elif message["type"] == "http.response.body" and self._lingering and not message.get("more_body", False):
            await self._send({**message, "more_body": True})  # the whole answer goes out now...
            self._held = True  # ...and ends (closing the connection) after the body is read away
            return
        await self._send(message)

    async def answer(self, error: RequestError, request_id: str) -> None:
        """The one-line JSON error."""
        await error_response(error.status, error.message, request_id)(self.scope, self._receive, self.send)

    async def finish(self) -> None:
        """Read and discard what is left of the body (bounded in bytes and time), then end the answer."""
        if not self._held:
            return
        self._held = False
        loop = asyncio.get_running_loop()
        ends, left = loop.time() + self.settings.linger_s, int(self.settings.linger_mb * 2**20)
        while not self.body_done and left > 0:
            wait = min(LINGER_IDLE_S, ends - loop.time())
            if wait <= 0:
                break
            try:
                message = await asyncio.wait_for(self._receive(), wait)
            except asyncio.TimeoutError:
                break
            self._note(message)
            left -= len(message.get("body", b""))
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class Admission:
    """The ASGI middleware: refusals from the head, the body timeout, the deadline, lingering
    close and the answer at the end of the shutdown grace. ``service`` is the app's
    :class:`caption.serve.app.Service` (its settings and batcher); ``routes`` the app's routes,
    read at the first request."""

    def __init__(self, app, service, routes):
        self.app, self.service, self.routes = app, service, routes
        self._caption_paths: frozenset[str] | None = None

    @property
    def caption_paths(self) -> frozenset[str]:
        """The paths of the routes tagged CAPTION_TAG."""
        if self._caption_paths is None:
            self._caption_paths = frozenset(r.path for r in self.routes if CAPTION_TAG in getattr(r, "tags", ()))
        return self._caption_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(scope, receive, send, self.service.settings)
        request_id = scope.get("state", {}).get("request_id", "")
        try:
            refusal = self.refusal(scope, exchange)
            if refusal is not None:
                await exchange.answer(refusal, request_id)
            elif scope["path"] in self.caption_paths:
                await self._within_deadline(self.app(scope, exchange.receive, exchange.send))
            else:
                await self.app(scope, exchange.receive, exchange.send)
        except _DeadlinePassed:
            if not exchange.started:
                await exchange.answer(RequestError(504, f"no answer within the deadline of "
                                                        f"{self.service.settings.deadline_s:g} s (--deadline-s)"),
                                      request_id)
        except BodyTimeout as err:
            exchange.may_linger = False  # the client has stopped sending: nothing to wait for
            if not exchange.started:
                await exchange.answer(RequestError(408, str(err)), request_id)
        except asyncio.CancelledError:  # uvicorn's shutdown grace is over: answer, and end this task
            if not exchange.started:
                exchange.may_linger = False
                await exchange.answer(Stopping("this request was not answered within the shutdown grace of "
                                               f"{self.service.settings.grace_s:g} s"), request_id)
            return
        await exchange.finish()

    async def _within_deadline(self, work) -> None:
        seconds = self.service.settings.deadline_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await asyncio.wait_for(work, seconds)
        except asyncio.TimeoutError:
            if loop.time() - started < seconds:  # a timeout of the request's own, not the deadline
                raise
            raise _DeadlinePassed() from None

    def refusal(self, scope, exchange: Exchange) -> RequestError | None:
        """Why the request is refused from its head alone; None when it is not."""
        settings, batcher = self.service.settings, self.service.batcher
        limit = settings.max_upload_bytes
        if exchange.declared is not None and exchange.declared > limit:
            return RequestError(413, f"the body is {exchange.declared} bytes; the limit is {limit} (--max-upload-mb)")
        if scope["path"] not in self.caption_paths:
            return None
        refusal = batcher.refusal()  # stopping, the model thread ended, or the queue full
        open_connections = scope.get("state", {}).get(OVER_CONNECTION_LIMIT)
        if refusal is None and open_connections:
            refusal = RequestError(503, f"busy: {open_connections} connections are open, over the limit of "
                                        f"{settings.max_connections} (--max-connections); try again shortly")
        return refusal


class UploadBudget:
    """Bytes of request bodies in memory at once. A request reserves its size (its Content-Length,
    or the upload limit when it does not say) before its body is read, and waits, its body unread
    in the kernel's buffers, while the reservations would pass ``total``; one request alone
    always goes. Event-loop thread only."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._waiters: list[asyncio.Future] = []

    @asynccontextmanager
    async def reserve(self, size: int):
        while self.used and self.used + size > self.total:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += size
        try:
            yield
        finally:
            self.used -= size
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
