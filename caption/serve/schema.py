"""The API's published shapes (OpenAPI at ``/openapi.json``) besides the caption record, and
``GET /v1/model``'s answer.

The caption answers are the record types of :mod:`caption.guidance.record` (the one shape
``caption predict --json`` prints), returned by the routes as their response models, so the
published shape and the served one are the same classes. The caption routes read their bodies
themselves (multipart or raw bytes, under a size limit), so their request bodies and query
options are described here by hand.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel

DESCRIPTION = ("Show, Attend and Tell captions over HTTP: each answer carries the caption's words and the "
               "attention map behind each word, as `caption predict --json` prints them.")
OPTION_DOCS = (  # (name, type, what it does) of each option of the caption routes
    ("beam", "integer", "beam size, 1 (greedy) to the server's max_beam (default: the model's decode.beam_size)"),
    ("alternatives", "boolean", "the beam's runners-up (default: when beam > 1)"),
    ("attention", "boolean", "the per-word attention maps (default true)"),
    ("guide", "boolean", "guidance by the encoder's ImageNet classifier, where the model has it (default true)"),
)


class ErrorBody(BaseModel):
    error: str
    status: int
    request_id: str


class Health(BaseModel):
    status: str  # "ok" or "unavailable"
    queue: int  # images waiting for the model
    reason: Optional[str] = None  # why not ok


class ModelInfo(BaseModel):
    name: str
    checkpoints: list[str]
    version: str
    torch: str
    vocab_size: int
    grid: list[int]
    image_size: int
    encoder: str
    attention: str
    precision: str
    device: str
    threads: int
    guide: bool
    guide_off: Optional[str]
    defaults: dict[str, Any]
    limits: dict[str, Any]
    config: dict[str, Any]


def version() -> str:
    """The installed caption package's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("caption")
    except PackageNotFoundError:
        return "unknown"


def model_info(model, service) -> ModelInfo:
    """``GET /v1/model``: what is served, with what defaults and limits."""
    import torch

    from caption.config import to_dict

    s = service.settings
    return ModelInfo(**{
        "name": model.name, "checkpoints": list(s.checkpoints) or [p.name for p in model.paths], "version": version(),
        "torch": torch.__version__, "vocab_size": len(model.vocab), "grid": list(model.grid),
        "image_size": model.image_size, "encoder": model.config.model.encoder,
        "attention": model.config.model.attention, "precision": model.precision.name, "device": str(model.device),
        "threads": model.runtime.threads, "guide": model.guide is not None,
        "guide_off": None if model.guide is not None else model.guide_off,
        "defaults": {"beam": service.default_beam, "alternatives": None, "attention": True,
                     "guide": model.guide is not None},
        "limits": {"max_beam": service.max_beam, "max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms,
                   "max_upload_mb": s.max_upload_mb, "max_images": s.max_images, "max_queue": s.max_queue,
                   "max_pixels": service.max_pixels, "max_connections": s.max_connections,
                   "upload_memory_mb": s.upload_memory_mb, "header_timeout_s": s.header_timeout_s,
                   "body_timeout_s": s.body_timeout_s, "deadline_s": s.deadline_s},
        "config": to_dict(model.config),
    })


def upload_body(several: bool) -> dict:
    """The OpenAPI request body and query options of a caption route."""
    image = {"type": "string", "format": "binary"}
    files = {"images": {"type": "array", "items": image}} if several else {"image": image}
    options = {name: {"type": kind, "description": what} for name, kind, what in OPTION_DOCS}
    form = {"type": "object", "properties": {**files, **options}, "required": list(files)}
    content = {"multipart/form-data": {"schema": form}}
    if not several:
        content.update({"image/*": {"schema": image}, "application/octet-stream": {"schema": image}})
    params = [{"name": name, "in": "query", "required": False, "description": what, "schema": {"type": kind}}
              for name, kind, what in OPTION_DOCS]
    return {"requestBody": {"required": True, "content": content}, "parameters": params}


def responses() -> dict:
    """The documented refusals of a caption route (its answer is its response model)."""
    error = {"model": ErrorBody}
    return {400: {**error, "description": "a bad option, an empty body, a malformed form"},
            408: {**error, "description": "the body stalled longer than --body-timeout-s"},
            413: {**error, "description": "a body over --max-upload-mb (refused from its Content-Length, before "
                                          "it is read), an image over the pixel limit"},
            415: {**error, "description": "not an image content type"},
            422: {**error, "description": "not an image, or a truncated one"},
            500: {**error, "description": "the model failed; the request id is in the server's log"},
            503: {**error, "description": "busy (the queue is full, or too many connections), or stopping; "
                                          "retry after Retry-After"},
            504: {**error, "description": "no answer within --deadline-s"}}
