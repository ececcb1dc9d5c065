"""Atomic file writes: a temp file in the target folder, then a rename.

Every file the project writes (configs, vocabularies, checkpoints, caches, results, overlays)
goes through here, so an interrupted run never leaves a half-written file behind. A write that
fails for want of space becomes a :class:`DiskFullError`: one line naming the file, and saying
that its previous version is intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from caption.errors import CaptionError

PathLike = str | os.PathLike

_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


class DiskFullError(CaptionError, OSError):
    """A write that failed for want of space or quota; the file's previous version is intact."""


def _disk_full(err: BaseException) -> str | None:
    """Why ``err`` (or an exception it was raised from or while handling) is a full disk; None otherwise."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return _DISK_FULL[err.errno]
        err = err.__cause__ or err.__context__
    return None


def _stopped_short(err: BaseException) -> bool:
    """torch.save's error when its writer could not write all it was given (it drops the OSError)."""
    return isinstance(err, RuntimeError) and "unexpected pos" in str(err)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``.

    On a full disk (or quota) this raises :class:`DiskFullError`; every other failure propagates
    as it is. Either way ``path`` keeps its previous contents and no temp file is left.
    """
    path = Path(path)
    try:
        return _write_and_rename(path, write)
    except BaseException as err:
        cause = _disk_full(err)
        if cause is None and _stopped_short(err):
            cause = "the write stopped short (no space left on device?)"
        if cause is None:
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise DiskFullError(f"cannot write {path}: {cause}; {kept}") from err


def _write_and_rename(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: PathLike, data: Any, **dumps: Any) -> Path:
    """Write JSON atomically (``dumps`` go to ``json.dumps``)."""
    return atomic_write_text(path, json.dumps(data, **dumps))
