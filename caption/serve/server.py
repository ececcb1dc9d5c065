"""Run the app on uvicorn: bind the address first (so ``--port 0`` gets a free port and the printed
URL is the real one), then serve until Ctrl-C or SIGTERM, finishing the requests in flight.

The connection-level bounds come from the app's :class:`caption.serve.app.ServeSettings`: the
header timeout and the connection cap (:mod:`caption.serve.connections`, around uvicorn's h11
protocol, which is wrapped, not subclassed), the keep-alive timeout, and the shutdown grace.
uvicorn is told not to rewrite a request's client address from proxy headers: the connection
bounds find a request's connection by that address. At Ctrl-C the app is told first (new caption requests get a 503,
``/healthz`` a 503), then uvicorn waits up to ``grace_s`` for the requests in flight, whose
images the model thread goes on captioning; one still unanswered then gets a 503 saying so.
"""

from __future__ import annotations

import socket
from typing import Callable

from caption.errors import CaptionError


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on (host, port), or a CaptionError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as err:
        raise CaptionError(f"cannot listen on {host}:{port}: {err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog from now on, until uvicorn accepts them
    except OSError as err:
        sock.close()
        raise CaptionError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_server(app, verbose: bool = False):
    """A uvicorn.Server for ``app`` (built by :func:`caption.serve.app.build_app`) with its settings'
    bounds, which tells the app it is stopping before uvicorn starts waiting for its requests."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    service = app.state.service
    s = service.settings

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            service.stop_taking_work()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, http=service.connections.protocol(H11Protocol), ws="none", proxy_headers=False,
                            log_config=None, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_keep_alive=s.keep_alive_s, timeout_graceful_shutdown=s.grace_s, lifespan="on",
                            server_header=False)
    return Server(config)


def serve(app, host: str, port: int, *, verbose: bool = False,
          ready: Callable[[str], None] | None = None) -> bool:
    """Serve ``app`` on host:port; ``ready(url)`` is called once the address is bound. Returns after
    Ctrl-C (KeyboardInterrupt is swallowed: stopping is the normal end) or SIGTERM: whether the
    server had started."""
    sock = bind(host, port)
    server = uvicorn_server(app, verbose)
    if ready is not None:
        ready(url_of(sock))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        pass
    finally:
        sock.close()
    return server.started
