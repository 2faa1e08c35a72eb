"""`legrad extract` against hostile conditions (issue 19): a degenerate 34,000,000x1 PNG beside good images,
any exception of one image, SIGTERM, replaced weights, two runs on one folder, read-only and full folders."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.degenerate_png import write_gray_png
from helpers.frontend_utils import REPO, signal_after_first_output, subprocess_env
from PIL import Image

from legrad.cli import main as cli_main
from legrad.extract import MANIFEST_NAME, load_output, run
from legrad.extract.runconfig import RUN_CONFIG_NAME
from legrad.io.outdir import LOCK_NAME, FolderBusyError, FolderLock, OutputFolderError

PROMPTS = ["a red circle", "a blue square"]


def _scenes(folder: Path, n: int) -> list[Path]:
    from legrad.toy import make_scenes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(make_scenes(n, seed=5)):
        paths.append(folder / f"img{i:02d}.png")
        scene.image.save(paths[-1])
    return paths


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def _random_toy_checkpoint(path: Path, seed: int) -> None:
    from legrad.toy.model import ToyConfig, build_model, known_token_ids, make_tokenizer, save_checkpoint

    cfg = ToyConfig()
    torch.manual_seed(seed)
    save_checkpoint(build_model(cfg), cfg, path, known_token_ids(make_tokenizer(cfg)))


KW = dict(model="toy", workers=0, batch_size=4, progress=False)


# ---------------------------------------------------------------------------------------------- item 4
def test_degenerate_png_beside_good_images_costs_only_itself(tmp_path):
    data = tmp_path / "data"
    good = _scenes(data, 2)
    write_gray_png(data / "wide.png", 34_000_000, 1)
    assert (data / "wide.png").stat().st_size < 64_000
    out = tmp_path / "out"
    result = run(data, out, PROMPTS, **KW)
    assert (result.total, result.computed, result.failed) == (3, 2, 1)
    records = {r["image"]: r for r in _manifest(out)}
    assert records["wide.png"]["status"] == "error" and records["wide.png"]["output"] is None
    for p in good:
        rec = records[p.name]
        assert rec["status"] == "ok"
        saved = load_output(out / rec["output"])
        assert saved["maps"].shape[0] == 2 and np.allclose(saved["similarity"], rec["similarity"], atol=1e-5)


def test_any_exception_of_one_image_costs_only_that_image(tmp_path, monkeypatch):
    # An error type the batch loop did not expect (OverflowError), raised for the batch holding image 1.
    from legrad.extract import compute

    data = tmp_path / "data"
    _scenes(data, 3)
    marked = Image.open(data / "img01.png").convert("RGB")
    original = compute.heatmaps

    def heatmaps(wrapper, image, *args, **kwargs):
        if any(torch.equal(im, ref) for im in image for ref in marked_batch):
            raise OverflowError("signed integer is greater than maximum")
        return original(wrapper, image, *args, **kwargs)

    from legrad.frontend.explainer import Explainer
    from legrad.preprocess import LePreprocess

    explainer = Explainer.load("toy", None, "cpu")
    marked_batch = [LePreprocess(explainer.preprocess, explainer.check_size(None))(marked)]
    monkeypatch.setattr(compute, "heatmaps", heatmaps)
    result = run(data, tmp_path / "out", PROMPTS, **KW)
    assert (result.computed, result.failed) == (2, 1)
    assert result.failures == [("img01.png", "explaining failed: signed integer is greater than maximum")]


# ---------------------------------------------------------------------------------------------- item 9
def test_a_locked_folder_is_refused_at_once_naming_the_holder(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    _scenes(data, 2)
    out = tmp_path / "out"
    out.mkdir()
    from legrad.frontend.explainer import Explainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for a refused run")

    with FolderLock(out):
        monkeypatch.setattr(Explainer, "load", no_model)
        with pytest.raises(FolderBusyError, match=rf"process {os.getpid()} holds the lock .*{LOCK_NAME}"):
            run(data, out, PROMPTS, **KW)
        assert cli_main(["extract", str(data), "--out", str(out), "-p", "x", "--workers", "0", "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another legrad run" in err[0] and str(os.getpid()) in err[0]
        monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    assert run(data, out, PROMPTS, **KW).computed == 2  # released: the next run proceeds


@pytest.mark.subprocess
def test_two_concurrent_runs_do_not_both_succeed(tmp_path):
    data = tmp_path / "data"
    _scenes(data, 24)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "legrad", "extract", str(data), "--out", str(out), "-p", PROMPTS[0],
           "--batch-size", "1", "--workers", "0", "-q"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                             cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("*.npz")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, "the first run ended before the second could start"
        # The second run, other prompts, same folder: refused before any work.
        with pytest.raises(FolderBusyError, match=f"process {first.pid} holds the lock"):
            run(data, out, [PROMPTS[1]], **KW)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    records = _manifest(out)
    assert len(records) == 24
    for rec in records:  # every manifest line agrees with its file
        saved = load_output(out / rec["output"])
        assert saved["prompts"] == rec["prompts"] == [PROMPTS[0]]
        assert saved["similarity"].tolist() == pytest.approx(rec["similarity"], abs=1e-5)


def test_another_configuration_is_refused_unless_overwrite(tmp_path, capsys):
    data = tmp_path / "data"
    _scenes(data, 2)
    out = tmp_path / "out"
    assert run(data, out, PROMPTS, **KW).computed == 2
    before = {p.name: p.read_bytes() for p in out.glob("*.npz")}
    with pytest.raises(OutputFolderError, match=r'another configuration \(prompts: .*"a blue square"\]'):
        run(data, out, ["a green triangle"], **KW)
    assert cli_main(["extract", str(data), "--out", str(out), "-p", "a green triangle", "--workers", "0", "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("*.npz")} == before
    # Same configuration: resumes (all done); --overwrite: replaced, and the record follows.
    assert run(data, out, PROMPTS, **KW).skipped == 2
    assert cli_main(["extract", str(data), "--out", str(out), "-p", "a green triangle", "--workers", "0", "-q",
                     "--overwrite"]) == 0
    assert all(r["prompts"] == ["a green triangle"] for r in _manifest(out))
    assert json.loads((out / RUN_CONFIG_NAME).read_text())["prompts"] == ["a green triangle"]


# ---------------------------------------------------------------------------------------------- item 8
def test_replaced_weights_under_the_same_path_are_not_done(tmp_path):
    data = tmp_path / "data"
    _scenes(data, 2)
    ck = tmp_path / "ck.pt"
    _random_toy_checkpoint(ck, seed=1)
    out = tmp_path / "out"
    kw = dict(KW, pretrained=str(ck))
    assert run(data, out, PROMPTS, **kw).computed == 2
    recorded = json.loads((out / RUN_CONFIG_NAME).read_text())["weights_file"]
    st = ck.stat()
    assert recorded == {"file": str(ck.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev,
                        "hashed_at_ns": recorded["hashed_at_ns"], "sha256": hashlib.sha256(ck.read_bytes()).hexdigest()}
    old_maps = {p.name: load_output(p)["maps"] for p in out.glob("*.npz")}

    # Touched, same bytes: still the same weights, nothing recomputed.
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert run(data, out, PROMPTS, **kw).skipped == 2

    _random_toy_checkpoint(ck, seed=2)  # other weights, same path
    with pytest.raises(OutputFolderError, match="weights"):
        run(data, out, PROMPTS, **kw)
    again = run(data, out, PROMPTS, overwrite=True, **kw)
    assert (again.computed, again.skipped) == (2, 0)
    new_maps = {p.name: load_output(p)["maps"] for p in out.glob("*.npz")}
    assert any(not np.array_equal(old_maps[n], new_maps[n]) for n in old_maps)
    # Each output records the weights it was computed with.
    digest = hashlib.sha256(ck.read_bytes()).hexdigest()
    assert all(load_output(p)["config"]["weights"]["sha256"] == digest for p in out.glob("*.npz"))


# ---------------------------------------------------------------------------------------------- item 11
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (read-only, even for root)")
def test_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from legrad.frontend.explainer import Explainer

    data = tmp_path / "data"
    _scenes(data, 1)

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for an unwritable --out")

    monkeypatch.setattr(Explainer, "load", no_model)
    with pytest.raises(OutputFolderError, match="is not writable"):
        run(data, "/proc", PROMPTS, **KW)
    assert cli_main(["extract", str(data), "--out", "/proc", "-p", "x", "--workers", "0", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        run(data, tmp_path / "file", PROMPTS, **KW)


def test_a_full_disk_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    from legrad.extract import compute

    data = tmp_path / "data"
    _scenes(data, 6)
    calls = []

    def full(folder, name, arrays):
        calls.append(name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compute, "write_output", full)
    out = tmp_path / "out"
    code = cli_main(["extract", str(data), "--out", str(out), "-p", "x", "--workers", "0", "--batch-size", "2", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "No space left on device" in err[0] and "rerun to resume" in err[0], err
    assert len(calls) == 1  # stopped at the first failed write, not after computing everything


# ---------------------------------------------------------------------------------------------- item 7
@pytest.mark.subprocess
def test_sigterm_stops_cleanly_and_the_rerun_resumes(tmp_path):
    data = tmp_path / "data"
    _scenes(data, 24)
    out = tmp_path / "out"
    code, err = signal_after_first_output(["extract", str(data), "--out", str(out), "-p", PROMPTS[0],
                                           "--batch-size", "1", "--workers", "0", "-q"], out, "*.npz", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    done = sorted(p.name for p in out.glob("*.npz"))
    assert 0 < len(done) < 24
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    result = run(data, out, [PROMPTS[0]], **KW)
    assert result.skipped == len(done) and result.computed == 24 - len(done)


def test_the_sigterm_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    cli_main(["extract", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "-p", "x"])
    assert signal.getsignal(signal.SIGTERM) is before
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


# ---------------------------------------------------------------------------------------------- issue 26 item 2
def test_a_link_planted_as_the_lock_is_refused_and_its_target_untouched(tmp_path, monkeypatch):
    from legrad.frontend.explainer import Explainer

    data = tmp_path / "data"
    _scenes(data, 1)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(Explainer, "load", no_model)
    with pytest.raises(OutputFolderError, match="symbolic link"):
        run(data, out, PROMPTS, **KW)
    assert victim.read_text() == "precious\n"


def test_a_planted_sub_folder_link_sends_no_output_outside(tmp_path):
    data = tmp_path / "data"
    _scenes(data, 1)
    _scenes(data / "sub", 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    stale = outside / ".img00.png.npz.abcd1234.tmp"  # like a temp file of a killed run: not ours to delete
    stale.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(outside)
    result = run(data, out, PROMPTS, **KW)
    assert (result.computed, result.failed) == (1, 1)
    assert "sub/img00.png" in result.failures[0][0] and "symbolic link" in result.failures[0][1]
    assert sorted(p.name for p in outside.iterdir()) == [stale.name] and stale.read_text() == "keep"
    # Nor is a finished output reached through the link taken for one on a rerun.
    (out / "sub").unlink()
    assert run(data, out, PROMPTS, **KW).computed == 1
    (out / "sub" / "img00.png.npz").rename(outside / "img00.png.npz")
    (out / "sub").rmdir()
    (out / "sub").symlink_to(outside)
    again = run(data, out, PROMPTS, **KW)
    assert (again.skipped, again.failed) == (1, 1)


def test_a_linked_run_configuration_is_never_read(tmp_path):
    data = tmp_path / "data"
    _scenes(data, 1)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"config": {"model": "TOPSECRET"}, "prompts": ["hunter2"]}))
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_CONFIG_NAME).symlink_to(secret)
    with pytest.raises(OutputFolderError, match="symbolic link") as info:
        run(data, out, PROMPTS, **KW)
    assert "TOPSECRET" not in str(info.value) and "hunter2" not in str(info.value)
    assert run(data, out, PROMPTS, overwrite=True, **KW).computed == 1  # replaced: the target is never written
    assert json.loads(secret.read_text())["prompts"] == ["hunter2"]
    assert not (out / RUN_CONFIG_NAME).is_symlink()


# ---------------------------------------------------------------------------------------------- issue 26 item 6
def test_weights_swapped_with_the_same_size_and_mtime_are_detected(tmp_path):
    data = tmp_path / "data"
    _scenes(data, 1)
    ck, other = tmp_path / "ck.pt", tmp_path / "c2.pt"  # names of one length: checkpoints of one size
    _random_toy_checkpoint(ck, seed=1)
    _random_toy_checkpoint(other, seed=2)
    out = tmp_path / "out"
    kw = dict(KW, pretrained=str(ck))
    assert run(data, out, PROMPTS, **kw).computed == 1
    st = ck.stat()
    assert other.stat().st_size == st.st_size
    ck.write_bytes(other.read_bytes())  # in place: same inode, same size
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime
    assert (ck.stat().st_size, ck.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(OutputFolderError, match="weights"):
        run(data, out, PROMPTS, **kw)


def test_a_recorded_weights_hash_is_reused_only_for_the_same_file(tmp_path, monkeypatch):
    import time

    from legrad.extract import runconfig

    monkeypatch.setattr(runconfig, "_RACY_NS", -10**18)  # trust any recorded hash the stat matches (see below)
    ck, other = tmp_path / "ck.pt", tmp_path / "c2.pt"
    _random_toy_checkpoint(ck, seed=1)
    _random_toy_checkpoint(other, seed=2)
    assert ck.stat().st_size == other.stat().st_size
    out = tmp_path / "out"
    out.mkdir()
    first = runconfig.weights_identity(str(ck), out)
    assert first["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
    runconfig.write_run_config(out, {"config": {}, "prompts": None}, first)
    assert runconfig.weights_identity(str(ck), out) == first  # unchanged: reused, not hashed again

    st = ck.stat()
    time.sleep(0.05)  # past the kernel's coarse timestamp tick, so that the write gets a new ctime
    ck.write_bytes(other.read_bytes())
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns))
    swapped = runconfig.weights_identity(str(ck), out)
    assert swapped["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest() != first["sha256"]

    # Without the test's override, a hash taken within 2 s of the file's last change is not trusted.
    monkeypatch.undo()
    runconfig.write_run_config(out, {"config": {}, "prompts": None}, swapped)
    assert runconfig.weights_identity(str(ck), out)["hashed_at_ns"] != swapped["hashed_at_ns"]
