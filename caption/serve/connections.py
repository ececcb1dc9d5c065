"""The two bounds that must act before a request exists, a header timeout and a cap on open
connections, kept at the socket and ASGI layers: no class of the server's is subclassed and none
of its attributes is read, so a server upgrade cannot silently drop them.

- :class:`GuardedProtocol` wraps the asyncio protocol the server runs (uvicorn's h11 one, handed
  to ``uvicorn.Config(http=...)`` by :meth:`Connections.protocol`), passing every event on, and
  keeps one timer: every connection must deliver a complete request head within
  ``header_timeout`` seconds of connecting (or of its previous answer), or it is closed.
  uvicorn's own ``timeout_keep_alive`` only closes a connection on which nothing at all arrives;
  a client that sends its request head a byte at a time (slowloris), or connects and sends
  nothing, would hold its connection for ever.
- :class:`ConnectionGuard`, an ASGI middleware, tells :class:`Connections` when a request starts
  and when its answer has ended (the next head's time starts then), finding the request's
  connection by its peer address (ASGI's ``scope["client"]``; the server must not rewrite it from
  proxy headers). ``max_connections`` connections hold a place from their first request until
  they close; a request on a connection without a place, when none is free, is only marked
  (``OVER_CONNECTION_LIMIT`` in its ``scope["state"]``: the number of open connections), and the
  admission layer (:mod:`caption.serve.admission`) answers it with the one-line JSON 503, reads
  the body away and closes, as it does every early answer. (uvicorn's ``limit_concurrency``
  would answer a plain-text 503 and close with the body unread: a client still uploading would
  see "connection reset" instead of the answer.)
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Callable

OVER_CONNECTION_LIMIT = "caption.over_connection_limit"  # scope["state"] key: open connections, when over the cap
Peer = tuple[str, int]  # a connection's remote (host, port)
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a request head (bare LF too, as h11 reads it)


def peer_of(address: object) -> Peer | None:
    """(host, port) of a socket's peer name or of ASGI's ``scope["client"]``; None for anything else."""
    if isinstance(address, (tuple, list)) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


class Connections:
    """The open connections of one server, by peer: their header timers and the cap's places.
    Event-loop thread only."""

    def __init__(self, header_timeout: float, max_connections: int):
        if header_timeout <= 0 or max_connections < 1:
            raise ValueError(f"header_timeout > 0 and max_connections >= 1, got {header_timeout}, "
                             f"{max_connections}")
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.open: dict[Peer, GuardedProtocol] = {}
        self.placed: set[GuardedProtocol] = set()

    def protocol(self, inner: Callable[..., asyncio.Protocol]) -> Callable[..., asyncio.Protocol]:
        """A protocol factory for the server: each connection's ``inner(**kwargs)`` wrapped in a
        :class:`GuardedProtocol`."""
        return functools.partial(GuardedProtocol, self, inner)

    def request_started(self, client: object) -> int | None:
        """A request has reached the app on ``client``'s connection: its head is complete, and its
        connection keeps or takes a place. The number of open connections when no place is free
        for it, else None (also for a client on no connection of these: nothing to bound)."""
        connection = self.open.get(peer_of(client))
        if connection is None:
            return None
        connection.active += 1
        connection.stop_timer()
        if connection in self.placed or len(self.placed) < self.max_connections:
            self.placed.add(connection)
            return None
        return len(self.open)

    def request_ended(self, client: object) -> None:
        """A request's answer has ended: once its connection has none running, the next head's
        time starts."""
        connection = self.open.get(peer_of(client))
        if connection is not None:
            connection.active = max(connection.active - 1, 0)
            if not connection.active:
                connection.await_head()

    def _opened(self, connection: GuardedProtocol) -> None:
        if connection.peer is not None:
            self.open[connection.peer] = connection

    def _closed(self, connection: GuardedProtocol) -> None:
        if connection.peer is not None and self.open.get(connection.peer) is connection:
            del self.open[connection.peer]
        self.placed.discard(connection)


class GuardedProtocol(asyncio.Protocol):
    """One connection: the server's protocol (``inner``) sees every event as if alone; around it,
    the header timer runs while a request head is awaited."""

    def __init__(self, connections: Connections, inner: Callable[..., asyncio.Protocol], **kwargs):
        self.connections, self.inner = connections, inner(**kwargs)
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.active = 0  # requests of this connection in the app
        self._timer: asyncio.TimerHandle | None = None
        self._begun = False  # the awaited head has begun (blank lines before a request line do not count)
        self._tail = b""  # the awaited head's last bytes, where its end may be split across reads

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport, self.peer = transport, peer_of(transport.get_extra_info("peername"))
        self.connections._opened(self)
        self.inner.connection_made(transport)
        self.await_head()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None and self._head_ends(data):
            self.stop_timer()  # the head is complete: the app's body timeout takes over
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timer()
        self.connections._closed(self)
        self.inner.connection_lost(exc)

    def await_head(self) -> None:
        """Start the time within which the next request head must be complete."""
        self.stop_timer()
        if self.transport is None or self.transport.is_closing():
            return
        self._begun, self._tail = False, b""
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.connections.header_timeout, self._timed_out)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_ends(self, data: bytes) -> bool:
        """Whether ``data`` completes the awaited head (its blank line, after a request line)."""
        if not self._begun:
            data = data.lstrip(b"\r\n")
            if not data:
                return False
            self._begun = True
        seen = self._tail + data
        if _HEAD_END.search(seen):
            return True
        self._tail = seen[-2:]
        return False

    def _timed_out(self) -> None:
        """No complete request head in time: close (as nginx's client_header_timeout does)."""
        self._timer = None
        if not self.active and self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class ConnectionGuard:
    """The ASGI middleware that tells :class:`Connections` of each request's start and end, and
    marks a request beyond the cap (``OVER_CONNECTION_LIMIT``) for the admission layer."""

    def __init__(self, app, connections: Connections):
        self.app, self.connections = app, connections

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        open_connections = self.connections.request_started(client)
        if open_connections is not None:
            scope.setdefault("state", {})[OVER_CONNECTION_LIMIT] = open_connections
        try:
            await self.app(scope, receive, send)
        finally:
            self.connections.request_ended(client)
