"""One training per run directory: a directory that holds a run is refused, and locked while training.

A directory holds a run once training has written a checkpoint or a metrics row beside its
``config.yaml``; what ``caption prepare`` writes first (``config.yaml``, ``vocab.json``, the feature
cache) is not a run. Training into a run needs ``resume`` (continue it) or ``overwrite`` (remove
its checkpoints, metrics and TensorBoard logs, then start over), and is refused before anything is
written otherwise. While ``fit`` runs it holds an exclusive lock on ``<run dir>/.lock`` (rank 0
under torchrun), so a second training of the same directory fails at once instead of interleaving
its files with the first one's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from caption.checkpoint import BEST, LAST
from caption.errors import CaptionError, MissingFileError

try:
    import fcntl
except ImportError:  # not POSIX: no lock; the refusal still holds
    fcntl = None

log = logging.getLogger("caption.training.run_dir")

METRICS, TENSORBOARD, LOCK = "metrics.csv", "tb", ".lock"
RUN_FILES = (LAST, BEST, METRICS)  # any of these beside config.yaml: the directory holds a run
DEMO_RUN_DIR = Path("runs") / "shapes"  # where `caption demo` trains unless told otherwise


class RunDirError(CaptionError):
    """A run directory that holds another run, or that another training is using."""


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").is_file() and any((run_dir / name).exists() for name in RUN_FILES)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, *, resume: bool = False, overwrite: bool = False,
                  lock: bool = True) -> Iterator[None]:
    """Refuse ``run_dir`` or hold it for one training (see the module docstring).

    ``lock=False`` (the processes of a torchrun other than rank 0) only checks. With ``overwrite``
    the old run's files go once the lock is held, never while another training uses them.
    """
    _check(run_dir, resume, overwrite)
    if not lock:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock(fd, exclusive=True):
            raise _in_use(run_dir)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if not (resume or overwrite) and holds_run(run_dir):  # another training wrote one since the check
            raise _holds_run(run_dir)
        if overwrite:
            clear_run(run_dir)
        yield
    finally:
        os.close(fd)  # and with it the lock


def clear_run(run_dir: Path) -> None:
    """Remove a run's checkpoints, metrics and TensorBoard logs; its config, vocabulary and cache stay."""
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    shutil.rmtree(run_dir / TENSORBOARD, ignore_errors=True)


def _check(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """The refusals that need no lock; they read the directory and write nothing."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue the run or start it over")
    if resume and not (run_dir / LAST).is_file():
        raise MissingFileError(f"nothing to resume in {run_dir} (no {LAST})")
    if not (resume or overwrite) and holds_run(run_dir):
        raise _in_use(run_dir) if _locked(run_dir) else _holds_run(run_dir)


def _holds_run(run_dir: Path) -> RunDirError:
    return RunDirError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                       f"start it over with --overwrite, or train into another --run-dir")


def _in_use(run_dir: Path) -> RunDirError:
    pid = ""
    with contextlib.suppress(OSError):
        pid = (run_dir / LOCK).read_text().strip()
    holder = f"process {pid}" if pid.isdigit() else "another process"
    return RunDirError(f"{run_dir} is in use by another training ({holder} holds {run_dir / LOCK}); "
                       f"wait for it to end or train into another --run-dir")


def _locked(run_dir: Path) -> bool:
    """Whether a training holds the directory's lock; only looks (creates nothing)."""
    if fcntl is None or not (run_dir / LOCK).is_file():
        return False
    fd = os.open(run_dir / LOCK, os.O_RDONLY)
    try:
        return not _flock(fd, exclusive=False)
    finally:
        os.close(fd)


def _flock(fd: int, exclusive: bool) -> bool:
    """Take the lock without waiting; False when another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # a file system without locks: train unlocked rather than not at all
        log.warning("cannot lock the run directory (%s); training without the lock", err)
    return True
