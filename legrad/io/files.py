"""Safe file IO: atomic writes (never a half-written file under its final name) and reads of regular files only."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_writer", "check_regular_file", "open_regular_file", "read_regular_file"]

# The process umask, read once at import (reading it means setting it, which is not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[Any]:
    """Opens a binary temp file next to ``path`` and renames it onto ``path`` only if the block succeeds.

    An interrupted or failing write therefore never leaves a half-written file under ``path``.
    Parent folders are created.

    Args:
        path: the destination file.

    Yields:
        A binary file object to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        # mkstemp makes owner-only files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _stat_regular(path: str | os.PathLike, name: str, error: type[Exception]) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except OSError as exc:
        raise error(f"{name}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{name} is {_kind(st.st_mode)}, not a regular file")
    return st


def check_regular_file(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """``os.stat(path)`` if ``path`` is a regular file (symlinks followed), without opening it.

    Opening a FIFO blocks until a writer appears and a device may stream forever: callers check first.

    Raises:
        ValueError: if ``path`` is missing, unreadable, or a directory, FIFO, device or socket.
    """
    return _stat_regular(path, f"{what} {os.fspath(path)!r}", ValueError)


def open_regular_file(
    path: str | os.PathLike, name: str | None = None, error: type[Exception] = ValueError
) -> BinaryIO:
    """Opens a regular file for binary reading; never blocks on a FIFO or streams a device.

    The path is checked before opening, then opened non-blocking and checked again with ``fstat`` on
    the open descriptor, so a path swapped for a FIFO between the check and the open is refused too.

    Args:
        path: the file.
        name: how messages name it (default: the path); servers pass a neutral name, so that no
            server path appears in an error.
        error: the exception type raised (e.g. :class:`~legrad.io.errors.ImageLoadError`).

    Returns:
        A binary file object (blocking reads), to be closed by the caller.

    Raises:
        error: if ``path`` is missing, unreadable, or a directory, FIFO, device or socket.
    """
    name = name or repr(os.fspath(path))
    _stat_regular(path, name, error)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"{name}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{name} is {_kind(mode)}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular_file(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, read through :func:`open_regular_file` (no FIFO, no device).

    Args:
        path: the file.
        what: how to name it in errors (e.g. ``"the manifest"``).
        max_bytes: refuse larger files (None: no limit).

    Returns:
        The file's content.

    Raises:
        ValueError: if ``path`` is missing, unreadable, not a regular file, or larger than ``max_bytes``.
    """
    name = f"{what} {os.fspath(path)!r}"
    with open_regular_file(path, name) as fh:
        if max_bytes is not None and os.fstat(fh.fileno()).st_size > max_bytes:
            raise ValueError(f"{name} is larger than {max_bytes} bytes")
        try:
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        except OSError as exc:
            raise ValueError(f"{name}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if max_bytes is not None and len(data) > max_bytes:  # grew since the fstat
        raise ValueError(f"{name} is larger than {max_bytes} bytes")
    return data
