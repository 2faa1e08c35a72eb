"""Output folders of the command-line runs (``legrad explain``, ``extract``, ``playground``): checked writable
before any work, held by one run at a time, and never left through a symbolic link planted inside them.

:func:`prepare_output_folder` creates the folder and proves it writable (a small temp file written, synced
and removed), so that a read-only or full folder is a one-line error before a model loads, not a
traceback after hours of work. :class:`FolderLock` is an exclusive, non-blocking ``fcntl.flock`` on
``OUT/.legrad.lock``: a second run into the same folder is refused at once, naming the lock file and
the pid of the run holding it. The kernel releases the lock when its process ends, however it ends, so
a killed run never leaves the folder locked; the lock file itself stays (removing it would let two runs
lock two different files). A symbolic link planted as the lock file is refused, never followed.

Every file a run reads or writes inside its folder goes through :func:`write_in_folder`,
:func:`open_in_folder` or :func:`is_file_in_folder`: each walks the path one component at a time from a
descriptor of the folder, opening each sub-folder with ``O_NOFOLLOW``, so that a link planted in place of a
sub-folder (or of a file that is read back, such as ``scores.csv``) is refused with
:class:`LinkInFolderError` instead of sending the run's writes, or its error messages, outside the folder.
A written file goes to a temp file in its sub-folder and is renamed onto its name: a link planted under that
name is replaced by the file, its target never touched. The folder itself may be a link (the user named it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO

try:  # POSIX; elsewhere the folder is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderBusyError", "FolderLock", "LinkInFolderError", "OutputFolderError", "is_file_in_folder",
           "open_in_folder", "prepare_output_folder", "write_in_folder"]

#: Lock file inside an output folder.
LOCK_NAME = ".legrad.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# Walking from a folder descriptor needs *at() calls; elsewhere (Windows) each component is lstat-checked.
_DIR_FD = os.open in os.supports_dir_fd and os.mkdir in os.supports_dir_fd and bool(_NOFOLLOW and _DIRECTORY)
#: Bytes written by the writability probe: a full disk refuses them (an empty file may still be created).
_PROBE_BYTES = 64 * 1024


class OutputFolderError(ValueError):
    """The output folder cannot be used: not a folder, not creatable, not writable, or in use."""


class FolderBusyError(OutputFolderError):
    """Another run holds the output folder's lock."""


class LinkInFolderError(OSError):
    """A path inside an output folder is, or passes through, a symbolic link (or it leaves the folder).

    An ``OSError``, so that writers that skip one unwritable file (an image's overlay) skip this one too.
    """


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
        # No link followed: a link planted as the lock file would have its target truncated and overwritten.
        flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if os.path.islink(self.path):
                raise OutputFolderError(
                    f"the lock file {str(self.path)!r} is a symbolic link; legrad never follows links inside "
                    f"{self.option}: remove it (or choose another {self.option})") from None
            raise OutputFolderError(f"cannot open the lock file {str(self.path)!r} ({exc.strerror or exc}); "
                                    f"check that {self.option} is writable") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise OutputFolderError(f"the lock file {str(self.path)!r} is not a regular file; remove it (or choose "
                                    f"another {self.option})")
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


# ---------------------------------------------------------------------------------------------- files inside
def _parts(rel: str | os.PathLike) -> tuple[list[str], str]:
    """The sub-folders and the file name of a path relative to a folder ('..', absolute paths refused)."""
    text = os.fspath(rel)
    pure = PurePosixPath(text.replace(os.sep, "/") if os.sep != "/" else text)
    if not pure.parts or pure.is_absolute() or ".." in pure.parts or "\0" in text:
        raise LinkInFolderError(errno.EINVAL, f"{text!r} is not a path inside the output folder")
    return list(pure.parts[:-1]), pure.parts[-1]


def _link_error(path: Path) -> LinkInFolderError:
    return LinkInFolderError(errno.ELOOP, f"{str(path)!r} is a symbolic link; legrad never follows links inside an "
                                          "output folder: remove the link, or choose another output folder")


def _refusal(dir_fd: int, name: str, path: Path, exc: OSError) -> OSError:
    """``exc`` (an open of ``name`` failed), or the clearer :class:`LinkInFolderError` if ``name`` is a link."""
    try:
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            return _link_error(path)
    except OSError:
        pass
    return exc


