"""`legrad extract` resuming: limits then resume, damaged and stale outputs, killed runs, changed
sources, failing images, FIFOs and folders, worker counts. Fixtures: ``helpers.extract_utils``."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.extract_utils import (  # noqa: F401  (fixtures are found by pytest by name)
    N_SCENES,
    PROMPTS,
    assert_same_outputs,
    expected_maps,
    explainer_fixture,
    manifest,
    npz_files,
    reference_fixture,
    renormalised,
    scenes_fixture,
    toy_fixture,
)
from PIL import Image

from legrad.extract import MANIFEST_NAME, load_output, run
from legrad.preprocess import LePreprocess


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_limit_then_resume_completes_without_recomputing(tmp_path, toy, scenes, reference):
    out = tmp_path / "out"
    first = run(scenes, out, PROMPTS, model=toy[0], pretrained=toy[1], workers=1, batch_size=4, dtype="float32",
                limit=7, progress=False)
    assert (first.total, first.computed, first.failed) == (7, 6, 1)
    assert len(manifest(out)) == 7
    stamps = {n: (out / n).stat().st_mtime_ns for n in npz_files(out)}
    time.sleep(0.01)
    second = run(scenes, out, PROMPTS, model=toy[0], pretrained=toy[1], workers=1, batch_size=4, dtype="float32",
                 progress=False)
    assert (second.total, second.computed, second.skipped, second.failed) == (N_SCENES + 1, N_SCENES - 6, 6, 1)
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps  # nothing computed twice
    assert_same_outputs(reference, out)


def test_damaged_outputs_are_recomputed(tmp_path, toy, scenes, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    names = npz_files(out)
    data = (out / names[0]).read_bytes()
    (out / names[0]).write_bytes(data[: len(data) // 2])  # truncated
    (out / names[1]).write_bytes(b"PK\x03\x04 garbage")  # not a zip
    stale = dict(np.load(out / names[2], allow_pickle=False))
    stale["prompts"] = np.array(["a red circle", "a blue square", "a black cross"])
    np.savez_compressed(out / names[2], **stale)  # complete but for other prompts
    flipped = dict(np.load(out / names[3], allow_pickle=False))
    flipped["maps"] = flipped["maps"][:, ::2]
    np.savez_compressed(out / names[3], **flipped)  # wrong shape
    (out / names[4]).unlink()
    (out / MANIFEST_NAME).unlink()
    leftover = out / f".{Path(names[5]).name}.abc123.tmp"
    leftover.write_bytes(b"partial")
    damaged = set(names[:5])
    stamps = {n: (out / n).stat().st_mtime_ns for n in names[5:]}
    result = run(scenes, out, PROMPTS, model=toy[0], pretrained=toy[1], workers=1, batch_size=4, dtype="float32",
                 progress=False)
    assert (result.computed, result.skipped, result.failed) == (len(damaged), N_SCENES - len(damaged), 1)
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    assert not leftover.exists()
    assert_same_outputs(reference, out)


def test_changed_settings_recompute(tmp_path, toy, scenes, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {n: (out / n).read_bytes() for n in npz_files(out)}
    # Another configuration's results are not replaced unless asked (legrad-extract.json records it).
    with pytest.raises(ValueError, match=r"another configuration \(dtype: \"float32\" -> \"float16\"\)"):
        run(scenes, out, PROMPTS, model=toy[0], pretrained=toy[1], workers=0, dtype="float16", progress=False)
    assert {n: (out / n).read_bytes() for n in npz_files(out)} == before
    result = run(scenes, out, PROMPTS, model=toy[0], pretrained=toy[1], workers=0, dtype="float16", limit=3,
                 progress=False, overwrite=True)
    assert (result.computed, result.skipped) == (2, 0)  # float32 outputs do not count for a float16 run
    assert load_output(out / manifest(out)[1]["output"])["maps"].dtype == np.float16


@pytest.mark.subprocess
def test_killed_run_resumes(tmp_path, toy, scenes):
    out = tmp_path / "out"
    kwargs = dict(model=toy[0], pretrained=toy[1], size=128, batch_size=1, workers=0, progress=False)
    # A forked child runs the extraction (no interpreter start-up) and is SIGKILLed part-way.
    child = multiprocessing.get_context("fork").Process(target=run, args=(scenes, out, PROMPTS), kwargs=kwargs)
    child.start()
    try:
        deadline = time.monotonic() + 120
        while len(list(out.rglob("*.npz"))) < 3 and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        child.kill()
        child.join(timeout=60)
    done_before = npz_files(out)
    assert 3 <= len(done_before) < N_SCENES, "the run must be killed part-way"
    assert not (out / MANIFEST_NAME).exists()
    stamps = {n: (out / n).stat().st_mtime_ns for n in done_before}
    result = run(scenes, out, PROMPTS, **kwargs)
    assert result.skipped == len(done_before) and result.computed == N_SCENES - len(done_before)
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    records = manifest(out)
    assert len({r["image"] for r in records}) == len(records) == N_SCENES + 1
    assert [r["status"] for r in records].count("ok") == N_SCENES
    for rec in records:
        if rec["status"] == "ok":
            assert load_output(out / rec["output"])["maps"].shape == (3, 16, 16)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_changed_sources_are_explained_again(tmp_path, toy, scenes, explainer):
    data = tmp_path / "data"
    data.mkdir()
    names = ["scene01.png", "scene02.png", "scene04.png"]
    for name in names:
        shutil.copy(scenes / name, data / name)
    # A BMP: same file size whatever the pixels, so only the content hash can tell a new picture.
    Image.open(scenes / "scene05.png").convert("RGB").save(data / "fixed.bmp")
    out = tmp_path / "out"
    kwargs = dict(model=toy[0], pretrained=toy[1], workers=0, dtype="float32", progress=False)
    first = run(data, out, PROMPTS, **kwargs)
    assert (first.computed, first.skipped) == (4, 0)
    src = load_output(out / "scene01.png.npz")["source"]
    assert src["size"] == (data / "scene01.png").stat().st_size and len(src["sha256"]) == 64

    shutil.copy(scenes / "scene07.png", data / "scene01.png")  # same name, other picture
    os.utime(data / "scene02.png")  # touched only: same bytes
    size = (data / "fixed.bmp").stat().st_size
    Image.open(scenes / "scene08.png").convert("RGB").save(data / "fixed.bmp")
    assert (data / "fixed.bmp").stat().st_size == size
    stamps = {n: (out / n).stat().st_mtime_ns for n in ("scene02.png.npz", "scene04.png.npz")}
    second = run(data, out, PROMPTS, **kwargs)
    assert (second.computed, second.skipped, second.failed) == (2, 2, 0)
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    for name, now in (("scene01.png", data / "scene01.png"), ("fixed.bmp", data / "fixed.bmp")):
        maps, sim = expected_maps(explainer, now, PROMPTS)
        stored = load_output(out / f"{name}.npz")
        np.testing.assert_allclose(renormalised(stored["maps"], (64, 64)).numpy(), maps.numpy(), atol=2e-5)
        np.testing.assert_allclose(stored["similarity"], sim.numpy(), atol=1e-5)
    third = run(data, out, PROMPTS, **kwargs)  # the touched file, hashed again, is still done
    assert (third.computed, third.skipped) == (0, 4)


def test_failing_image_costs_only_itself(tmp_path, toy, scenes, explainer, monkeypatch):
    import legrad.extract.compute as compute

    data = tmp_path / "data"
    data.mkdir()
    names = [f"scene{i:02d}.png" for i in (1, 2, 4, 5, 7)]
    for name in names:
        shutil.copy(scenes / name, data / name)
    marked = LePreprocess(explainer.preprocess, (64, 64))(Image.open(data / names[2]).convert("RGB"))
    original = compute.heatmaps

    def heatmaps(wrapper, image, *args, **kwargs):
        if any(torch.equal(x.cpu(), marked) for x in image):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(wrapper, image, *args, **kwargs)

    monkeypatch.setattr(compute, "heatmaps", heatmaps)
    result = run(data, tmp_path / "out", PROMPTS, model=toy[0], pretrained=toy[1], workers=0, batch_size=4,
                 dtype="float32", progress=False)
    assert (result.computed, result.failed) == (4, 1)
    records = manifest(tmp_path / "out")
    assert [r["status"] for r in records] == ["ok", "ok", "error", "ok", "ok"]
    assert "out of memory" in records[2]["error"]
    for rec in records[:2] + records[3:]:
        maps, sim = expected_maps(explainer, data / rec["image"], PROMPTS)
        stored = load_output(tmp_path / "out" / rec["output"])
        np.testing.assert_allclose(renormalised(stored["maps"], (64, 64)).numpy(), maps.numpy(), atol=2e-5)
        np.testing.assert_allclose(stored["similarity"], sim.numpy(), atol=1e-5)


@pytest.fixture
def deadline():
    """Fails a test that blocks (e.g. opening a FIFO) instead of hanging the suite."""
    import signal

    def expire(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_folders_are_refused_never_read(tmp_path, toy, scenes, deadline):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(scenes / "scene01.png", data / "a.png")
    os.mkfifo(data / "pipe.png")
    (data / "folder.png").mkdir()
    lines = [{"image": name} for name in ("pipe.png", "a.png", "folder.png")]
    (data / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = run(data / "list.jsonl", tmp_path / "out", PROMPTS, model=toy[0], pretrained=toy[1], workers=0,
                 progress=False)
    assert (result.computed, result.failed) == (1, 2)
    records = manifest(tmp_path / "out")
    assert [r["status"] for r in records] == ["error", "ok", "error"]
    assert "FIFO" in records[0]["error"] and "directory" in records[2]["error"]
    # The folder walk skips them; a FIFO as the manifest, the prompts file or INPUT is a clear error.
    assert [t["image"] for t in manifest(tmp_path / "out")] == ["pipe.png", "a.png", "folder.png"]
    os.mkfifo(tmp_path / "list.jsonl")
    os.mkfifo(tmp_path / "classes.txt")
    with pytest.raises(ValueError, match="FIFO"):
        run(tmp_path / "list.jsonl", tmp_path / "out2", PROMPTS, workers=0)
    with pytest.raises(ValueError, match="prompts file .* FIFO"):
        run(data, tmp_path / "out2", prompts_file=tmp_path / "classes.txt", workers=0)
    os.mkfifo(tmp_path / "input")
    with pytest.raises(ValueError, match="INPUT .* FIFO"):
        run(tmp_path / "input", tmp_path / "out2", PROMPTS, workers=0)
    assert not (tmp_path / "out2").exists()


def test_default_workers_follow_the_cores(tmp_path, toy, scenes, monkeypatch):
    import warnings

    from legrad.extract import default_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    expected = {1: 0, 2: 0, 3: 2, 4: 3, 5: 4, 64: 4}
    for cores, workers in expected.items():
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_workers() == workers, cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the 64 cores
    assert default_workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert default_workers() == 0
    # On a 2-core machine (as the DataLoader sees it too) the default run warns about nothing.
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(scenes, tmp_path / "out", PROMPTS, model=toy[0], pretrained=toy[1], limit=3, progress=False)
    assert result.computed == 2
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
