"""`legrad explain`, `legrad bench`, playground.py and class targets against hostile inputs (issue 19): a
34,000,000x1 PNG beside a good image, unexpected exceptions, colliding names across runs, SIGTERM, a folder
in use, an --out that is a file or read-only, meaningless thresholds, targets that overflow int64."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.degenerate_png import write_gray_png
from helpers.frontend_utils import REPO, bundled_scenes, signal_after_first_output
from PIL import Image

from legrad.cli import main
from legrad.io.outdir import LOCK_NAME, FolderLock

PROC = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (read-only, even for root)")


def _scores(out: Path) -> list[dict]:
    with open(out / "scores.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two different scenes named so that their slugs collide: ``cat photo.png`` and ``cat-photo.png``."""
    root = tmp_path_factory.mktemp("imgs")
    scenes = bundled_scenes()
    shutil.copy(scenes[0][0], root / "cat photo.png")
    shutil.copy(scenes[1][0], root / "cat-photo.png")
    return root


def _overlays(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))


def _check_rows_match_overlays(out: Path) -> list[dict]:
    rows = _scores(out)
    assert sorted(r["overlay"] for r in rows) == _overlays(out)  # one row per overlay, none without one
    return rows


# ---------------------------------------------------------------------------------------------- item 4
def test_degenerate_png_beside_a_good_image(tmp_path, images, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(images / "cat-photo.png", src / "good.png")
    write_gray_png(src / "wide.png", 34_000_000, 1)
    out = tmp_path / "out"
    code = main(["explain", str(src), "-p", "a red circle", "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 1
    assert "wide.png" in captured.err and "Traceback" not in captured.err
    assert "1 of 2 images explained, 1 failed" in captured.out
    rows = _check_rows_match_overlays(out)
    assert [r["image"] for r in rows] == [str(src / "good.png")]
    with Image.open(out / rows[0]["overlay"]) as im:
        assert im.size == Image.open(src / "good.png").size


def test_any_exception_of_one_image_costs_only_that_image(tmp_path, images, monkeypatch, capsys):
    import legrad.io.images as images_module

    original = images_module.load_image

    def load_image(source, *args, **kwargs):
        if "cat photo" in str(source):
            raise ZeroDivisionError("an error nobody expected")
        return original(source, *args, **kwargs)

    monkeypatch.setattr(images_module, "load_image", load_image)
    out = tmp_path / "out"
    code = main(["explain", str(images / "cat photo.png"), str(images / "cat-photo.png"), "-p", "a red circle",
                 "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 1 and "an error nobody expected" in captured.err
    assert [r["image"] for r in _check_rows_match_overlays(out)] == [str(images / "cat-photo.png")]

    # Ctrl-C is not an image's error: it stops the run, keeping the rows of what was written.
    def interrupted(source, *args, **kwargs):
        if "cat photo" in str(source):
            raise KeyboardInterrupt
        return original(source, *args, **kwargs)

    monkeypatch.setattr(images_module, "load_image", interrupted)
    out2 = tmp_path / "out2"
    code = main(["explain", str(images / "cat-photo.png"), str(images / "cat photo.png"), "-p", "a red circle",
                 "--out", str(out2), "-q", "--batch-size", "1"])
    assert code == 130
    assert [r["image"] for r in _check_rows_match_overlays(out2)] == [str(images / "cat-photo.png")]


# ---------------------------------------------------------------------------------------------- item 6
def test_names_are_stable_and_distinct(images, monkeypatch):
    from legrad.cli.explain import discover, prompt_name

    assert prompt_name("a red circle") == f"a-red-circle-{_h('a red circle')}"
    assert prompt_name("a red/circle") == f"a-red-circle-{_h('a red/circle')}"
    assert prompt_name("???") == f"prompt-{_h('???')}"
    a, b = str(images / "cat photo.png"), str(images / "cat-photo.png")
    forward, _ = discover([a, b])
    backward, _ = discover([b, a])
    assert [i.key for i in forward] == [f"cat-photo-{_h(os.path.realpath(a))}", f"cat-photo-{_h(os.path.realpath(b))}"]
    assert {i.source: i.key for i in forward} == {i.source: i.key for i in backward}  # order does not matter
    # The same file by another path is the same image: same name, explained once.
    monkeypatch.chdir(images)
    again, _ = discover(["cat-photo.png", b])
    assert [i.key for i in again] == [forward[1].key]


def test_colliding_names_then_a_subset_lose_nothing(tmp_path, images):
    out = tmp_path / "out"
    a, b = str(images / "cat photo.png"), str(images / "cat-photo.png")
    assert main(["explain", a, b, "-p", "a red/circle", "-p", "a red circle", "--out", str(out), "-q"]) == 0
    first = _check_rows_match_overlays(out)
    assert len(first) == 4 and len({(r["image"], r["prompt"]) for r in first}) == 4
    before = {name: (out / name).read_bytes() for name in _overlays(out)}
    assert len(set(before.values())) == 4  # four different pictures: nothing overwrote another

    assert main(["explain", b, "-p", "a red circle", "--out", str(out), "-q"]) == 0
    second = _check_rows_match_overlays(out)
    assert len(second) == 4
    assert {(r["image"], r["prompt"]): r["overlay"] for r in second} == {
        (r["image"], r["prompt"]): r["overlay"] for r in first}
    after = {name: (out / name).read_bytes() for name in _overlays(out)}
    redrawn = second[-1]["overlay"]
    # The three overlays this run did not redraw are untouched (the same bytes); the redrawn one is the
    # same picture from a batch of one instead of two: float results may differ across batch shapes
    # (and CPUs), so its pixels are compared with a tolerance of a few 8-bit levels, far below how much
    # it differs from any other overlay.
    assert {n: v for n, v in after.items() if n != redrawn} == {n: v for n, v in before.items() if n != redrawn}
    pixels = {n: np.asarray(Image.open(out / n).convert("RGB"), dtype=np.int16) for n in after}
    new_px = pixels[redrawn]
    old_px = np.asarray(Image.open(io.BytesIO(before[redrawn])).convert("RGB"), dtype=np.int16)
    assert np.abs(new_px - old_px).max() <= 3
    assert min(np.abs(new_px - px).mean() for n, px in pixels.items() if n != redrawn) > 5 * np.abs(new_px - old_px).mean() + 1
    # The redrawn pair's row is the last one; the others are kept as they were.
    assert (second[-1]["image"], second[-1]["prompt"]) == (b, "a red circle")
    assert [r for r in second[:-1]] == [r for r in first if (r["image"], r["prompt"]) != (b, "a red circle")]


def test_scores_of_the_previous_version_are_merged(tmp_path, images):
    out = tmp_path / "out"
    out.mkdir()
    b = str(images / "cat-photo.png")
    Image.new("RGB", (4, 4)).save(out / "cat-photo__a-red-circle.png")  # the previous version's name
    with open(out / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "prompt", "similarity", "probability", "overlay"])
        w.writerow([b, "a red circle", "0.1", "1.0", "cat-photo__a-red-circle.png"])
        w.writerow(["gone.png", "a red circle", "0.2", "1.0", "gone__a-red-circle.png"])  # overlay deleted
    assert main(["explain", b, "-p", "a red circle", "--out", str(out), "-q"]) == 0
    rows = _check_rows_match_overlays(out)
    assert [r["overlay"] for r in rows][0] == "cat-photo__a-red-circle.png"  # its file is still there
    assert "gone.png" not in {r["image"] for r in rows}
    assert len(rows) == 2

    # Files of still older versions had no overlay column: a row is replaced by its (image, prompt) pair.
    out4 = tmp_path / "out4"
    out4.mkdir()
    (out4 / "scores.csv").write_text(f"image,prompt,similarity,probability\n{b},a red circle,0.1,1.0\n"
                                     "other.png,a cat,0.3,1.0\n")
    assert main(["explain", b, "-p", "a red circle", "--out", str(out4), "-q"]) == 0
    rows = _scores(out4)
    assert [(r["image"], r["overlay"] != "") for r in rows] == [("other.png", False), (b, True)]


# ---------------------------------------------------------------------------------------------- item 7
@pytest.mark.subprocess
def test_sigterm_keeps_the_rows_of_the_overlays_written(tmp_path):
    scenes = bundled_scenes()
    src = tmp_path / "many"
    src.mkdir()
    for i in range(40):
        shutil.copy(scenes[i % len(scenes)][0], src / f"img{i:02d}.png")
    out = tmp_path / "out"
    code, err = signal_after_first_output(["explain", str(src), "-p", "a red circle", "--out", str(out),
                                           "--batch-size", "1", "-q"], out, "*.png", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    pngs = _overlays(out)
    assert 0 < len(pngs) < 40
    assert sorted(r["overlay"] for r in _scores(out)) == pngs


# ---------------------------------------------------------------------------------------------- item 9
def test_a_folder_in_use_is_refused(tmp_path, images, monkeypatch, capsys):
    from legrad.frontend.explainer import Explainer

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(Explainer, "load", _no_model)
    with FolderLock(out):
        assert main(["explain", str(images / "cat-photo.png"), "-p", "x", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another legrad run" in err[0] and f"process {os.getpid()}" in err[0]
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]


# ---------------------------------------------------------------------------------------------- item 11
def test_explain_out_that_is_a_file_or_read_only(tmp_path, images, monkeypatch, capsys):
    from legrad.frontend.explainer import Explainer

    monkeypatch.setattr(Explainer, "load", _no_model)
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["explain", str(images / "cat-photo.png"), "-p", "x", "--out", str(target), "-q"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"
    if os.path.isdir("/proc/self"):
        assert main(["explain", str(images / "cat-photo.png"), "-p", "x", "--out", "/proc", "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not writable" in err[0]


@PROC
def test_playground_out_is_checked_before_work(monkeypatch, capsys):
    sys.path.insert(0, str(REPO))
    try:
        import playground
    finally:
        sys.path.remove(str(REPO))
    from legrad.frontend.explainer import Explainer

    monkeypatch.setattr(Explainer, "load", _no_model)
    assert playground.main(["--out", "/etc"]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert playground.main(["--out", "/proc/legrad.png"]) == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "2", "0", "-1", "inf", "1.0000001"])
def test_bench_refuses_meaningless_thresholds(value, capsys):
    assert main(["bench", "--threshold", value]) == 2
    assert "expected a number in (0, 1] or 'mean'" in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [("0.5", 0.5), ("1", 1.0), ("1e-3", 1e-3), ("mean", "mean")])
def test_bench_accepts_meaningful_thresholds(value, expected):
    from legrad.cli import build_parser

    assert build_parser().parse_args(["bench", "--threshold", value]).threshold == expected


@pytest.mark.parametrize("target", [
    2**70, [3, 2**70], np.uint64(2**64 - 1), np.array([2**64 - 1], dtype=np.uint64),
    np.array([[1, 2**64 - 1]], dtype=np.uint64), 2**63, -1,
])
def test_targets_out_of_int64_are_a_clear_error(target):
    from legrad.engine.validation import check_targets

    with pytest.raises(ValueError, match=r"target class -?\d+ is out of range: this model has 10 classes"):
        check_targets(target, 1, 10)


def test_uint64_targets_never_wrap():
    from legrad.engine.validation import check_targets

    try:
        big = torch.tensor([2**64 - 1], dtype=torch.uint64)
    except (AttributeError, RuntimeError, TypeError, OverflowError):  # older PyTorch: no uint64 tensors
        big = None
    if big is not None:
        with pytest.raises(ValueError, match=f"target class {2**64 - 1} is out of range"):
            check_targets(big, 1, 10)
    assert check_targets(np.array([3, 9], dtype=np.uint64), 1, 10).tolist() == [3, 9]
    assert check_targets(np.uint64(4), 1, 10).tolist() == [4]
    assert check_targets([np.int64(2), 5], 1, 10).dtype == torch.long
    with pytest.raises(TypeError):
        check_targets(np.array([1.5]), 1, 10)


def test_a_prompt_given_twice_is_one_overlay_and_one_row(tmp_path, images):
    out = tmp_path / "out"
    b = str(images / "cat-photo.png")
    assert main(["explain", b, "-p", "a cat", "-p", "a  cat ", "-p", "a dog", "--out", str(out), "-q"]) == 0
    rows = _check_rows_match_overlays(out)
    assert [r["prompt"] for r in rows] == ["a cat", "a dog"]


# ---------------------------------------------------------------------------------------------- issue 26 item 2
def test_a_link_planted_as_the_lock_is_refused_before_any_work(tmp_path, images, monkeypatch, capsys):
    from legrad.frontend.explainer import Explainer

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    monkeypatch.setattr(Explainer, "load", _no_model)
    assert main(["explain", str(images / "cat-photo.png"), "-p", "x", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[0] and LOCK_NAME in err[0]
    assert victim.read_text() == "precious\n"


def test_a_planted_sub_folder_link_sends_no_overlay_outside(tmp_path, images, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copy(images / "cat-photo.png", src / "top.png")
    shutil.copy(images / "cat photo.png", src / "sub" / "inner.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(outside)
    assert main(["explain", str(src), "-p", "a red circle", "--out", str(out), "-q", "--save-maps"]) == 1
    captured = capsys.readouterr()
    assert "inner.png" in captured.err and "symbolic link" in captured.err and "Traceback" not in captured.err
    assert list(outside.iterdir()) == []
    rows = _check_rows_match_overlays(out)  # the link is not followed when listing overlays either
    assert [r["image"] for r in rows] == [str(src / "top.png")]


@pytest.mark.parametrize("name", ["scores.csv", "scores.jsonl"])
def test_a_linked_scores_file_is_refused_without_quoting_its_target(tmp_path, images, monkeypatch, capsys, name):
    from legrad.frontend.explainer import Explainer

    secret = tmp_path / "secret.csv"
    secret.write_text("TOPSECRET_TOKEN,hunter2\n1,2\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(secret)
    monkeypatch.setattr(Explainer, "load", _no_model)
    assert main(["explain", str(images / "cat-photo.png"), "-p", "x", "--out", str(out), "-q"]) == 2
    captured = capsys.readouterr()
    assert "symbolic link" in captured.err
    assert "TOPSECRET" not in captured.err + captured.out and "hunter2" not in captured.err + captured.out
    assert secret.read_text() == "TOPSECRET_TOKEN,hunter2\n1,2\n"


@PROC
def test_playground_replaces_a_link_planted_as_its_figure(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    link = tmp_path / "fig.png"
    link.symlink_to(victim)
    assert main(["playground", "--out", str(link)]) == 0
    assert victim.read_text() == "precious\n"
    assert not link.is_symlink() and Image.open(link).format == "PNG"


# ---------------------------------------------------------------------------------------------- issue 26 item 5
@pytest.mark.parametrize("raw", ["=1+2", "+x", "-a cat", "@SUM(A1)", "\tx", "\rx", "'=x", "''-x", "'", "'abc",
                                 "", "plain", "a=b", "-0.5"])
def test_spreadsheet_cells_round_trip(raw):
    from legrad.cli.scores import spreadsheet_cell, spreadsheet_value

    cell = spreadsheet_cell(raw)
    assert spreadsheet_value(cell) == raw
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert (cell == raw) == (not raw.lstrip("'").startswith(("=", "+", "-", "@", "\t", "\r")))


def test_scores_numbers_stay_numbers():
    from legrad.cli.scores import spreadsheet_cell

    assert spreadsheet_cell("-0.500000", number=True) == "-0.500000"
    assert spreadsheet_cell("+1e-3", number=True) == "+1e-3"
    assert spreadsheet_cell("-inf", number=True) == "-inf"
    assert spreadsheet_cell("=1+2", number=True) == "'=1+2"  # not a number: text rules


def test_formula_cells_are_neutralised_and_the_sidecar_keeps_raw_values(tmp_path, images, monkeypatch):
    import json

    src = tmp_path / "src"
    src.mkdir()
    names = ["=HYPERLINK(1).png", "@x.png", "+y.png"]
    for name in names:
        shutil.copy(images / "cat-photo.png", src / name)
    monkeypatch.chdir(src)  # relative inputs: the image column starts with the file name
    prompts = ["=1+2", "@SUM(A1)", "-a cat", "+x", "'=quoted", "a dog"]
    out = tmp_path / "out"
    argv = ["explain", *names, "--out", str(out), "-q"]
    assert main([*argv, *(a for p in prompts for a in ("-p", p))]) == 0
    text = (out / "scores.csv").read_text()
    rows = _scores(out)
    assert len(rows) == len(names) * len(prompts)
    for row in rows:
        for col in ("image", "prompt", "overlay"):
            assert not row[col].startswith(("=", "+", "-", "@", "\t", "\r")), row
        float(row["similarity"]), float(row["probability"])  # numbers, no quote in front
    assert {r["image"] for r in rows} == {"'" + n for n in names}
    assert {r["prompt"] for r in rows} == {"'=1+2", "'@SUM(A1)", "'-a cat", "'+x", "''=quoted", "a dog"}
    raw = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [(r["image"], r["prompt"], r["overlay"]) for r in raw] == [
        (spreadsheet_value(r["image"]), spreadsheet_value(r["prompt"]), r["overlay"]) for r in rows]
    assert {r["prompt"] for r in raw} == set(prompts) and {r["image"] for r in raw} == set(names)
    assert all(r["similarity"] == float(c["similarity"]) for r, c in zip(raw, rows))

    # A rerun reads the rows back: they come out exactly as they were, beside the new pair's row.
    assert main([*argv, "-p", "a bird"]) == 0
    again = (out / "scores.csv").read_text()
    assert again.startswith(text) and len(again.splitlines()) == len(text.splitlines()) + len(names)
    raw2 = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert raw2[:len(raw)] == raw


def spreadsheet_value(cell):
    from legrad.cli.scores import spreadsheet_value as value

    return value(cell)
