"""What a request to ``caption serve`` carries: its images (multipart or a raw body) and its options.

Pure functions over bytes and strings, so that every bad input becomes a :class:`RequestError`
(an HTTP status and a one-line message) before any image is decoded or queued. Multipart bodies
are parsed in memory by python-multipart: nothing a request sends is written to disk, and no
file name it gives is ever opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple

OPTION_NAMES = ("beam", "alternatives", "attention", "guide")
RAW_TYPES = ("application/octet-stream",)  # besides image/*
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message`` for the client."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = " ".join(str(message).split())
        super().__init__(self.message)


class Stopping(RequestError):
    """The server is stopping: the one answer (a 503, its words here alone) to every request and
    image it will no longer caption, whichever layer finds it out."""

    def __init__(self, detail: str = ""):
        super().__init__(503, f"the server is stopping: {detail}" if detail else "the server is stopping")


class Upload(NamedTuple):
    """One image as sent: the name the client gave it (only echoed back), its type and bytes."""

    name: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class RequestOptions:
    """A request's decoding and output options."""

    beam: int
    alternatives: bool | None = None  # the beam's runners-up; None: when beam > 1 (as `caption predict --json`)
    attention: bool = True  # the per-word attention maps in the answer
    guide: bool = True  # the classifier's guidance (where the model has it)

    @property
    def runners_up(self) -> bool:
        return self.beam > 1 if self.alternatives is None else self.alternatives

    @property
    def group(self) -> tuple[int, bool, bool]:
        """What must be equal for images to share one batched search."""
        return self.beam, self.runners_up, self.guide


def _flag(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise RequestError(400, f"{name} must be true or false, got {text[:40]!r}")


def parse_options(values: Mapping[str, str], default_beam: int, max_beam: int) -> RequestOptions:
    """Options from query and form values; an unknown name or a bad value is a 400."""
    unknown = sorted(set(values) - set(OPTION_NAMES))
    if unknown:
        raise RequestError(400, f"unknown option {unknown[0][:40]!r} (options: {', '.join(OPTION_NAMES)})")
    beam = default_beam
    if "beam" in values:
        text = values["beam"].strip()
        if not (text.isdigit() and len(text) <= 6 and 1 <= int(text) <= max_beam):
            raise RequestError(400, f"beam must be a whole number from 1 to {max_beam}, got {values['beam'][:40]!r}")
        beam = int(text)
    flags = {name: _flag(name, values[name]) for name in OPTION_NAMES[1:] if name in values}
    return RequestOptions(beam=beam, **flags)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_image_type(content_type: str) -> bool:
    """An image/* type or application/octet-stream: what a raw body or a file part may be."""
    media = _media_type(content_type)
    return media.startswith("image/") or media in RAW_TYPES


def uploads(body: bytes, content_type: str, max_files: int) -> tuple[list[Upload], dict[str, str]]:
    """The images of a request body and its form fields: multipart/form-data (file parts, in order,
    and text fields), or a raw image body (image/* or application/octet-stream) named "upload"."""
    media = _media_type(content_type)
    if media == "multipart/form-data":
        return parse_multipart(body, content_type, max_files)
    if not is_image_type(content_type):
        shown = media or "none"
        raise RequestError(415, f"content type {shown[:60]!r} is not an image: send multipart/form-data with an "
                                "image file, or the image's bytes as image/* or application/octet-stream")
    if not body:
        raise RequestError(400, "empty body: no image")
    return [Upload("upload", media, body)], {}


class _Part:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.field = b""
        self.value = b""


def _collect_parts(body: bytes, boundary: bytes, max_parts: int) -> list[_Part]:
    """The parts of a multipart body, headers and data, in order."""
    from python_multipart.multipart import MultipartParseError, MultipartParser

    parts: list[_Part] = []
    ended: list[bool] = []

    def begin() -> None:
        if len(parts) >= max_parts:
            raise RequestError(400, f"too many parts in the form (at most {max_parts})")
        parts.append(_Part())

    def header_end() -> None:
        part = parts[-1]
        part.headers[part.field.decode("latin-1").strip().lower()] = part.value.decode("latin-1").strip()
        part.field = part.value = b""

    callbacks = {
        "on_part_begin": begin,
        "on_part_data": lambda data, start, end: parts[-1].chunks.append(bytes(data[start:end])),
        "on_header_field": lambda data, start, end: setattr(parts[-1], "field", parts[-1].field + data[start:end]),
        "on_header_value": lambda data, start, end: setattr(parts[-1], "value", parts[-1].value + data[start:end]),
        "on_header_end": header_end,
        "on_end": lambda: ended.append(True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as err:
        raise RequestError(400, f"malformed multipart body: {str(err)[:120]}") from None
    if not ended:
        raise RequestError(400, "malformed multipart body: it ends before its closing boundary")
    return parts


def parse_multipart(body: bytes, content_type: str, max_files: int) -> tuple[list[Upload], dict[str, str]]:
    """multipart/form-data -> (file parts as Uploads, text fields); a file part must be an image type."""
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart/form-data without a boundary")
    files: list[Upload] = []
    fields: dict[str, str] = {}
    for part in _collect_parts(body, boundary, max_files + len(OPTION_NAMES)):
        _, disposition = parse_options_header(part.headers.get("content-disposition", ""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        data = b"".join(part.chunks)
        part_type = part.headers.get("content-type", "application/octet-stream" if b"filename" in disposition else "")
        if b"filename" in disposition or is_image_type(part_type):
            filename = disposition.get(b"filename", b"").decode("utf-8", "replace") or name or "upload"
            if not is_image_type(part_type):
                raise RequestError(415, f"{filename[:80]}: content type {_media_type(part_type)[:60]!r} is not an "
                                        "image (image/* or application/octet-stream)")
            if len(files) >= max_files:
                raise RequestError(400, f"too many images in one request (at most {max_files})")
            files.append(Upload(filename, _media_type(part_type), data))
        else:
            fields[name] = data.decode("utf-8", "replace")
    if not files:
        raise RequestError(400, "no image in the form: send the photo as a file field (e.g. curl -F image=@photo.jpg)")
    return files, fields
