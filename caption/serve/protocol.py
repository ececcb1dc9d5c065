"""uvicorn's h11 protocol with the two bounds that must act before a request exists: a header
timeout and a cap on open connections.

uvicorn's own ``timeout_keep_alive`` only closes a connection on which nothing at all arrives;
a client that sends its request head a byte at a time (slowloris), or connects and sends nothing,
holds its connection for ever. Here every connection must deliver a complete request head within
``header_timeout`` seconds of connecting (or of its previous answer), or it is closed.

uvicorn's ``limit_concurrency`` answers excess requests with a plain-text 503 and closes at once,
with the request body unread: a client still uploading then sees "connection reset" instead of
the answer. Here ``max_connections`` connections hold a place (``admitted``, shared by all the
connections of one server) from their first request until they close; a request on a connection
without a place, when none is free, is only marked (``OVER_CONNECTION_LIMIT`` in its
``scope["state"]``, set before the app's task first runs), and the app's admission layer
(:mod:`caption.serve.admission`) answers it with the one-line JSON 503, reads the body away and
closes, as it does every early answer.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from caption.serve.admission import OVER_CONNECTION_LIMIT


class GuardedH11Protocol(H11Protocol):
    """H11Protocol + a header timeout + marking connections over the connection cap."""

    def __init__(self, *args, header_timeout: float, max_connections: int, admitted: set, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.max_connections, self.admitted = header_timeout, max_connections, admitted
        self._head_timer: asyncio.TimerHandle | None = None
        self._seen = None  # the last request cycle given a place (or refused one)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._place_new_request()
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
            self._stop_head_timer()  # the head is complete: the body's own timeout takes over

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        self._place_new_request()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head()  # kept alive: the next request's head has the same time to arrive

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self.admitted.discard(self)
        super().connection_lost(exc)

    def _place_new_request(self) -> None:
        """A request that has just begun: its connection keeps or takes a place, or the request is
        marked for a 503 (its task has been created but has not run yet)."""
        if self.cycle is None or self.cycle is self._seen:
            return
        self._seen = self.cycle
        if self in self.admitted or len(self.admitted) < self.max_connections:
            self.admitted.add(self)
        else:
            self.cycle.scope["state"][OVER_CONNECTION_LIMIT] = len(self.connections)

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        """No complete request head in time: close (as nginx's client_header_timeout does)."""
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()
