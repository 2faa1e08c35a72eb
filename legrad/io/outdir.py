"""Output folders of the command-line runs (``legrad explain``, ``extract``, ``playground``): checked writable
before any work, and held by one run at a time.

:func:`prepare_output_folder` creates the folder and proves it writable (a small temp file written, synced
and removed), so that a read-only or full folder is a one-line error before a model loads, not a
traceback after hours of work. :class:`FolderLock` is an exclusive, non-blocking ``fcntl.flock`` on
``OUT/.legrad.lock``: a second run into the same folder is refused at once, naming the lock file and
the pid of the run holding it. The kernel releases the lock when its process ends, however it ends, so
a killed run never leaves the folder locked; the lock file itself stays (removing it would let two runs
lock two different files).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from types import TracebackType

try:  # POSIX; elsewhere the folder is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderBusyError", "FolderLock", "OutputFolderError", "prepare_output_folder"]

#: Lock file inside an output folder.
LOCK_NAME = ".legrad.lock"
#: Bytes written by the writability probe: a full disk refuses them (an empty file may still be created).
_PROBE_BYTES = 64 * 1024


class OutputFolderError(ValueError):
    """The output folder cannot be used: not a folder, not creatable, not writable, or in use."""


class FolderBusyError(OutputFolderError):
    """Another run holds the output folder's lock."""


def prepare_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Creates ``path`` if needed and checks that files can be written in it.

    Args:
        path: the output folder.
        option: how the user named it, for the messages.

    Returns:
        ``Path(path)``.

    Raises:
        OutputFolderError: if ``path`` exists but is not a folder, or cannot be created or written
            (read-only, no permission, disk full).
    """
    folder = Path(path)
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputFolderError(f"{option} {str(folder)!r} exists and is not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"{option} {str(folder)!r} cannot be created ({exc.strerror or exc}); "
                                "choose another folder") from None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".legrad-write-check.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\0" * _PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputFolderError(f"{option} {str(folder)!r} is not writable ({exc.strerror or exc}); free some "
                                "space, fix its permissions or choose another folder") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return folder


class FolderLock:
    """An exclusive lock on an output folder for one run (a context manager; also ``acquire``/``release``).

    Args:
        folder: the output folder (it must exist).
        option: how the user named it, for the messages.
    """

    def __init__(self, folder: str | os.PathLike, option: str = "--out"):
        self.path = Path(folder) / LOCK_NAME
        self.option = option
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Takes the lock without waiting.

        Returns:
            ``self``.

        Raises:
            FolderBusyError: if another process holds it (the message names the lock file and its pid).
            OutputFolderError: if the lock file cannot be opened.
        """
        if fcntl is None or self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputFolderError(f"cannot open the lock file {str(self.path)!r} ({exc.strerror or exc}); "
                                    f"check that {self.option} is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise FolderBusyError(
                f"{self.option} {str(self.path.parent)!r} is in use by another legrad run ({who} holds the lock "
                f"{str(self.path)!r}); wait for it to finish or choose another {self.option}") from None
        # Who holds it, for the message of a refused run.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Releases the lock (a no-op if it is not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None
