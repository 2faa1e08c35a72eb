"""The worked example of docs/architecture.md ("Adding a method"): its first code block (one module, one
registration) is run here as written, found by every front end through the registry, and checked against
an oracle written with forward hooks on the bundled demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from legrad.frontend.scenes import SCENES_DIR
from legrad.methods import METHODS, make_method
from legrad.methods.registry import method_class, method_names
from legrad.toy import create_model_and_transforms, get_tokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def doc_example() -> str:
    """The first python block of the "Adding a method" section: the method under test."""
    section = DOC.read_text(encoding="utf-8").split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def method_cls():
    namespace: dict = {}
    exec(compile(doc_example(), str(DOC), "exec"), namespace)  # registers it (@register_method)
    cls = namespace["TokenGradInput"]
    yield cls
    METHODS.pop(cls.name, None)


@pytest.fixture(scope="module")
def demo():
    model, _, preprocess = create_model_and_transforms()
    images = torch.stack([preprocess(Image.open(SCENES_DIR / f"scene_{i}.png")) for i in (0, 1)])
    with torch.no_grad():
        text = F.normalize(model.encode_text(get_tokenizer()(["a purple cross", "a cyan triangle"])), dim=-1)
    return model.eval(), images, text


def oracle(model, images, text):
    """relu(sum_c ds/dT * T) on the last block's pre-norm tokens, by a forward hook, one prompt at a time."""
    block = model.visual.transformer.resblocks[-1]
    out = []
    for p in range(len(text)):
        seen = {}
        handle = block.ln_1.register_forward_hook(lambda m, i, o, seen=seen: seen.setdefault("t", o))
        try:
            emb = model.encode_image(images)
        finally:
            handle.remove()
        tokens = seen["t"]
        score = (F.normalize(emb, dim=-1) @ text[p]).sum()
        (grad,) = torch.autograd.grad(score, tokens)
        out.append((grad * tokens).sum(-1).clamp_min(0)[:, 1:])
    rel = torch.stack(out, 1)  # [B, P, 64]
    grid = rel.reshape(*rel.shape[:2], 8, 8).double()
    return F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False).detach()


def test_the_example_is_one_short_module():
    lines = [line for line in doc_example().splitlines() if line.strip()]
    assert len(lines) <= 30, len(lines)


def test_the_added_method_is_in_the_one_registry(method_cls):
    from legrad.app.requests import checked_method, method_choices

    assert method_names()[-1] == "token_grad_input" and METHODS["token_grad_input"] is method_cls
    assert method_class("token_grad_input") == (method_cls, {})  # what legrad bench / explain --method check
    assert ("TokenGradInput", "token_grad_input") in method_choices() and checked_method("token_grad_input")


def test_the_added_method_matches_its_oracle(method_cls, demo):
    model, images, text = demo
    method = make_method("token_grad_input", model)
    raw = method.attribute(images, target=text, normalize=False).double()
    want = oracle(model, images, text)
    assert raw.shape == (2, 2, 64, 64) and float(want.amax()) > 0
    torch.testing.assert_close(raw, want, rtol=1e-4, atol=1e-6 * float(want.amax()))
    maps = method.attribute(images, target=text)
    assert float(maps.amin()) == 0.0 and float(maps.amax()) == 1.0
    assert not torch.allclose(maps, make_method("gradcam", model).attribute(images, target=text))
