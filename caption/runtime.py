"""Where the model runs: the one place that turns a ``--device`` value into a ``torch.device``."""

from __future__ import annotations

import torch

from caption.errors import CaptionError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` means CUDA when available, else the CPU; an unknown or absent device is a CaptionError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise CaptionError(f"--device {device}: not a device name ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CaptionError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CaptionError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CaptionError(f"--device {device}: unsupported device type '{dev.type}' (use cpu or cuda)")
    return dev
