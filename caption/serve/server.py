"""Run the app on uvicorn: bind the address first (so ``--port 0`` gets a free port and the printed
URL is the real one), then serve until Ctrl-C or SIGTERM, finishing the requests in flight."""

from __future__ import annotations

import socket
from typing import Callable

from caption.errors import CaptionError

GRACEFUL_SECONDS = 10  # how long requests in flight may take to finish after Ctrl-C


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


def serve(app, host: str, port: int, *, verbose: bool = False,
          ready: Callable[[str], None] | None = None) -> bool:
    """Serve ``app`` on host:port; ``ready(url)`` is called once the address is bound. Returns after
    Ctrl-C (KeyboardInterrupt is swallowed: stopping is the normal end) or SIGTERM: whether the
    server had started."""
    import uvicorn

    sock = bind(host, port)
    config = uvicorn.Config(app, log_config=None, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=GRACEFUL_SECONDS, lifespan="on", server_header=False)
    server = uvicorn.Server(config)
    if ready is not None:
        ready(url_of(sock))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        pass
    finally:
        sock.close()
    return server.started
