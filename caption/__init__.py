"""Show, Attend and Tell image captioning.

``caption.load(checkpoint)`` returns a model that captions image files (see
:mod:`caption.inference`); ``caption.visualize`` draws per-word attention overlays. Both are
imported on first use, so ``import caption`` (and the ``caption --help`` CLI) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from caption import inference, visualize
    from caption.inference import CaptionModel, load

_LAZY_NAMES = {"load": "caption.inference", "CaptionModel": "caption.inference"}
_LAZY_MODULES = frozenset({"inference", "visualize"})

__all__ = ["load", "CaptionModel", "inference", "visualize"]


def __getattr__(name: str) -> Any:
    """Import ``load``/``CaptionModel`` and the listed submodules on first access."""
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