def _open_dirs(folder: Path, dirs: list[str], create: bool) -> int:
    """A descriptor of ``folder/dirs...``, each sub-folder opened without following links (created if asked)."""
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | _DIRECTORY | _CLOEXEC)  # the folder itself may be a link: the user's
    try:
        path = folder
        for name in dirs:
            path = path / name
            flags = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
            try:
                try:
                    sub = os.open(name, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o777, dir_fd=fd)
                    sub = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                raise _refusal(fd, name, path, exc) from None
            os.close(fd)
            fd = sub
        return fd
    except BaseException:
        os.close(fd)
        raise


def _checked_path(folder: Path, dirs: list[str], name: str, create: bool) -> Path:
    """Without ``*at()`` calls (Windows): ``folder/dirs/name`` after refusing any link among its components."""
    path = folder
    for i, part in enumerate([*dirs, name]):
        path = path / part
        if os.path.islink(path):
            raise _link_error(path)
        if create and i < len(dirs):
            path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def write_in_folder(folder: str | os.PathLike, rel: str | os.PathLike) -> Iterator[BinaryIO]:
    """Writes ``folder/rel`` atomically without following any link below ``folder``.

    Sub-folders are created. The bytes go to a temp file ``.<name>.<random>.tmp`` beside the destination,
    renamed onto it only if the block succeeds: never a half-written file, and a link planted under the
    destination's name is replaced, its target never written.

    Args:
        folder: the output folder (it may itself be a link).
        rel: the file's path relative to ``folder`` (``/``-separated; no ``..``).

    Yields:
        A binary file object to write to.

    Raises:
        LinkInFolderError: if a sub-folder of ``rel`` is a symbolic link, or ``rel`` leaves ``folder``.
        OSError: if the file cannot be written (nothing is left under its name then).
    """
    folder = Path(folder)
    dirs, name = _parts(rel)
    if not _DIR_FD:  # pragma: no cover - Windows
        from .files import atomic_writer

        with atomic_writer(_checked_path(folder, dirs, name, create=True)) as fh:
            yield fh
        return
    dir_fd = _open_dirs(folder, dirs, create=True)
    try:
        while True:
            tmp = f".{name}.{secrets.token_hex(4)}.tmp"
            try:
                # O_EXCL never follows a link; 0o666 less the umask, as a plain open() would create it.
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666, dir_fd=dir_fd)
                break
            except FileExistsError:
                continue
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)


def open_in_folder(folder: str | os.PathLike, rel: str | os.PathLike) -> BinaryIO:
    """Opens the regular file ``folder/rel`` for binary reading without following any link below ``folder``.

    Never blocks on a FIFO (opened non-blocking, checked with ``fstat``). Messages name the path only:
    nothing of a link's target is read.

    Returns:
        A binary file object (blocking reads), to be closed by the caller.

    Raises:
        FileNotFoundError: if it does not exist.
        LinkInFolderError: if it, or a sub-folder on its way, is a symbolic link.
        OSError: if it is not a regular file or cannot be read.
    """
    folder = Path(folder)
    dirs, name = _parts(rel)
    path = folder.joinpath(*dirs, name)
    flags = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if _DIR_FD:
        dir_fd = _open_dirs(folder, dirs, create=False)
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            raise _refusal(dir_fd, name, path, exc) from None
        finally:
            os.close(dir_fd)
    else:  # pragma: no cover - Windows
        fd = os.open(_checked_path(folder, dirs, name, create=False), flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{str(path)!r} is not a regular file; remove it, or choose another output folder")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def is_file_in_folder(folder: str | os.PathLike, rel: str | os.PathLike) -> bool:
    """Whether ``folder/rel`` is a regular file reached without any link below ``folder`` (never raises)."""
    try:
        folder = Path(folder)
        dirs, name = _parts(rel)
        if not _DIR_FD:  # pragma: no cover - Windows
            return _checked_path(folder, dirs, name, create=False).is_file()
        dir_fd = _open_dirs(folder, dirs, create=False)
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        finally:
            os.close(dir_fd)
    except (OSError, ValueError):
        return False
