"""`legrad extract` / `legrad.extract.run`: outputs vs compute_legrad, torchrun vs single process, bad
images and bad input. (Resuming and damaged outputs: test_extract_resume.py.)

The bundled demo model is used when its checkpoint is installed; otherwise a random-init checkpoint of
the same architecture (same loading path: ``--model toy --pretrained FILE``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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
    reference_fixture,
    renormalised,
    scenes_fixture,
    toy_fixture,
)
from PIL import Image

from legrad import LeWrapper
from legrad.cli import main as cli_main
from legrad.extract import load_output, run
from legrad.frontend.explainer import Explainer
from legrad.preprocess import LePreprocess


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


def test_source_files_are_read_once_and_bounded(tmp_path, monkeypatch):
    import hashlib

    from legrad.extract import store

    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (10, 200, 30)).save(img)
    raw = img.read_bytes()
    record, data = store.read_source(str(img))
    assert data == raw
    assert record["size"] == len(raw) and record["sha256"] == hashlib.sha256(raw).hexdigest()
    monkeypatch.setattr(store, "MAX_SOURCE_BYTES", len(raw) - 1)
    with pytest.raises(ValueError, match="larger than"):
        store.read_source(str(img))
