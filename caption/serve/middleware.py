"""What every request goes through: an id (``X-Request-ID``), its status and latency counted (by
the path of one of the app's routes, or "other"), and any exception turned into a 500 naming that
id, logged once with its traceback (uvicorn never sees it, so it is not logged twice)."""

from __future__ import annotations

import logging
import time
import uuid

CLIENT_GONE = 499  # the status counted for a client that disconnected before its answer (nginx's)


class ClientGone(Exception):
    """The client disconnected before its request was read: nothing to answer."""


def error_response(status: int, message: str, request_id: str):
    """The one-line JSON error: ``{"error", "status", "request_id"}``; a 503 (busy or stopping)
    says ``Retry-After: 1``."""
    from starlette.responses import JSONResponse

    body = {"error": " ".join(str(message).split()), "status": status, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)


class RequestMiddleware:
    """Pure ASGI middleware (inside Starlette's error middleware, outside the routes); ``routes``
    are the app's, read at the first request."""

    def __init__(self, app, metrics, log: logging.Logger, routes):
        self.app, self.metrics, self.log, self.routes = app, metrics, log, routes
        self._paths: frozenset[str] | None = None

    def endpoint(self, scope) -> str:
        """The request's label in the metrics: its route's path, or "other"."""
        if self._paths is None:
            self._paths = frozenset(r.path for r in self.routes)
        route = getattr(scope.get("route"), "path", None)  # set once routing has matched one
        path = route if route is not None else scope["path"]  # a request answered before routing
        return path if path in self._paths else "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        sent = {"status": 500, "started": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                sent.update(status=message["status"], started=True)
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientGone:
            sent["status"] = CLIENT_GONE
        except Exception as err:  # noqa: BLE001 - a bug or a model failure: logged once, answered with the id
            self.log.error("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"),
                           exc_info=err)
            sent["status"] = 500
            if not sent["started"]:
                reply = error_response(500, f"internal error while answering; request id {request_id} is in the "
                                            "server's log", request_id)
                await reply(scope, receive, send_with_id)
        finally:
            self.metrics.observe(self.endpoint(scope), sent["status"], time.perf_counter() - started)
