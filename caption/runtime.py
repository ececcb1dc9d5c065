"""Where and how the model runs: :func:`resolve_runtime` turns ``--device``, ``--precision`` (auto,
fp32, bf16, fp16) and ``--threads`` into one :class:`Runtime`, once per command or ``caption.load``
call, which is then passed down to everything that computes.

``auto`` picks bf16 where the device computes it in hardware (a CUDA GPU with bf16; a CPU with
AMX-BF16 or AVX512-BF16, read from the CPU's flags at run time) and fp32 everywhere else:
without bf16 units, bf16 is emulated and slower than fp32. :func:`probe` reads the machine;
tests pass their own to fake one. :func:`keep_freed_memory` tunes glibc's malloc for the
large, short-lived activation maps of a CNN (the command line and benchmarks call it).
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from caption.config import PRECISIONS
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


# ----------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Capabilities:
    """What a device computes natively, as far as choosing a precision needs to know.

    ``probe`` fills it in for the machine at hand; tests build their own to fake one.
    """

    device_type: str  # "cpu", "cuda", ...
    name: str  # the CPU model or GPU name, for the one-line report and the benchmarks' JSON
    bf16: bool  # bf16 matrix products run in hardware (AMX, AVX512-BF16, a CUDA GPU with bf16)
    why: str  # what says so (or not): "amx_bf16", "avx512_bf16", "compute capability 8.0", ...


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand large blocks back to the OS.

    By default every block above a few MB (a CNN's activation maps: 77 MB for one EfficientNet-Lite0
    layer at batch 16 in fp32) is mapped fresh and unmapped when freed, so each batch pays a page
    fault per 4 KB touched: on 2 CPU threads that cost as much system time as the convolutions'
    own time (benchmarks/README.md). Process-wide, so the ``caption`` command and the benchmarks call
    it at start; returns False where there is no glibc (nothing changes).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm
            return frozenset(value.split())
    return frozenset()


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``, else what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_capabilities(flags: frozenset[str], name: str) -> Capabilities:
    """bf16 in hardware when the CPU has AMX-BF16 tiles or AVX512-BF16 dot products."""
    native = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]
    return Capabilities("cpu", name, bool(native), native[0] if native else "no amx_bf16/avx512_bf16")


def probe(device: torch.device) -> Capabilities:
    """The capabilities of ``device`` on this machine (read at run time, never assumed)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return Capabilities("cuda", torch.cuda.get_device_name(index), major >= 8,
                            f"compute capability {major}.{minor}")
    if device.type == "cpu":
        return cpu_capabilities(cpu_flags(), cpu_name())
    return Capabilities(device.type, device.type, False, f"{device.type}: bf16 not probed")


@dataclass(frozen=True)
class Precision:
    """The number format a command computes in, resolved for one device.

    ``name`` is fp32, bf16 or fp16; ``requested`` what the config or ``--precision`` asked for
    (``auto`` included). Lower precision means autocast: matrix products and convolutions in
    ``dtype``, the weights, log-softmax, losses and beam scores in fp32.
    """

    name: str
    requested: str
    device: torch.device
    why: str  # e.g. "avx512_bf16" for auto's choice
    device_name: str

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def lowered(self) -> bool:
        """True for bf16/fp16 (autocast on)."""
        return self.name != "fp32"

    def autocast(self) -> torch.autocast:
        """The autocast context of this precision (disabled for fp32)."""
        dtype = self.dtype if self.lowered else None
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.lowered)

    def describe(self) -> str:
        """One line for stderr: ``precision bf16 (auto: avx512_bf16), device cpu (AMD EPYC)``."""
        how = f"{self.requested}: {self.why}" if self.requested == "auto" else "as asked"
        return f"precision {self.name} ({how}), device {self.device} ({self.device_name})"


def resolve_precision(precision: str | None, device: str | torch.device | None = "cpu",
                      probe: Callable[[torch.device], Capabilities] = probe) -> Precision:
    """``auto`` -> bf16 where ``device`` computes it natively, else fp32; fp32/bf16/fp16 as asked.

    ``None`` means ``auto``. fp16 on a CPU, and bf16 on a CUDA GPU without it, are CaptionErrors
    (bf16 on a CPU without bf16 units is allowed: correct, only slow). ``probe`` is replaceable
    so tests can fake any machine.
    """
    requested = "auto" if precision is None else str(precision).lower()
    if requested not in PRECISIONS:
        raise CaptionError(f"precision '{precision}': choose from {', '.join(PRECISIONS)}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    caps = probe(dev)
    if requested == "auto":
        name = "bf16" if caps.bf16 and dev.type in ("cpu", "cuda") else "fp32"
        return Precision(name, requested, dev, caps.why, caps.name)
    if requested == "fp16" and dev.type == "cpu":
        raise CaptionError("precision fp16 does not run on a CPU (PyTorch has no fast fp16 there): "
                           "use bf16, fp32 or auto")
    if requested == "bf16" and dev.type == "cuda" and not caps.bf16:
        raise CaptionError(f"precision bf16: {caps.name} has no bf16 ({caps.why}); use fp16, fp32 or auto")
    return Precision(requested, requested, dev, caps.why, caps.name)


# ----------------------------------------------------------------------------- the runtime


@dataclass(frozen=True)
class Runtime:
    """Where and how one command computes: the device and precision (:class:`Precision` holds
    both) and the number of CPU threads. Resolved once (:func:`resolve_runtime`), passed down."""

    precision: Precision
    threads: int  # torch's intra-op threads

    @property
    def device(self) -> torch.device:
        return self.precision.device

    def autocast(self) -> torch.autocast:
        """The autocast context of the precision (disabled for fp32)."""
        return self.precision.autocast()

    def on(self, device: torch.device) -> "Runtime":
        """The same runtime on another device of the same kind (a torchrun process's own GPU)."""
        return dataclasses.replace(self, precision=dataclasses.replace(self.precision, device=device))

    def describe(self) -> str:
        """One line for stderr: ``precision bf16 (auto: avx512_bf16), device cpu (AMD EPYC), 2 threads``."""
        return f"{self.precision.describe()}, {self.threads} thread{'s' if self.threads != 1 else ''}"


def resolve_runtime(device: str | torch.device | None = None, precision: str | None = None,
                    threads: int | None = None,
                    probe: Callable[[torch.device], Capabilities] = probe) -> Runtime:
    """The runtime of one command: ``device`` (None: CUDA when available, else the CPU), ``precision``
    (None: auto) for that device, and ``threads`` (None: PyTorch's own default, one per core).

    Setting ``threads`` changes ``torch.set_num_threads`` for the process. Raises a CaptionError
    for an unknown or absent device, a precision the device cannot run, or threads below 1.
    """
    if threads is not None:
        if int(threads) < 1:
            raise CaptionError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(int(threads))
    return Runtime(resolve_precision(precision, resolve_device(device), probe), torch.get_num_threads())
