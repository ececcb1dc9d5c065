"""The one error type a user sees: a message in one line, and the exit status it ends with.

Library code raises a :class:`CaptionError` (or a subclass) for anything the user can fix:
a bad config value, a missing file, a run directory in use. ``caption`` prints it as
``caption <command>: error: <message>`` and exits with ``exit_code``. Every other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations


class CaptionError(Exception):
    """A user-facing error: one line on stderr, then exit status ``exit_code``."""

    exit_code = 2  # a subclass may set its own


class DataError(CaptionError, ValueError):
    """Captions, images or a feature cache that cannot be used as given; the message names the file."""


class MissingFileError(CaptionError, FileNotFoundError):
    """A file or folder the user named (or a command needs) does not exist."""
