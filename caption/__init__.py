"""Show, Attend and Tell image captioning.

``caption.load(checkpoint)`` returns a model that captions image files (see
:mod:`caption.inference`); ``caption.visualize`` (:mod:`caption.viz.overlay`) draws per-word
attention overlays and ``caption.viewer`` (:mod:`caption.viz.viewer`) writes the HTML viewer.
All are imported on first use, so ``import caption`` (and the ``caption --help`` CLI) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from caption import inference
    from caption.inference import CaptionModel, load
    from caption.viz import overlay as visualize
    from caption.viz import viewer

_LAZY_NAMES = {"load": "caption.inference", "CaptionModel": "caption.inference"}
# the Python API's module names -> where they live
_LAZY_MODULES = {"inference": "caption.inference", "visualize": "caption.viz.overlay", "viewer": "caption.viz.viewer"}

__all__ = ["load", "CaptionModel", "inference", "visualize", "viewer"]


def __getattr__(name: str) -> Any:
    """Import ``load``/``CaptionModel`` and the listed submodules on first access."""
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
