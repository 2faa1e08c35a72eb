"""`legrad extract` / `legrad.extract.run`: outputs vs compute_legrad, torchrun vs single process, resume,
bad images, corrupt outputs and bad input.

The bundled demo model is used when its checkpoint is installed; otherwise a random-init checkpoint of
the same architecture (same loading path: ``--model toy --pretrained FILE``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from legrad import LeWrapper
from legrad.cli import main as cli_main
from legrad.extract import MANIFEST_NAME, load_output, run
from legrad.frontend.explainer import Explainer
from legrad.preprocess import LePreprocess

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
N_SCENES = 20
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[str, str | None]:
    """``(model, pretrained)`` for the demo model: the bundled checkpoint, else a random one."""
    from legrad.toy import CHECKPOINT_PATH

    if Path(CHECKPOINT_PATH).is_file():
        return "toy", None
    from legrad.toy.model import ToyConfig, build_model, known_token_ids, make_tokenizer, save_checkpoint

    cfg = ToyConfig()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "toy_random.pt"
    save_checkpoint(build_model(cfg), cfg, path, known_token_ids(make_tokenizer(cfg)))
    return "toy", str(path)


@pytest.fixture(scope="module")
def explainer(toy) -> Explainer:
    return Explainer.load(*toy, device="cpu")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """20 generated 64x64 scenes (a third in a sub-folder) and one corrupt PNG."""
    from legrad.toy import make_scenes

    root = tmp_path_factory.mktemp("scenes")
    (root / "sub").mkdir()
    for i, scene in enumerate(make_scenes(N_SCENES, seed=3)):
        scene.image.save(root / ("sub" if i % 3 == 0 else ".") / f"scene{i:02d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy, scenes) -> Path:
    """A complete single-process run (grid maps, float32)."""
    out = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's one-thread fixture
    try:
        result = run(scenes, out, PROMPTS, model=toy[0], pretrained=toy[1], workers=1, batch_size=4,
                     dtype="float32", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert (result.total, result.computed, result.skipped, result.failed) == (N_SCENES + 1, N_SCENES, 0, 1)
    return out


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def npz_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz"))


def assert_same_outputs(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Same files, same manifest; floats equal up to rounding noise from batch composition/threads."""
    assert npz_files(a) == npz_files(b)
    for name in npz_files(a):
        x, y = load_output(a / name), load_output(b / name)
        assert x.keys() == y.keys()
        for k in x:
            if k in ("maps", "similarity"):
                assert x[k].shape == y[k].shape and x[k].dtype == y[k].dtype, (name, k)
                np.testing.assert_allclose(x[k].astype(np.float64), y[k], atol=atol, err_msg=f"{name} {k}")
            else:
                assert x[k] == y[k], (name, k)
    ma, mb = manifest(a), manifest(b)
    assert len(ma) == len(mb)
    for ra, rb in zip(ma, mb):
        assert {k: v for k, v in ra.items() if k != "similarity"} == {k: v for k, v in rb.items() if k != "similarity"}
        if ra["similarity"] is None:
            assert rb["similarity"] is None
        else:
            np.testing.assert_allclose(ra["similarity"], rb["similarity"], atol=max(atol, 2e-6))


def expected_maps(explainer: Explainer, image_path: Path, prompts: list[str], size=(64, 64)):
    """compute_legrad at the explained size, and the cosine similarities of the model's own preprocess."""
    image = Image.open(image_path).convert("RGB")
    text = explainer.encode_prompts(prompts)
    x = LePreprocess(explainer.preprocess, size)(image)[None]
    maps = explainer.wrapper.compute_legrad(text, image=x)[0]
    with torch.no_grad():
        emb = F.normalize(explainer.wrapper.model.encode_image(explainer.preprocess(image)[None]), dim=-1)
    return maps, (emb @ text.T)[0]


