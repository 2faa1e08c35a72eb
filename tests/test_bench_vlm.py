"""``bench/bench_vlm.py``: every supported VLM family has a builder (bench/vlm_builders.py), and each tiny row's baseline scores the very sequences LeGrad explains (its forward's
log-probabilities of the answers equal ``compute_legrad``'s scores)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_vlm as B  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.vlm import SUPPORTED_VLM_CLASSES  # noqa: E402

BENCHED = list(SUPPORTED_VLM_CLASSES)


def test_every_supported_family_has_a_builder():
    listed = {c: (f, ok) for c, f, ok in B.families()}
    assert set(SUPPORTED_VLM_CLASSES) <= set(listed)
    assert all(ok == (c in SUPPORTED_VLM_CLASSES) for c, (_, ok) in listed.items())
    missing = [c for c in SUPPORTED_VLM_CLASSES if c not in B.FAMILIES]
    assert not missing, f"add a builder to bench/vlm_builders.py's FAMILIES for {missing}"
    names = [f.name for f in B.FAMILIES.values()]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("cls_name", BENCHED)
def test_the_baseline_scores_the_sequences_legrad_explains(cls_name):
    torch.manual_seed(0)
    case = B.make_case(B.FAMILIES[cls_name].build("tiny", 2, torch.float32), answers=2)
    model = case.built.model
    assert type(model).__name__ == cls_name
    _, scores = LeWrapper(model).compute_legrad(image=case.inputs, answers=case.answers, return_scores=True)
    with torch.no_grad():
        logits = model(**case.plain).logits.float()
    target = case.plain["input_ids"][:, -B.ANSWER_TOKENS:]
    own = logits[:, -B.ANSWER_TOKENS - 1:-1].log_softmax(-1).gather(-1, target[..., None]).sum((1, 2))
    torch.testing.assert_close(scores[0], own, atol=1e-4, rtol=0)


def test_a_row_and_the_families_without_a_builder_or_adapter(monkeypatch, capsys):
    args = argparse.Namespace(lm_layers=2, dtype="float32", answers=2, reps=1, device="cpu", explain_answer=2,
                              memory=False)
    cls_name = "Qwen2VLForConditionalGeneration"
    line = B.row(args, cls_name, B.FAMILIES[cls_name], "tiny")
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "qwen2-vl" and cells[4] == "2 x 42" and cells[5] == "2" and len(cells) == 16
    assert all(float(c.strip("*x")) > 0 for c in cells[6:12])
    # A supported class without a builder, and a builder without an adapter: "not benchmarked".
    monkeypatch.setattr(B, "FAMILIES", {k: v for k, v in B.FAMILIES.items() if k != cls_name} | {
        "SomeOtherVLM": B.Family("other", B._llava)})
    monkeypatch.setattr(sys, "argv", ["bench_vlm.py", "--no-memory", "--families", cls_name, "other"])
    threads = torch.get_num_threads()
    try:
        B.main()
    finally:
        torch.set_num_threads(threads)  # main() sets its --threads
    out = capsys.readouterr().out
    assert f"| {cls_name} | not benchmarked: no builder in bench/vlm_builders.py |" in out
    assert "| other | not benchmarked: no legrad adapter in this checkout |" in out
