"""legrad.io.outdir (issue 26 item 2): nothing follows a symbolic link planted inside an output folder: not the
lock, not a write into a sub-folder, not a read of a file the run reads back; a link under an output's own name
is replaced, its target never written."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from legrad.io.outdir import (
    LOCK_NAME,
    FolderLock,
    LinkInFolderError,
    OutputFolderError,
    is_file_in_folder,
    open_in_folder,
    write_in_folder,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink") or os.name != "posix", reason="POSIX symlinks")


@pytest.fixture
def victim(tmp_path):
    """A file outside the output folder that a planted link points at."""
    path = tmp_path / "victim.txt"
    path.write_text("SECRET first line\nsecond line\n")
    return path


def _out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_a_link_planted_as_the_lock_is_refused_and_its_target_untouched(tmp_path, victim):
    out = _out(tmp_path)
    (out / LOCK_NAME).symlink_to(victim)
    with pytest.raises(OutputFolderError, match="symbolic link.*remove it"):
        FolderLock(out).acquire()
    assert victim.read_text() == "SECRET first line\nsecond line\n"
    # A dangling link too (O_CREAT would otherwise create its target).
    (out / LOCK_NAME).unlink()
    (out / LOCK_NAME).symlink_to(tmp_path / "created-by-the-lock")
    with pytest.raises(OutputFolderError, match="symbolic link"):
        FolderLock(out).acquire()
    assert not (tmp_path / "created-by-the-lock").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_planted_as_the_lock_is_refused_without_blocking(tmp_path):
    out = _out(tmp_path)
    os.mkfifo(out / LOCK_NAME)
    outcome = []

    def take():
        try:
            FolderLock(out).acquire()
        except OutputFolderError as exc:
            outcome.append(str(exc))

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and outcome and "not a regular file" in outcome[0]


def test_the_lock_still_works(tmp_path):
    out = _out(tmp_path)
    with FolderLock(out):
        assert stat.S_ISREG(os.lstat(out / LOCK_NAME).st_mode)
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_a_sub_folder_link_never_takes_a_write_outside(tmp_path):
    out = _out(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "sub").symlink_to(outside)
    with pytest.raises(LinkInFolderError, match="'.*sub' is a symbolic link"):
        with write_in_folder(out, "sub/deeper/x.png") as fh:
            fh.write(b"data")
    with pytest.raises(LinkInFolderError):
        with write_in_folder(out, "sub/x.png") as fh:
            fh.write(b"data")
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["sub"]  # no temp file left either


def test_a_link_under_the_files_own_name_is_replaced_not_written_through(tmp_path, victim):
    out = _out(tmp_path)
    (out / "a").mkdir()
    (out / "a" / "x.png").symlink_to(victim)
    with write_in_folder(out, "a/x.png") as fh:
        fh.write(b"new")
    assert victim.read_text() == "SECRET first line\nsecond line\n"
    assert not (out / "a" / "x.png").is_symlink() and (out / "a" / "x.png").read_bytes() == b"new"


def test_writes_create_sub_folders_atomically_with_plain_permissions(tmp_path):
    out = _out(tmp_path)
    with write_in_folder(out, "a/b/c.bin") as fh:
        fh.write(b"123")
    assert (out / "a" / "b" / "c.bin").read_bytes() == b"123"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "a" / "b" / "c.bin").stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with write_in_folder(out, "a/b/c.bin") as fh:
            fh.write(b"half")
            raise RuntimeError("interrupted")
    assert (out / "a" / "b" / "c.bin").read_bytes() == b"123"
    assert sorted(p.name for p in (out / "a" / "b").iterdir()) == ["c.bin"]


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x.png", "/tmp/x.png", "", "a/\0"])
def test_paths_that_leave_the_folder_are_refused(tmp_path, rel):
    out = _out(tmp_path)
    with pytest.raises(LinkInFolderError, match="not a path inside"):
        with write_in_folder(out, rel) as fh:
            fh.write(b"x")
    assert not is_file_in_folder(out, rel)
    assert sorted(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []


def test_the_folder_itself_may_be_a_link(tmp_path):
    real = _out(tmp_path)
    (tmp_path / "alias").symlink_to(real)
    with write_in_folder(tmp_path / "alias", "s/x.txt") as fh:
        fh.write(b"ok")
    assert (real / "s" / "x.txt").read_bytes() == b"ok"
    with open_in_folder(tmp_path / "alias", "s/x.txt") as fh:
        assert fh.read() == b"ok"


def test_reads_never_follow_a_link_nor_quote_its_target(tmp_path, victim):
    out = _out(tmp_path)
    (out / "scores.csv").symlink_to(victim)
    with pytest.raises(LinkInFolderError) as info:
        open_in_folder(out, "scores.csv")
    assert "symbolic link" in str(info.value) and "SECRET" not in str(info.value)
    assert not is_file_in_folder(out, "scores.csv")
    # Through a sub-folder link as well.
    (out / "sub").symlink_to(victim.parent)
    with pytest.raises(LinkInFolderError):
        open_in_folder(out, f"sub/{victim.name}")
    assert not is_file_in_folder(out, f"sub/{victim.name}")
    with pytest.raises(FileNotFoundError):
        open_in_folder(out, "missing.csv")
    (out / "real.csv").write_text("x")
    assert is_file_in_folder(out, "real.csv")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_reads_refuse_a_fifo_without_blocking(tmp_path):
    out = _out(tmp_path)
    os.mkfifo(out / "scores.csv")
    with pytest.raises(OSError, match="not a regular file"):
        open_in_folder(out, "scores.csv")
    assert not is_file_in_folder(out, "scores.csv")
