"""A small client of ``caption serve`` (standard library only) and the server run as a child
process: what scripts, the tests and ``benchmarks/serve.py`` use.

    >>> with ServerProcess(["--checkpoint", "runs/shapes"], log="serve.log") as server:
    ...     answer = Client(server.url).caption(open("photo.jpg", "rb").read(), "photo.jpg")
    ...     answer.status, answer.json()["caption"]
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence
from urllib.parse import urlencode, urlsplit

URL_LINE = re.compile(r"^caption serve: (http://\S+) ", re.M)


class Answer(NamedTuple):
    """A response: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def encode_multipart(files: Sequence[tuple[str, str, str, bytes]],
                     fields: Mapping[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, file name, content type, bytes) files and text fields,
    and its content type."""
    boundary = uuid.uuid4().hex
    out = []
    for name, value in (fields or {}).items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, content_type, data in files:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive connection to the server (one Client per thread)."""

    def __init__(self, url: str, timeout: float = 120.0):
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> Answer:
        """Send one request; a keep-alive connection the server has closed is reopened once."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body or None, headers=dict(headers or {}))
                response = self._conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            if response.getheader("connection", "").lower() == "close":
                self.close()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        raise AssertionError("unreachable")

    def caption(self, image: bytes, name: str = "photo.jpg", options: Mapping[str, object] | None = None, *,
                multipart: bool = True, content_type: str = "image/jpeg") -> Answer:
        """POST /v1/caption: the image as a multipart file (or, ``multipart=False``, as the body)."""
        query = f"?{urlencode(options)}" if options else ""
        if multipart:
            body, kind = encode_multipart([("image", name, content_type, image)])
        else:
            body, kind = image, content_type
        return self.request("POST", f"/v1/caption{query}", body, {"Content-Type": kind})

    def captions(self, images: Sequence[tuple[str, bytes]], options: Mapping[str, object] | None = None) -> Answer:
        """POST /v1/captions: several (name, bytes) images in one multipart body."""
        query = f"?{urlencode(options)}" if options else ""
        body, kind = encode_multipart([("images", name, "application/octet-stream", data) for name, data in images])
        return self.request("POST", f"/v1/captions{query}", body, {"Content-Type": kind})


class ServerProcess:
    """``python -m caption serve --port 0 ARGS`` (or ``command``) as a child process on 127.0.0.1,
    its stderr in ``log``; ready when its URL line is printed and /healthz answers. Stopped with
    SIGINT (as Ctrl-C), killed if it has not stopped in ``stop_timeout`` seconds."""

    def __init__(self, args: Sequence[str] = (), log: str | os.PathLike = "serve.log", *,
                 command: Sequence[str] | None = None, start_timeout: float = 180.0, stop_timeout: float = 30.0):
        self.command = list(command) if command is not None else [sys.executable, "-m", "caption", "serve",
                                                                   "--host", "127.0.0.1", "--port", "0", *args]
        self.log, self.start_timeout, self.stop_timeout = Path(log), start_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.returncode: int | None = None

    def __enter__(self) -> "ServerProcess":
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            self._wait_ready(time.monotonic() + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Until the URL line is in the log and /healthz answers (or a RuntimeError after ``deadline``)."""
        while not self.url:
            found = URL_LINE.search(self.log.read_text(errors="replace"))
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"caption serve did not start: {self.log.read_text(errors='replace')[-2000:]}")
            else:
                time.sleep(0.1)
        client = Client(self.url, timeout=30)
        try:
            while True:
                try:
                    if client.request("GET", "/healthz").status == 200:
                        return
                except ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
        finally:
            client.close()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int | None:
        """Ctrl-C, then wait; the exit status (killed: negative)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = None if self.proc is None else self.proc.returncode
        return self.returncode

    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc")