def renormalised(grid: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A stored map brought to ``size`` the documented way: bilinear upsampling, then min-max per prompt."""
    up = F.interpolate(torch.from_numpy(grid.astype(np.float32))[None], size=size, mode="bilinear",
                       align_corners=False)[0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    return (up - lo) / (hi - lo)


# ---------------------------------------------------------------------------------------------- contents
def test_outputs_match_compute_legrad(reference, scenes, explainer):
    records = manifest(reference)
    assert [r["image"] for r in records] == sorted(r["image"] for r in records)  # input (sorted) order
    assert len(records) == N_SCENES + 1
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == N_SCENES
    for rec in ok[:: 4]:
        out = load_output(reference / rec["output"])
        assert out["image"] == rec["image"] and out["prompts"] == PROMPTS == rec["prompts"]
        assert out["maps"].shape == (3, 8, 8) and out["maps"].dtype == np.float32  # 64 px / patch 8
        assert out["image_size"] == (64, 64) and out["input_size"] == (64, 64)
        maps, sim = expected_maps(explainer, scenes / rec["image"], PROMPTS)
        # The grid map, upsampled and renormalised, is exactly compute_legrad's map.
        np.testing.assert_allclose(renormalised(out["maps"], (64, 64)).numpy(), maps.numpy(), atol=2e-5)
        np.testing.assert_allclose(out["similarity"], sim.numpy(), atol=1e-5)
        np.testing.assert_allclose(rec["similarity"], sim.numpy(), atol=2e-6)


def test_corrupt_image_is_reported_and_skipped(reference):
    (bad,) = [r for r in manifest(reference) if r["status"] != "ok"]
    assert bad["image"] == "broken.png" and bad["output"] is None and bad["similarity"] is None
    assert "broken.png" in bad["error"] and "not a readable image" in bad["error"]
    assert not (reference / "broken.png.npz").exists()
    assert not list(reference.glob(".manifest.rank*"))  # shards merged and removed


@pytest.mark.slow
def test_input_and_fixed_map_sizes(tmp_path, toy, scenes, reference, explainer):
    out_in = tmp_path / "input"
    run(scenes, out_in, PROMPTS, model=toy[0], pretrained=toy[1], workers=0, map_size="input", dtype="float32",
        limit=3, progress=False)
    out_hw = tmp_path / "hw"
    run(scenes, out_hw, PROMPTS, model=toy[0], pretrained=toy[1], workers=0, map_size="20x24", limit=3,
        progress=False)
    for rec in manifest(out_in):
        if rec["status"] != "ok":
            continue
        full = load_output(out_in / rec["output"])["maps"]
        maps, _ = expected_maps(explainer, scenes / rec["image"], PROMPTS)
        np.testing.assert_allclose(full, maps.numpy(), atol=1e-5)
        fixed = load_output(out_hw / rec["output"])["maps"]
        assert fixed.shape == (3, 20, 24) and fixed.dtype == np.float16
        grid = load_output(reference / rec["output"])["maps"]
        np.testing.assert_allclose(fixed, renormalised(grid, (20, 24)).numpy(), atol=2e-3)


@pytest.mark.slow
def test_jsonl_per_image_prompts(tmp_path, toy, scenes, explainer):
    data = tmp_path / "data"
    shutil.copytree(scenes, data)
    own = {"scene01.png": ["a red circle"], "scene02.png": ["a blue square", "a red circle"],
           "sub/scene03.png": PROMPTS}
    lines = [json.dumps({"image": k, "prompts": v}) for k, v in own.items()]
    lines += [json.dumps({"image": "scene04.png"}), "", json.dumps({"image": "missing.png", "prompts": ["a red star"]})]
    (data / "list.jsonl").write_text("\n".join(lines) + "\n")
    result = run(data / "list.jsonl", tmp_path / "out", ["a yellow star"], model=toy[0], pretrained=toy[1],
                 workers=1, batch_size=4, map_size="input", dtype="float32", progress=False)
    assert (result.total, result.computed, result.failed) == (5, 4, 1)
    records = manifest(tmp_path / "out")
    assert [r["image"] for r in records] == [*own, "scene04.png", "missing.png"]  # file order
    own["scene04.png"] = ["a yellow star"]
    for rec in records[:4]:
        out = load_output(tmp_path / "out" / rec["output"])
        assert rec["output"] == rec["image"] + ".npz" and out["prompts"] == own[rec["image"]] == rec["prompts"]
        maps, sim = expected_maps(explainer, data / rec["image"], own[rec["image"]])
        np.testing.assert_allclose(out["maps"], maps.numpy(), atol=1e-5)
        np.testing.assert_allclose(out["similarity"], sim.numpy(), atol=1e-5)
    assert records[4]["status"] == "error" and "no such file" in records[4]["error"]


def test_explainer_model_with_empty_prompt_correction(tmp_path, scenes):
    """A ready Explainer is accepted; towers with their own LeGrad logic (here SigLIP's empty-prompt
    correction) go through compute_legrad, so `input` maps equal it exactly."""
    import open_clip
    from helpers.tiny_towers import build_tiny

    model = build_tiny("ViT-B-16-SigLIP", seed=1)
    assert LeWrapper(model).adapter.uses_empty_prompt_correction

    def tokenizer(texts):  # deterministic ids in the tiny model's 64-token vocabulary
        rows = [[(7 * sum(map(ord, w)) % 60) + 2 for w in t.split()][:8] for t in texts]
        return torch.tensor([r + [0] * (8 - len(r)) for r in rows])

    explainer = Explainer(model, open_clip.image_transform(48, is_train=False), tokenizer, name="tiny-siglip")
    common = dict(model=explainer, size=48, workers=0, limit=4, progress=False)
    run(scenes, tmp_path / "input", PROMPTS, map_size="input", dtype="float32", **common)
    run(scenes, tmp_path / "grid", PROMPTS, **common)
    text = explainer.encode_prompts(PROMPTS)
    for rec in manifest(tmp_path / "input")[1:]:
        image = Image.open(scenes / rec["image"]).convert("RGB")
        expected = explainer.wrapper.compute_legrad(text, image=LePreprocess(explainer.preprocess, 48)(image)[None])
        np.testing.assert_allclose(load_output(tmp_path / "input" / rec["output"])["maps"], expected[0].numpy(),
                                   atol=1e-5)
        grid = load_output(tmp_path / "grid" / rec["output"])
        assert grid["maps"].shape == (3, 3, 3) and grid["config"]["model"] == "tiny-siglip"
        assert float(grid["maps"].min()) == 0.0 and float(grid["maps"].max()) == 1.0


# ---------------------------------------------------------------------------------------------- distributed
@pytest.mark.torchrun
def test_torchrun_two_processes_match_single_process(tmp_path, toy, scenes, reference):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "legrad", "extract", str(scenes), "--out", str(out), "--model", toy[0], "--dtype", "float32",
           "--batch-size", "3", "--workers", "1", "-q"]
    for p in PROMPTS:
        cmd += ["-p", p]
    if toy[1]:
        cmd += ["--pretrained", toy[1]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0, "one image is corrupt: the job must fail"
    assert "20 computed, 0 already done, 1 failed" in proc.stdout and "on 2 processes" in proc.stdout, \
        proc.stdout + proc.stderr
    assert_same_outputs(reference, out)


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
    result = run(scenes, out, PROMPTS, model=toy[0], pretrained=toy[1], workers=0, dtype="float16", limit=3,
                 progress=False)
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


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=None), "no prompts"),
        (dict(input_path="missing-dir"), "does not exist"),
        (dict(map_size="huge"), "map_size"),
        (dict(dtype="float64"), "dtype"),
        (dict(batch_size=0), "batch_size"),
        (dict(workers=-1), "workers"),
        (dict(limit=0), "limit"),
        (dict(size=60), "multiple of the model's patch size"),
        (dict(layer_index=99), "out of range"),
    ],
)
def test_bad_arguments_fail_before_work(tmp_path, toy, scenes, kwargs, match):
    args = dict(input_path=scenes, out=tmp_path / "out", prompts=PROMPTS, model=toy[0], pretrained=toy[1],
                workers=0, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run(**args)
    assert not (tmp_path / "out").exists()


def test_prompts_must_be_a_list(tmp_path, scenes):
    with pytest.raises(TypeError, match="list of strings"):
        run(scenes, tmp_path / "out", "a red circle")


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"image": "a.png", "prompts": ["x"]', ], "not valid JSON"),
        (['{"prompts": ["x"]}'], '"image"'),
        (['{"image": "a.png", "prompts": "a cat"}'], "list of strings"),
        (['{"image": "a.png", "prompts": ["  "]}'], "no non-empty prompt"),
        (['{"image": "a.png"}'], "no global prompts"),
        (['{"image": "a.png", "prompts": ["x"]}', '{"image": "./a.png", "prompts": ["y"]}'], "listed again"),
    ],
)
def test_bad_jsonl_is_rejected_with_its_line(tmp_path, lines, match):
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match) as info:
        run(tmp_path / "list.jsonl", tmp_path / "out", workers=0)
    assert "list.jsonl:" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_exit_status_and_prompts_file(tmp_path, toy, scenes, capsys):
    (tmp_path / "classes.txt").write_text("# colours and shapes\na red circle\n\na blue square\n")
    base = ["extract", str(scenes), "--model", toy[0], "--workers", "0", "-q"] + (
        ["--pretrained", toy[1]] if toy[1] else [])
    assert cli_main(base + ["--out", str(tmp_path / "a"), "--prompts-file", str(tmp_path / "classes.txt"),
                            "--limit", "3"]) == 1  # broken.png is first
    assert cli_main(base[:2] + ["--out", str(tmp_path / "b")] + base[2:]) == 2  # no prompts
    err = capsys.readouterr().err
    assert "broken.png" in err and "no prompts" in err
    records = manifest(tmp_path / "a")
    assert records[1]["prompts"] == ["a red circle", "a blue square"]
    assert cli_main(["extract", str(scenes), "--out", str(tmp_path / "c"), "-p", "x", "--map-size", "huge"]) == 2
