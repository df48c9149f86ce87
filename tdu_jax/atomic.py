"""Atomic file writes: readers see the old file or the whole new one, never a partial one."""

import contextlib
import os
import uuid
from collections.abc import Callable
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool) -> None:
    """Calls ``write(f)`` on a fresh temp file beside ``path``, then renames it over ``path``.

    Parent directories are created. The temp file is created with mode 0o666 (less the
    umask), flushed and fsynced before the rename, and removed if anything fails, in which
    case an existing ``path`` is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
