"""The one folder loop (legrad.frontend.loop) that `legrad explain DIR`, `explain --answer` and `legrad extract`
share: the same images found in a folder, one image's failure costing only itself, and the loop's reports.
Fast: no model (the explain step is a small function of the images written here)."""

from __future__ import annotations

import os
import sys

import pytest
from PIL import Image

from legrad.cli.explain import discover as explain_discover
from legrad.extract.inputs import discover as extract_discover
from legrad.frontend.loop import describe_failure, explain_isolated, run_folder
from legrad.io.images import find_images


def _png(path, size=(8, 6), colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "imgs"
    for rel in ("b.png", "sub/c.png", "sub-x/d.png", ".hidden/e.png", "sub/.f.png"):
        _png(root / rel)
    Image.new("RGB", (4, 4)).save(root / "a.JPG", "JPEG")  # extensions in any case
    (root / "notes.txt").write_text("not an image")
    (root / "dir.png").mkdir()  # a folder named like an image
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png")  # never opened: regular files only
    return root


def test_find_images_walks_sorted_regular_visible_images(folder):
    assert find_images(folder) == ["a.JPG", "b.png", "sub-x/d.png", "sub/c.png"]


def test_explain_and_extract_see_the_same_images_of_a_folder(folder):
    items, problems = explain_discover([str(folder)])
    tasks = extract_discover(folder, ["a cat"])
    assert problems == []
    assert [i.source for i in items] == [t.path for t in tasks] == [str(folder / r) for r in find_images(folder)]


def test_one_bad_unit_costs_only_itself():
    calls = []

    def explain(units):
        calls.append(list(units))
        if 3 in units:
            raise MemoryError("no room for 3")
        return [u * 10 for u in units]

    out = explain_isolated([1, 2, 3, 4], explain)
    assert out == [(10, None), (20, None), (None, "out of memory (no room for 3)"), (40, None)]
    assert calls == [[1, 2, 3, 4], [1], [2], [3], [4]]  # the batch, then each alone
    assert explain_isolated([5, 6], explain) == [(50, None), (60, None)]  # no failure: one call

    def interrupted(units):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not an image's error: it stops the run
        explain_isolated([1, 2], interrupted)
    assert describe_failure(ValueError("bad\n  size")) == "bad size"


def test_run_folder_reads_explains_writes_and_reports_each_failure(capsys):
    items = ["ok1", "unreadable", "explodes", "ok2", "unwritable"]
    flushed, written = [], {}

    def load(item):
        if item == "unreadable":
            raise ZeroDivisionError("cannot read")
        return item.upper()

    def explain(images):
        if "EXPLODES" in images:
            raise OverflowError("too big")
        return [len(im) for im in images]

    def write(item, image, result):
        if item == "unwritable":
            raise OSError("disk full")
        written[item] = (image, result)

    done = run_folder(items, load=load, explain=explain, write=write, prefix="prog", batch_size=2, progress=False,
                      after_batch=lambda: flushed.append(len(written)))
    assert (done.ok, done.failed) == (2, 3)
    assert written == {"ok1": ("OK1", 3), "ok2": ("OK2", 3)}
    assert flushed == [1, 2, 2, 2]  # after each of the 3 batches, and once more at the end
    err = capsys.readouterr().err.splitlines()
    assert err == ["prog: skipped unreadable: cannot read", "prog: failed explodes: too big",
                   "prog: failed to write outputs for unwritable: disk full"]


def test_run_folder_flushes_when_interrupted():
    flushed = []

    def load(item):
        if item == 2:
            raise KeyboardInterrupt
        return item

    with pytest.raises(KeyboardInterrupt):
        run_folder([1, 2, 3], load=load, explain=lambda ims: ims, write=lambda *a: None, prefix="p",
                   progress=False, after_batch=lambda: flushed.append(1))
    assert flushed == [1, 1]  # after the first batch, and in the finally of the interrupted second


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX FIFOs")
def test_explain_cli_names_the_fifo_and_skips_nothing_else(folder):
    items, problems = explain_discover([str(folder / "pipe.png"), str(folder / "b.png")])
    assert [i.source for i in items] == [str(folder / "b.png")]
    assert problems == [f"{folder / 'pipe.png'}: not a regular file"]
